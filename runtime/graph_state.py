"""One generation on an exported graph, whatever runs it (an ONNX Runtime session, a TensorRT
engine): the expert per row and the KV cache carried from step to step as the graph's
past_key_values / present values. numpy only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from chmc.formats.export import ExportSection
from chmc.models.router import no_router

Run = Callable[[list[str], dict[str, Any]], list[Any]]  # InferenceSession.run's contract
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class GraphState:
    def __init__(self, run: Run, section: ExportSection, routed: bool, where: Any,
                 expert_ids: np.ndarray, cache_dtype: Any):
        self.run = run
        self.layers = section.num_layers
        self.reports_expert = section.reports_expert
        batch = len(expert_ids)
        empty = np.zeros((batch, section.num_kv_heads, 0, section.head_dim), dtype=cache_dtype)
        self.feed: dict[str, Any] = {}
        for i in range(self.layers):
            self.feed[f"past_key_values.{i}.key"] = empty
            self.feed[f"past_key_values.{i}.value"] = empty
        self.expert_ids = np.ascontiguousarray(expert_ids, dtype=np.int64)  # [B]
        if (self.expert_ids < 0).any() and not routed:
            raise no_router(where)  # a graph without a router would read -1 as N-1
        if section.merged:
            self.feed["expert_id"] = self.expert_ids
        self.outputs = ["logits"] + [f"present.{i}.{p}" for i in range(self.layers)
                                     for p in ("key", "value")]
        if self.reports_expert:
            self.outputs.append("expert_id_used")

    def _caches(self) -> list[str]:
        return [f"past_key_values.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]

    def _set_experts(self, expert_ids: np.ndarray) -> None:
        self.expert_ids = np.ascontiguousarray(expert_ids, dtype=np.int64)
        if "expert_id" in self.feed:
            self.feed["expert_id"] = self.expert_ids

    def keep(self, rows: np.ndarray, width: int) -> None:
        """Only `rows` stay, with the last `width` cache columns (the scheduler's batch)."""
        for name in self._caches():
            self.feed[name] = np.ascontiguousarray(self.feed[name][rows, :, -width:])
        self._set_experts(self.expert_ids[rows])

    def join(self, other: GraphState, width: int) -> None:
        """Append `other`'s rows; both caches left-padded with zeros to `width` columns."""
        for name in self._caches():
            a, b = self.feed[name], other.feed[name]  # [B, kv_heads, T, head_dim]
            out = np.zeros((len(a) + len(b), a.shape[1], width, a.shape[3]), dtype=a.dtype)
            out[:len(a), :, width - a.shape[2]:] = a
            out[len(a):, :, width - b.shape[2]:] = b
            self.feed[name] = out
        self._set_experts(np.concatenate([self.expert_ids, other.expert_ids]))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        self.feed.update(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids)
        out = self.run(self.outputs, self.feed)
        for i in range(self.layers):
            self.feed[f"past_key_values.{i}.key"] = out[1 + 2 * i]
            self.feed[f"past_key_values.{i}.value"] = out[2 + 2 * i]
        if self.reports_expert:  # routed rows keep the expert the router gave them
            self.expert_ids = self.feed["expert_id"] = out[-1]
        return np.asarray(out[0][:, -1], dtype=np.float32)  # [B, V]
