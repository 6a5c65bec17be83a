"""Triton kernels for ChannelGatherMatMul: y = x @ W_e^T with W_e's rows read from the banks.

    y[b, s, c] = sum_i x[b, s, i] * bank[index[expert_id[b], c], c, i]

W_e is never materialised: each program looks up, per output channel, which bank row its expert
uses and streams that row straight from `bank`. Three kernels, one per regime:
  - `_gemv_kernel`  (decode, one row): a gather-GEMV, each needed bank row read once.
  - `_mixed_kernel` (few rows, any mix of experts): per channel block, for every group g it reads
    bank[g] rows only where some row of the batch needs them (masked loads skip the rest), so a
    channel costs at most K row reads whatever the batch size, then applies them with tl.dot.
  - `_gemm_kernel`  (prefill, many rows): a gather-GEMM per batch entry (one expert per entry).
fp32 accumulation; output in x's dtype. Every kernel takes (inputs, int32 scalars, output) in the
order TensorRT's AOT plugins launch them (see tensorrt_plugin.py), with contiguous tensors.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests), with one fixed config each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import triton
import triton.language as tl

Mode = Literal["auto", "decode", "mixed", "prefill"]
MODES: tuple[str, ...] = ("auto", "decode", "mixed", "prefill")
PREFILL_MIN_ROWS = 16  # per batch entry; below this the batch is served by the mixed kernel


@triton.jit
def _gemv_kernel(x, bank, index, expert_id, S, N_OUT, N_IN, y,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr):
    # grid: (cdiv(N_OUT, BLOCK_N), B * S); one row of x per program
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    e = tl.load(expert_id + row // S)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    c_ok = c < N_OUT
    g = tl.load(index + e * N_OUT + c, mask=c_ok, other=0).to(tl.int64)  # [BN] bank row per channel
    w_rows = bank + (g * N_OUT + c) * N_IN  # [BN] pointers to the gathered rows
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, N_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = k < N_IN
        xk = tl.load(x + row * N_IN + k, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
        w = tl.load(w_rows[:, None] + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * xk[None, :]  # [BN, BK]
    out = tl.sum(acc, axis=1)  # [BN]
    tl.store(y + row * N_OUT + c, out.to(y.dtype.element_ty), mask=c_ok)


@triton.jit
def _dot_t(a, b, acc, F32_DOT: tl.constexpr):
    """acc + a @ b^T. F32_DOT: products in IEEE fp32, for fp32 inputs (no TF32 rounding) and for
    bf16 under the CPU interpreter (whose bf16 dot is wrong)."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _mixed_kernel(x, bank, index, expert_id, S, N_OUT, N_IN, N_GROUPS, M, y,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  F32_DOT: tl.constexpr):
    # grid: (cdiv(N_OUT, BLOCK_N), cdiv(M, BLOCK_M)); rows m of the flattened [B * S] batch
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    m_ok = m < M
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    c_ok = c < N_OUT
    e = tl.load(expert_id + m // S, mask=m_ok, other=0)  # [BM] each row's expert
    tile_ok = m_ok[:, None] & c_ok[None, :]
    grp = tl.load(index + e[:, None] * N_OUT + c[None, :], mask=tile_ok, other=-1)  # [BM, BN]
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(N_GROUPS):
        use = grp == g  # [BM, BN] rows that read bank[g] at channel c
        need = tl.max(use.to(tl.int32), axis=0) > 0  # [BN] channels where some row needs bank[g]
        w_rows = bank + (g * N_OUT + c.to(tl.int64)) * N_IN  # [BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, N_IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            k_ok = k < N_IN
            a = tl.load(x + m[:, None] * N_IN + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BM, BK]
            w = tl.load(w_rows[:, None] + k[None, :], mask=need[:, None] & k_ok[None, :],
                        other=0.0)  # [BN, BK], unneeded rows never leave memory
            acc = _dot_t(a, w, acc, F32_DOT)
        out = tl.where(use, acc, out)
    tl.store(y + m[:, None] * N_OUT + c[None, :], out.to(y.dtype.element_ty), mask=tile_ok)


@triton.jit
def _gemm_kernel(x, bank, index, expert_id, S, N_OUT, N_IN, y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 F32_DOT: tl.constexpr):
    # grid: (cdiv(S, BLOCK_M), cdiv(N_OUT, BLOCK_N), B); one expert per batch entry b
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    e = tl.load(expert_id + b)
    s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    s_ok = s < S
    rows = b * S + s  # [BM] rows of the flattened batch
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    c_ok = c < N_OUT
    g = tl.load(index + e * N_OUT + c, mask=c_ok, other=0).to(tl.int64)  # [BN]
    w_rows = bank + (g * N_OUT + c) * N_IN  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = k < N_IN
        a = tl.load(x + rows[:, None] * N_IN + k[None, :], mask=s_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        w = tl.load(w_rows[:, None] + k[None, :], mask=c_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BN, BK]
        acc = _dot_t(a, w, acc, F32_DOT)
    tl.store(y + rows[:, None] * N_OUT + c[None, :], acc.to(y.dtype.element_ty),
             mask=s_ok[:, None] & c_ok[None, :])


@dataclass(frozen=True)
class Launch:
    """Block sizes and launch options of one kernel; also what the TensorRT AOT plugin compiles."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Defaults: starting points for Hopper, used as-is by the AOT plugin and the interpreter.
# On CUDA, `tuned=True` lets triton.autotune pick among CANDIDATES once per shape. Decode and
# mixed steps are memory-bound: narrow channel blocks (BLOCK_N) give enough programs to fill
# every SM when out = 4096 (4096 / 32 = 128 programs, 4096 / 16 = 256).
DEFAULTS: dict[str, Launch] = {
    "decode": Launch(1, 32, 256, num_warps=4, num_stages=3),
    "mixed": Launch(16, 32, 128, num_warps=4, num_stages=3),
    "prefill": Launch(128, 128, 64, num_warps=8, num_stages=3),
}
CANDIDATES: dict[str, list[Launch]] = {
    "decode": [Launch(1, n, k, w, st) for n, k, w in
               [(16, 256, 4), (32, 256, 4), (64, 128, 4), (32, 512, 8), (64, 256, 8), (8, 512, 4),
                (8, 1024, 4), (4, 1024, 4)]
               for st in (2, 4)],
    "mixed": [Launch(16, n, k, w, st) for n, k, w in [(16, 128, 4), (16, 256, 4), (32, 128, 4),
                                                      (32, 256, 4), (64, 128, 4), (64, 64, 4)]
              for st in (3, 4)],
    "prefill": [Launch(m, n, k, w, st) for m, n, k, w, st in
                [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                 (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                 (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 128, 128, 8, 3),
                 (256, 128, 32, 8, 5), (128, 256, 32, 8, 5)]],
}
KERNELS: dict[str, Any] = {"decode": _gemv_kernel, "mixed": _mixed_kernel, "prefill": _gemm_kernel}
_TUNED: dict[str, Any] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_mode(batch: int, seq: int) -> str:
    """Pick the kernel from shapes alone (no host sync, so the choice is CUDA-graph safe)."""
    if batch * seq == 1:
        return "decode"
    if seq >= PREFILL_MIN_ROWS:
        return "prefill"
    return "mixed"


def mixed_block_m(rows: int) -> int:
    """tl.dot needs at least 16 rows; small batches pad up to the next power of two, max 64."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def grid(mode: str, launch: Launch, batch: int, seq: int, n_out: int) -> tuple[int, int, int]:
    cdiv = triton.cdiv
    if mode == "decode":
        return (cdiv(n_out, launch.block_n), batch * seq, 1)
    if mode == "mixed":
        return (cdiv(n_out, launch.block_n), cdiv(batch * seq, launch.block_m), 1)
    return (cdiv(seq, launch.block_m), cdiv(n_out, launch.block_n), batch)


def _tuned_kernel(mode: str) -> Any:
    """triton.autotune over CANDIDATES, built on first use (CUDA only)."""
    if mode not in _TUNED:
        configs = [triton.Config(_meta(mode, c), num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in CANDIDATES[mode]]
        _TUNED[mode] = triton.autotune(configs=configs, key=["N_OUT", "N_IN", "BLOCK_M"]
                                       if mode == "mixed" else ["N_OUT", "N_IN"])(KERNELS[mode])
    return _TUNED[mode]


def _meta(mode: str, launch: Launch) -> dict[str, int]:
    meta = {"BLOCK_N": launch.block_n, "BLOCK_K": launch.block_k}
    if mode == "prefill":
        meta["BLOCK_M"] = launch.block_m
    return meta


def _check(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, expert_id: torch.Tensor) -> None:
    if x.ndim != 3 or bank.ndim != 3 or index.ndim != 2 or expert_id.ndim != 1:
        raise ValueError(f"expected x [B, S, in], bank [K, out, in], index [N, out], expert_id [B]; "
                         f"got {tuple(x.shape)}, {tuple(bank.shape)}, {tuple(index.shape)}, "
                         f"{tuple(expert_id.shape)}")
    if x.shape[2] != bank.shape[2] or index.shape[1] != bank.shape[1] or expert_id.shape[0] != x.shape[0]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, bank {tuple(bank.shape)}, "
                         f"index {tuple(index.shape)}, expert_id {tuple(expert_id.shape)}")
    if x.dtype != bank.dtype:
        raise ValueError(f"x is {x.dtype} but bank is {bank.dtype}")
    if not (x.is_cuda or interpreting()):
        raise ValueError("channel_gather_matmul runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")


def fixed_launch(kind: str, rows: int, launch: Launch | None = None) -> Launch:
    """The launch used without autotuning; the mixed kernel's BLOCK_M always follows the rows."""
    launch = launch or DEFAULTS[kind]
    if kind == "mixed":
        launch = replace(launch, block_m=mixed_block_m(rows))
    return launch


def channel_gather_matmul(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                          expert_id: torch.Tensor, *, mode: Mode = "auto", tuned: bool = True,
                          launch: Launch | None = None, out: torch.Tensor | None = None,
                          ) -> torch.Tensor:
    """y [B, S, out] = x [B, S, in] @ (bank [K, out, in] rows picked by index [N, out] for expert_id [B])^T.

    `index` should already be int32 and contiguous (convert once at load time: a conversion here
    allocates on every call). `mode` forces a kernel; "auto" picks from B and S. `tuned` autotunes
    block sizes on CUDA (first call per (out, in); warm up before CUDA-graph capture); `launch`
    fixes them instead.
    """
    _check(x, bank, index, expert_id)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    batch, seq, n_in = x.shape
    n_groups, n_out, _ = bank.shape
    x, bank = x.contiguous(), bank.contiguous()
    index = index.to(torch.int32).contiguous()
    expert_id = expert_id.to(torch.int64).contiguous()
    y = out if out is not None else torch.empty(batch, seq, n_out, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    kind = choose_mode(batch, seq) if mode == "auto" else mode
    chosen = fixed_launch(kind, batch * seq, launch)
    scalars = (seq, n_out, n_in) + ((n_groups, batch * seq) if kind == "mixed" else ())
    args = (x, bank, index, expert_id, *scalars, y)
    fixed: dict[str, int] = {  # F32_DOT: IEEE fp32 products, see _dot_t
        "F32_DOT": x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)}
    if kind == "mixed":  # the batch size fixes BLOCK_M; autotuning picks only N and K blocks
        fixed["BLOCK_M"] = chosen.block_m
    if tuned and launch is None and x.is_cuda and not interpreting():
        def tuned_grid(meta: dict[str, int]) -> tuple[int, int, int]:
            return grid(kind, Launch(meta.get("BLOCK_M", 1), meta["BLOCK_N"], meta["BLOCK_K"]),
                        batch, seq, n_out)
        _tuned_kernel(kind)[tuned_grid](*args, **fixed)
    else:
        KERNELS[kind][grid(kind, chosen, batch, seq, n_out)](
            *args, **_meta(kind, chosen), **fixed,
            num_warps=chosen.num_warps, num_stages=chosen.num_stages)
    return y
