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

from chmc.models.rope import RopeTable
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
    # q [B, G, R, S, hd], k and v [B, G, T, hd] -> softmax(q k^T * scale) v where allowed (the
    # mask of `window`), by a fused kernel; None: the backend has none, the decoder composes it
    def attend(self, q: V, k: V, v: V, allowed: V, window: int | None,
               scale: float) -> V | None: ...

    # arithmetic
    def const(self, value: float | tuple[float, ...]) -> V: ...  # float32: a scalar, a vector
    def add(self, a: V, b: V) -> V: ...
    def sub(self, a: V, b: V) -> V: ...
    def mul(self, a: V, b: V) -> V: ...
    def div(self, a: V, b: V) -> V: ...
    def neg(self, x: V) -> V: ...
    def sqrt(self, x: V) -> V: ...
    def sigmoid(self, x: V) -> V: ...
    def tanh(self, x: V) -> V: ...
    def cos(self, x: V) -> V: ...
    def sin(self, x: V) -> V: ...
    def where(self, cond: V, a: V, b: V) -> V: ...
    def greater(self, a: V, b: V) -> V: ...  # bool
    def max(self, x: V, axis: int) -> V: ...  # keeps the axis
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
    """Logits [B, S', V] of the positions the backend keeps."""
    rotaries = {table: rotary(ops, table, position_ids) for table in dict.fromkeys(cfg.rope)}
    masks = ops.masks(set(cfg.windows))
    h = ops.embed(input_ids, spec.embed)  # [B, S, D]
    if spec.embed_scale:
        h = ops.downcast(ops.mul(ops.upcast(h), ops.const(cfg.hidden ** 0.5)))
    for i in range(cfg.layers):
        cos, sin = rotaries[cfg.rope[i]]
        x = rms_norm(ops, spec, cfg, h, spec.attn_norm.format(i=i))
        a = attention(ops, spec, cfg, i, x, cos, sin, masks[cfg.windows[i]])
        if spec.attn_out_norm:
            a = rms_norm(ops, spec, cfg, a, spec.attn_out_norm.format(i=i))
        h = ops.add(h, a)
        m = mlp(ops, spec, cfg, i, rms_norm(ops, spec, cfg, h, spec.mlp_norm.format(i=i)))
        if spec.mlp_out_norm:
            m = rms_norm(ops, spec, cfg, m, spec.mlp_out_norm.format(i=i))
        h = ops.add(h, m)
    h = rms_norm(ops, spec, cfg, ops.logit_positions(h), spec.final_norm)
    if cfg.tie_word_embeddings or not ops.has(spec.lm_head):
        out = ops.project(h, spec.embed)
    else:
        out = linear(ops, h, spec.lm_head.removesuffix(".weight"))
    if cfg.final_softcap:
        out = ops.downcast(softcap(ops, ops.upcast(out), cfg.final_softcap))
    return out


def linear(ops: Ops[V], x: V, prefix: str) -> V:
    """x @ W^T (+ b) of the Linear `prefix`; a bias is used where the checkpoint has one."""
    y = ops.project(x, f"{prefix}.weight")
    bias = f"{prefix}.bias"
    return ops.add(y, ops.vector(bias)) if ops.has(bias) else y


def rms_norm(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, x: V, weight: str,
             rank: int = 3) -> V:
    """x / sqrt(mean(x^2) + eps) in float32, then the weight: Llama casts back to the model
    dtype and multiplies; Gemma multiplies by (1 + w) in float32, then casts."""
    h = ops.upcast(x)
    var = ops.mean(ops.mul(h, h), axis=-1)
    h = ops.div(h, ops.sqrt(ops.add(var, ops.const(cfg.eps))))
    w = ops.vector(weight, rank)
    if spec.norm_style == "gemma":
        return ops.downcast(ops.mul(h, ops.add(ops.const(1.0), ops.upcast(w))))
    return ops.mul(ops.downcast(h), w)


def softcap(ops: Ops[V], x: V, cap: float) -> V:
    """cap * tanh(x / cap), in float32."""
    return ops.mul(ops.tanh(ops.mul(x, ops.const(1.0 / cap))), ops.const(cap))


def rotary(ops: Ops[V], table: RopeTable, position_ids: V) -> tuple[V, V]:
    """cos, sin [B, S, 1, dims] of the positions, computed in float32 like transformers; longrope
    takes its long frequencies for a row once its positions reach the switch (per row, so that a
    request's output does not depend on what shares its batch)."""
    pos = ops.unsqueeze(ops.int_to_float(position_ids), -1)  # [B, S, 1]
    inv_freq = ops.const(table.inv_freq)
    if table.long_inv_freq is not None:
        assert table.switch_at is not None
        length = ops.add(ops.max(pos, axis=1), ops.const(1.0))  # [B, 1, 1]
        inv_freq = ops.where(ops.greater(length, ops.const(float(table.switch_at))),
                             ops.const(table.long_inv_freq), inv_freq)  # [B, 1, dims/2]
    freqs = ops.mul(pos, inv_freq)  # [B, S, dims/2]
    emb = ops.unsqueeze(ops.concat([freqs, freqs], axis=-1), 2)  # [B, S, 1, dims]
    cos, sin = ops.cos(emb), ops.sin(emb)
    if table.scaling != 1.0:
        cos, sin = (ops.mul(t, ops.const(table.scaling)) for t in (cos, sin))
    return ops.downcast(cos), ops.downcast(sin)


def rope(ops: Ops[V], cfg: DecoderConfig, x: V, cos: V, sin: V, dims: int) -> V:
    """x [B, S, heads, hd]: its first `dims` as x * cos + rotate_half(x) * sin, the rest kept."""
    if dims < cfg.head_dim:
        rot, rest = ops.split(x, [dims, cfg.head_dim - dims], axis=-1)
        return ops.concat([rotate(ops, rot, cos, sin, dims), rest], axis=-1)
    return rotate(ops, x, cos, sin, dims)


def rotate(ops: Ops[V], x: V, cos: V, sin: V, dims: int) -> V:
    x1, x2 = ops.split(x, [dims // 2, dims // 2], axis=-1)
    rotated = ops.concat([ops.neg(x2), x1], axis=-1)
    return ops.add(ops.mul(x, cos), ops.mul(rotated, sin))


def projections(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, i: int, x: V) -> list[V]:
    """q, k, v [B, S, heads, hd] of layer i: three Linears, or one fused one split after it."""
    names = {p: t.format(i=i) for p, t in spec.attention.items()}
    hd, g = cfg.head_dim, cfg.kv_heads
    if "qkv" in names:
        qkv = ops.split(linear(ops, x, names["qkv"]), [cfg.heads * hd, g * hd, g * hd], axis=-1)
    else:
        qkv = [linear(ops, x, names[p]) for p in "qkv"]
    return [ops.reshape(t, [0, 0, n, hd]) for t, n in zip(qkv, (cfg.heads, g, g))]


def attention(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, i: int, x: V, cos: V, sin: V,
              allowed: V) -> V:
    """Grouped-query attention over the cache: the R query heads of a key/value head attend as
    one [R * S] block of queries, so keys and values are never repeated."""
    hd, g, dims = cfg.head_dim, cfg.kv_heads, cfg.rope[i].dims
    q, k, v = projections(ops, spec, cfg, i, x)  # [B, S, heads, hd]
    if spec.q_norm and spec.k_norm:
        q = rms_norm(ops, spec, cfg, q, spec.q_norm.format(i=i), rank=4)
        k = rms_norm(ops, spec, cfg, k, spec.k_norm.format(i=i), rank=4)
    q = ops.reshape(rope(ops, cfg, q, cos, sin, dims), [0, 0, g, cfg.heads_per_kv, hd])
    q = ops.transpose(q, [0, 2, 3, 1, 4])  # [B, G, R, S, hd]
    k = ops.transpose(rope(ops, cfg, k, cos, sin, dims), [0, 2, 1, 3])  # [B, G, S, hd]
    k_all, v_all = ops.cache(i, k, ops.transpose(v, [0, 2, 1, 3]))  # [B, G, T, hd]
    ctx = None if cfg.attn_softcap else ops.attend(q, k_all, v_all, allowed, cfg.windows[i],
                                                   cfg.attn_scale)
    if ctx is None:
        ctx = composed_attention(ops, cfg, q, k_all, v_all, allowed)  # [B, G, R, S, hd]
    ctx = ops.reshape(ops.transpose(ctx, [0, 3, 1, 2, 4]), [0, 0, -1])  # [B, S, H * hd]
    return linear(ops, ctx, spec.attention["o"].format(i=i))


def composed_attention(ops: Ops[V], cfg: DecoderConfig, q: V, k: V, v: V, allowed: V) -> V:
    """softmax(q k^T * scale) v [B, G, R, S, hd] in primitives: float32 scores and softmax."""
    kt = ops.unsqueeze(ops.transpose(k, [0, 1, 3, 2]), 2)  # [B, G, 1, hd, T]
    scores = ops.upcast(ops.matmul(q, kt))  # [B, G, R, S, T] float32
    scores = ops.mul(scores, ops.const(cfg.attn_scale))
    if cfg.attn_softcap:
        scores = softcap(ops, scores, cfg.attn_softcap)
    scores = ops.where(allowed, scores, ops.const(float(np.finfo(np.float32).min)))
    probs = ops.downcast(ops.softmax(scores, axis=-1))
    return ops.matmul(probs, ops.unsqueeze(v, 2))


def mlp(ops: Ops[V], spec: ArchSpec, cfg: DecoderConfig, i: int, x: V) -> V:
    """down(act(gate(x)) * up(x)); gate and up may be one fused Linear (gate first)."""
    names = {p: t.format(i=i) for p, t in spec.mlp.items()}
    if "gate_up" in names:
        gate, up = ops.split(linear(ops, x, names["gate_up"]), [cfg.intermediate] * 2, axis=-1)
    else:
        gate, up = linear(ops, x, names["gate"]), linear(ops, x, names["up"])
    return linear(ops, ops.mul(activation(ops, cfg, gate), up), names["down"])


def activation(ops: Ops[V], cfg: DecoderConfig, x: V) -> V:
    """SiLU: x * sigmoid(x). Tanh GELU (GeGLU), in float32:
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    if cfg.activation == "silu":
        return ops.mul(x, ops.sigmoid(x))
    h = ops.upcast(x)
    inner = ops.mul(ops.add(h, ops.mul(ops.mul(ops.mul(h, h), h), ops.const(0.044715))),
                    ops.const(float(np.sqrt(2.0 / np.pi))))
    return ops.downcast(ops.mul(ops.mul(h, ops.const(0.5)),
                                ops.add(ops.const(1.0), ops.tanh(inner))))
