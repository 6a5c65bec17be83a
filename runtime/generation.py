"""The generation loop, shared by every backend: left-padded batches, one expert per row, KV cache.

A backend gives `start(expert_ids)` -> a state whose `step(input_ids [B, S], attention_mask
[B, T], position_ids [B, S])` returns the last position's logits [B, V] (float32, numpy) and keeps
the cache for the next step. Rows of different experts run in the same call. An id of ROUTED (-1)
lets the model's router pick the row's expert from its prompt at the first step; the state keeps
that expert for the rest of the sequence (`state.expert_ids`). numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from chmc.errors import ChmcError
from chmc.formats.checkpoint import GenerationIds
from chmc.models.inputs import left_pad, positions


class StepState(Protocol):
    expert_ids: np.ndarray  # [B]: after the first step, routed rows hold their expert

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    def start(self, expert_ids: np.ndarray) -> StepState: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the generation loop needs to know of a loaded model, whatever its folder kind."""

    source: str  # the folder, for error messages
    experts: tuple[str, ...]  # empty for a dense model
    routed: bool  # has a router: expert 'auto' works
    ids: GenerationIds
    rope_switch: int | None = None  # longrope: recompute a sequence's cache once it is longer


def sample(logits: np.ndarray, temperature: float, top_p: float,
           rng: np.random.Generator) -> np.ndarray:
    """Next token per row [B]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int64)
    for i, p in enumerate(probs):
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest prefix with mass >= top_p
        kept = order[keep]
        out[i] = rng.choice(kept, p=p[kept] / p[kept].sum())
    return out


def generate_ids(backend: Backend, prompts: list[list[int]], expert_ids: list[int], *,
                 max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 done: Callable[[int, list[int]], bool] | None = None,
                 rope_switch: int | None = None) -> Iterator[np.ndarray]:
    """Yield each step's new token per row [B] (pad for finished rows) until all rows finish.

    A row finishes at an EOS id, at max_new_tokens, or when `done(row, its new ids)` says so.
    When a row's length passes `rope_switch` (longrope), its positions all take the long
    factors: the cache is recomputed by one prefill of every row's tokens so far, as
    transformers' generate recomputes that sequence (rows below the switch stay as they were).
    """
    if not 0 < top_p <= 1:
        raise ChmcError(f"top_p must be in (0, 1], got {top_p}")
    if any(not p for p in prompts):
        raise ChmcError("a prompt encodes to no tokens; give at least one character")
    rng = np.random.default_rng(seed)
    ids, mask = left_pad(prompts, pad_id)
    pos = positions(mask)
    state = backend.start(np.asarray(expert_ids, dtype=np.int64))
    finished = np.zeros(len(prompts), dtype=bool)
    new: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = state.step(ids, mask, pos)  # [B, V]
        token = np.where(finished, pad_id, sample(logits, temperature, top_p, rng))
        for row in np.flatnonzero(~finished):
            new[row].append(int(token[row]))
            if token[row] in eos_ids or (done is not None and done(int(row), new[row])):
                finished[row] = True
        yield token
        if finished.all():
            return
        if rope_switch is not None and any(
                not ended and len(p) + len(n) == rope_switch + 1
                for p, n, ended in zip(prompts, new, finished)):
            state = backend.start(state.expert_ids)  # the routed experts, kept
            ids, mask = left_pad([p + n for p, n in zip(prompts, new)], pad_id)
            pos = positions(mask)
            continue
        ids = token[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
