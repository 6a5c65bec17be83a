"""Decode attention over a static KV cache that reads only its filled slots (Triton, CUDA).

A captured decode step has one cache capacity, which grows by doubling, so a cache is often up
to half empty; SDPA reads all of it. Here the filled length comes from device memory (the
query's own slot, the last filled one), so one captured graph serves every step and the programs
stop at that length: split-KV ("flash decoding"), CHUNK slots per program, then a kernel that
combines the splits. Semantics (Ops.attend at S = 1): q [B, G, R, hd], k and v [B, G, cap, hd],
mask [B, cap] (0: padding), slot [1] the query's slot -> softmax(q k^T * scale) v [B, G, R, hd]
over the slots <= slot where mask is set and (window > 0) slot - window < t.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

CHUNK = 256  # cache slots per program
BLOCK_T = 64  # slots per inner step
NEG = tl.constexpr(-1.0e30)  # a masked score: finite, so an empty split makes no NaN


@triton.jit
def _split_kernel(q, k, v, mask, slot, part_acc, part_ml, G, R, HD, CAP, scale, window,
                  sq_b, sq_g, sq_r, sk_b, sk_g, sk_t, sv_b, sv_g, sv_t, sm_b,
                  R_PAD: tl.constexpr, HD_PAD: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_T: tl.constexpr, F32_DOT: tl.constexpr):
    # grid: (B * G, cdiv(CAP, CHUNK)); partials [B * G, splits, R_PAD, HD_PAD] and (m, l)
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    n = tl.load(slot).to(tl.int32) + 1  # filled slots
    lo = tl.maximum(split * CHUNK, n - window)  # window = CAP + 1 when there is none
    hi = tl.minimum(split * CHUNK + CHUNK, n)
    r = tl.arange(0, R_PAD)
    d = tl.arange(0, HD_PAD)
    qv = tl.load(q + b * sq_b + g * sq_g + r[:, None] * sq_r + d[None, :],
                 mask=(r[:, None] < R) & (d[None, :] < HD), other=0.0)  # [R_PAD, HD_PAD]
    m_i = tl.full([R_PAD], NEG, tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, HD_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        inside = t < hi
        keep = inside & (tl.load(mask + b * sm_b + t, mask=inside, other=0) != 0)
        tile = inside[:, None] & (d[None, :] < HD)
        kt = tl.load(k + b * sk_b + g * sk_g + t[:, None] * sk_t + d[None, :], mask=tile,
                     other=0.0)  # [BLOCK_T, HD_PAD]
        if F32_DOT:
            s = tl.dot(qv.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(qv, tl.trans(kt))
        s = tl.where(keep[None, :], s * scale, NEG)  # [R_PAD, BLOCK_T]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.where(keep[None, :], tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v + b * sv_b + g * sv_g + t[:, None] * sv_t + d[None, :], mask=tile,
                     other=0.0)
        if F32_DOT:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    row = (bg * tl.num_programs(1) + split) * R_PAD + r  # [R_PAD]
    tl.store(part_acc + row[:, None] * HD_PAD + d[None, :], acc)
    tl.store(part_ml + row * 2, m_i)
    tl.store(part_ml + row * 2 + 1, l_i)


@triton.jit
def _combine_kernel(part_acc, part_ml, out, G, R, HD, SPLITS, so_b, so_g, so_r,
                    R_PAD: tl.constexpr, HD_PAD: tl.constexpr):
    # grid: (B * G,); out [B, G, R, hd] in its dtype
    bg = tl.program_id(0)
    r = tl.arange(0, R_PAD)
    d = tl.arange(0, HD_PAD)
    m = tl.full([R_PAD], NEG, tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(part_ml + ((bg * SPLITS + s) * R_PAD + r) * 2))
    num = tl.zeros([R_PAD, HD_PAD], tl.float32)
    den = tl.zeros([R_PAD], tl.float32)
    for s in range(SPLITS):
        row = (bg * SPLITS + s) * R_PAD + r
        w = tl.exp(tl.load(part_ml + row * 2) - m)
        den += w * tl.load(part_ml + row * 2 + 1)
        num += w[:, None] * tl.load(part_acc + row[:, None] * HD_PAD + d[None, :])
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    ok = (r[:, None] < R) & (d[None, :] < HD)
    tl.store(out + b * so_b + g * so_g + r[:, None] * so_r + d[None, :],
             (num / den[:, None]).to(out.dtype.element_ty), mask=ok)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     slot: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """Attention of one new token per row over the filled part of the cache (module docstring);
    the last dim of every tensor contiguous."""
    batch, groups, r, hd = q.shape
    cap = k.shape[2]
    splits = triton.cdiv(cap, CHUNK)
    r_pad, hd_pad = max(16, triton.next_power_of_2(r)), max(16, triton.next_power_of_2(hd))
    part_acc = torch.empty(batch * groups * splits * r_pad, hd_pad, dtype=torch.float32,
                           device=q.device)
    part_ml = torch.empty(batch * groups * splits * r_pad, 2, dtype=torch.float32,
                          device=q.device)
    out = torch.empty_like(q)
    f32 = q.dtype == torch.float32 or q.device.type == "cpu"  # the interpreter's bf16 dot
    _split_kernel[(batch * groups, splits)](
        q, k, v, mask, slot, part_acc, part_ml, groups, r, hd, cap, scale,
        window if window > 0 else cap + 1, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        mask.stride(0), R_PAD=r_pad, HD_PAD=hd_pad, CHUNK=CHUNK, BLOCK_T=BLOCK_T, F32_DOT=f32)
    _combine_kernel[(batch * groups,)](part_acc, part_ml, out, groups, r, hd, splits,
                                       *out.stride()[:3], R_PAD=r_pad, HD_PAD=hd_pad)
    return out


@functools.cache
def decode_attention_op() -> Any:
    """`torch.ops.chmc.decode_attention`, one opaque node to torch.compile; registered on first
    use."""
    op = torch.library.custom_op(
        "chmc::decode_attention", decode_attention, mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor slot, float scale, "
               "int window) -> Tensor")
    op.register_fake(lambda q, k, v, mask, slot, scale, window: torch.empty_like(q))
    return op
