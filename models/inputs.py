"""How a batch of prompts becomes the decoder's inputs, the same for every backend and for the
router: left padding with an attention mask, positions counted from each row's first real token.
numpy only."""

from __future__ import annotations

import numpy as np


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, L], shorter rows padded on the left."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """position_ids as transformers derives them from the mask: cumsum - 1, padding at 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
