"""The decoder's forward pass, written once for every backend.

`logits(ops, spec, cfg, input_ids, position_ids)` describes the architecture (norms, RoPE,
attention, MLP, biases) in terms of the primitives of an `Ops` object. Each backend implements
those primitives over its own values: the ONNX builder (chmc.compiler.onnx_graph) emits a node
per call, the torch runtime (chmc.runtime.torch_merged) computes tensors. A feature added here is
added to both, and the tests that compare each backend with transformers check it twice.

What stays with a backend is what depends on how it stores things, not on the architecture:
reading a (channel-merged) weight, the per-expert vectors, the KV cache and the masks built over
its layout, and which positions get logits.

Shapes in comments: B batch, S new tokens, T cached + new tokens, H query heads, G key/value
heads, R = H / G query heads per key/value head, hd head dim, D hidden, V vocab.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import numpy as np

from chmc.models.spec import ArchSpec, DecoderConfig

V = TypeVar("V")


class Ops(Protocol, Generic[V]):
    """The primitives a decoder is written in, over a backend's values V. Arithmetic broadcasts
    like numpy; `reshape` takes ONNX's 0 (keep that dim) and -1 (infer)."""

    # weights: per expert of the batch row where the model has experts
    def has(self, name: str) -> bool: ...
    def project(self, x: V, weight: str) -> V: ...  # x @ W^T: [..., in] -> [..., out]
    def vector(self, name: str, rank: int = 3) -> V: ...  # a 1-D weight, broadcastable: [B, 1.., D]
    def embed(self, ids: V, weight: str) -> V: ...  # [B, S] -> [B, S, D]

    # the backend's cache layout
    def masks(self, windows: set[int | None]) -> dict[int | None, V]: ...  # [B, 1, 1, S, T] bool
    def cache(self, layer: int, k: V, v: V) -> tuple[V, V]: ...  # [B, G, S, hd] -> [B, G, T, hd]
    def logit_positions(self, h: V) -> V: ...  # the positions [B, S', D] that get logits

    # arithmetic
    def const(self, value: float | np.ndarray) -> V: ...  # float32
    def add(self, a: V, b: V) -> V: ...
    def sub(self, a: V, b: V) -> V: ...
    def mul(self, a: V, b: V) -> V: ...
    def div(self, a: V, b: V) -> V: ...
    def neg(self, x: V) -> V: ...
    def sqrt(self, x: V) -> V: ...
    def sigmoid(self, x: V) -> V: ...
    def cos(self, x: V) -> V: ...
    def sin(self, x: V) -> V: ...
    def where(self, cond: V, a: V, b: V) -> V: ...
    def mean(self, x: V, axis: int) -> V: ...  # keeps the axis
    def softmax(self, x: V, axis: int) -> V: ...
    def matmul(self, a: V, b: V) -> V: ...

    # dtypes: the model's (float32, float16, bfloat16), with float32 islands for precision
    def upcast(self, x: V) -> V: ...  # model dtype -> float32 (nothing for a float32 model)
    def downcast(self, x: V) -> V: ...  # float32 -> model dtype
    def int_to_float(self, x: V) -> V: ...  # int64 -> float32

    # layout
    def reshape(self, x: V, shape: list[int]) -> V: ...
    def transpose(self, x: V, perm: list[int]) -> V: ...
    def unsqueeze(self, x: V, axis: int) -> V: ...
    def concat(self, xs: list[V], axis: int) -> V: ...
    def split(self, x: V, sizes: list[int], axis: int) -> list[V]: ...


def logits(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, input_ids: V, position_ids: V) -> V:
    """Logits [B, S', V] (float32 where the backend casts them) of the positions the backend
    keeps."""
    cos, sin = rotary(ops, cfg, position_ids)
    masks = ops.masks(set(cfg.windows))
    h = ops.embed(input_ids, spec.embed)  # [B, S, D]
    for i in range(cfg.layers):
        x = rms_norm(ops, cfg, h, spec.input_norm.format(i=i))
        h = ops.add(h, attention(ops, spec, cfg, i, x, cos, sin, masks[cfg.windows[i]]))
        x = rms_norm(ops, cfg, h, spec.post_attention_norm.format(i=i))
        h = ops.add(h, mlp(ops, spec, cfg, i, x))
    h = rms_norm(ops, cfg, ops.logit_positions(h), spec.final_norm)
    if cfg.tie_word_embeddings or not ops.has(spec.lm_head):
        return ops.project(h, spec.embed)
    return linear(ops, h, spec.lm_head.removesuffix(".weight"))


def linear(ops: Ops[V], x: V, prefix: str) -> V:
    """x @ W^T (+ b) of the Linear `prefix`; a bias is used where the checkpoint has one."""
    y = ops.project(x, f"{prefix}.weight")
    bias = f"{prefix}.bias"
    return ops.add(y, ops.vector(bias)) if ops.has(bias) else y


def rms_norm(ops: Ops[V], cfg: DecoderConfig, x: V, weight: str) -> V:
    """x / sqrt(mean(x^2) + eps) in float32, back in the model dtype, times the weight."""
    h = ops.upcast(x)
    var = ops.mean(ops.mul(h, h), axis=-1)
    h = ops.div(h, ops.sqrt(ops.add(var, ops.const(cfg.eps))))
    return ops.mul(ops.downcast(h), ops.vector(weight))


def inverse_frequencies(cfg: DecoderConfig) -> np.ndarray:
    """RoPE's inverse frequencies [hd / 2] (float32, as transformers computes them)."""
    hd = cfg.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd
    return (1.0 / (cfg.rope_theta ** exponents)).astype(np.float32)


def rotary(ops: Ops[V], cfg: DecoderConfig, position_ids: V) -> tuple[V, V]:
    """cos, sin [B, S, 1, hd] of the positions, computed in float32 like transformers."""
    pos = ops.unsqueeze(ops.int_to_float(position_ids), -1)  # [B, S, 1]
    freqs = ops.mul(pos, ops.const(inverse_frequencies(cfg)))  # [B, S, hd/2]
    emb = ops.unsqueeze(ops.concat([freqs, freqs], axis=-1), 2)  # [B, S, 1, hd]
    return ops.downcast(ops.cos(emb)), ops.downcast(ops.sin(emb))


def rope(ops: Ops[V], cfg: DecoderConfig, x: V, cos: V, sin: V) -> V:
    """x [B, S, heads, hd] * cos + rotate_half(x) * sin."""
    half = cfg.head_dim // 2
    x1, x2 = ops.split(x, [half, half], axis=-1)
    rotated = ops.concat([ops.neg(x2), x1], axis=-1)
    return ops.add(ops.mul(x, cos), ops.mul(rotated, sin))


def attention(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, i: int, x: V, cos: V, sin: V,
              allowed: V) -> V:
    """Grouped-query attention over the cache: the R query heads of a key/value head attend as
    one [R * S] block of queries, so keys and values are never repeated."""
    names = {p: t.format(i=i) for p, t in spec.attention.items()}
    hd, g = cfg.head_dim, cfg.kv_heads
    q = ops.reshape(linear(ops, x, names["q"]), [0, 0, cfg.heads, hd])  # [B, S, H, hd]
    k = ops.reshape(linear(ops, x, names["k"]), [0, 0, g, hd])  # [B, S, G, hd]
    v = ops.reshape(linear(ops, x, names["v"]), [0, 0, g, hd])
    q = ops.reshape(rope(ops, cfg, q, cos, sin), [0, 0, g, cfg.heads_per_kv, hd])
    q = ops.transpose(q, [0, 2, 3, 1, 4])  # [B, G, R, S, hd]
    k = ops.transpose(rope(ops, cfg, k, cos, sin), [0, 2, 1, 3])  # [B, G, S, hd]
    k_all, v_all = ops.cache(i, k, ops.transpose(v, [0, 2, 1, 3]))  # [B, G, T, hd]
    kt = ops.unsqueeze(ops.transpose(k_all, [0, 1, 3, 2]), 2)  # [B, G, 1, hd, T]
    scores = ops.upcast(ops.matmul(q, kt))  # [B, G, R, S, T] float32
    scores = ops.mul(scores, ops.const(hd ** -0.5))
    scores = ops.where(allowed, scores, ops.const(float(np.finfo(np.float32).min)))
    probs = ops.downcast(ops.softmax(scores, axis=-1))
    ctx = ops.matmul(probs, ops.unsqueeze(v_all, 2))  # [B, G, R, S, hd]
    ctx = ops.reshape(ops.transpose(ctx, [0, 3, 1, 2, 4]), [0, 0, -1])  # [B, S, H * hd]
    return linear(ops, ctx, names["o"])


def mlp(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, i: int, x: V) -> V:
    """down(act(gate(x)) * up(x)); SiLU is x * sigmoid(x)."""
    names = {p: t.format(i=i) for p, t in spec.mlp.items()}
    gate = linear(ops, x, names["gate"])
    act = ops.mul(gate, ops.sigmoid(gate))
    return linear(ops, ops.mul(act, linear(ops, x, names["up"])), names["down"])
