"""Running an exported graph directly (its inputs, a cache carried by hand), for the tests that
compare its logits at every position with transformers'."""

from __future__ import annotations

from typing import Any

import numpy as np


def feeds(session: Any, ids: np.ndarray, past: dict[str, np.ndarray] | None,
          expert: list[int] | None, total: int) -> dict[str, np.ndarray]:
    """Inputs for one call: ids [B, S] after `past` (empty when None), positions from 0."""
    batch, seq = ids.shape
    feed: dict[str, np.ndarray] = {
        "input_ids": ids, "attention_mask": np.ones((batch, total), np.int64),
        "position_ids": np.tile(np.arange(total - seq, total), (batch, 1))}
    if expert is not None:
        feed["expert_id"] = np.array(expert, np.int64)
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = past[i.name] if past else np.zeros(
                (batch, i.shape[1], 0, i.shape[3]), np.float32)
    return feed


def run_with_cache(session: Any, ids: np.ndarray, expert: list[int] | None,
                   prefill: int) -> np.ndarray:
    """Logits [B, S, V] from a prefill of `prefill` tokens and then one decode step per token."""
    names = [o.name for o in session.get_outputs()]
    out = session.run(names, feeds(session, ids[:, :prefill], None, expert, prefill))
    logits = [out[0]]
    for t in range(prefill, ids.shape[1]):
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}
        out = session.run(names, feeds(session, ids[:, t:t + 1], past, expert, t + 1))
        logits.append(out[0])
    return np.concatenate(logits, axis=1)
