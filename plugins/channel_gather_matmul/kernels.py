"""Triton kernels for ChannelGatherMatMul: y = x @ W_e^T with W_e's rows read from the banks.

    y[b, s, c] = sum_i x[b, s, i] * bank[index[expert_id[b], c], c, i]

W_e is never materialised: each program looks up, per output channel, which bank row its expert
uses and streams that row straight from `bank`. Three kernels, one per regime:
  - `_gemv_kernel`  (decode, one row): a gather-GEMV, each needed bank row read once.
  - `_mixed_kernel` (few rows, any mix of experts): per channel block, for every group g it reads
    bank[g] rows only where some row of the batch needs them (masked loads skip the rest), so a
    channel costs at most K row reads whatever the batch size, then applies them with tl.dot; a
    tile whose rows share one expert makes one pass over that expert's rows instead.
  - `_gemm_kernel`  (prefill, many rows): a gather-GEMM per batch entry (one expert per entry).
    `_gemm_persistent_kernel` is the same GEMM scheduled persistently, with TMA loads of x: an
    opt-in candidate (`variant=`) until a GPU benchmark shows it beats `_gemm_kernel`.
fp32 accumulation; output in x's dtype. Every kernel takes (inputs, int32 scalars, output) in the
order TensorRT's AOT plugins launch them (see tensorrt_plugin.py), with contiguous tensors.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests), with one fixed config each.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import triton
import triton.language as tl

Mode = Literal["auto", "decode", "mixed", "prefill"]
MODES: tuple[str, ...] = ("auto", "decode", "mixed", "prefill")
Variant = Literal["default", "persistent", "persistent_tma", "persistent_flat",
                  "persistent_tma_flat"]
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
    e0 = tl.load(expert_id + (pid_m * BLOCK_M) // S)  # the tile's first row's expert
    e_or_e0 = tl.where(m_ok, e, e0)
    if tl.min(e_or_e0, axis=0) == tl.max(e_or_e0, axis=0):
        # one expert in the tile (a router's batch, one tenant's burst): one pass over the one
        # bank row each channel uses, not one per group
        row_g = tl.load(index + e0 * N_OUT + c, mask=c_ok, other=0).to(tl.int64)  # [BN]
        w_rows = bank + (row_g * N_OUT + c) * N_IN  # [BN]
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, N_IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            k_ok = k < N_IN
            a = tl.load(x + m[:, None] * N_IN + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BM, BK]
            w = tl.load(w_rows[:, None] + k[None, :], mask=c_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BN, BK]
            out = _dot_t(a, w, out, F32_DOT)
    else:
        grp = tl.load(index + e[:, None] * N_OUT + c[None, :], mask=tile_ok, other=-1)  # [BM, BN]
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(N_GROUPS):
            use = grp == g  # [BM, BN] rows that read bank[g] at channel c
            need = tl.max(use.to(tl.int32), axis=0) > 0  # [BN] channels some row needs bank[g] at
            w_rows = bank + (g * N_OUT + c.to(tl.int64)) * N_IN  # [BN]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, N_IN, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)  # [BK]
                k_ok = k < N_IN
                a = tl.load(x + m[:, None] * N_IN + k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                w = tl.load(w_rows[:, None] + k[None, :], mask=need[:, None] & k_ok[None, :],
                            other=0.0)  # [BN, BK], unneeded rows never leave memory
                acc = _dot_t(a, w, acc, F32_DOT)
            out = tl.where(use, acc, out)
    tl.store(y + m[:, None] * N_OUT + c[None, :], out.to(y.dtype.element_ty), mask=tile_ok)


@triton.jit
def _gemm_tile(x, x_desc, bank, index, expert_id, b, pid_m, pid_n, S, N_OUT, N_IN, y,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               F32_DOT: tl.constexpr, X_TMA: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y for batch entry b (int64), rows s of that entry; x tiles
    come through the TMA descriptor `x_desc` over x [B * S, in] when X_TMA."""
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
        if X_TMA:  # [BM, BK], zeros past the edges; rows past S (the next entry's) are not stored
            a = x_desc.load([(b * S + pid_m * BLOCK_M).to(tl.int32), k0])
        else:
            a = tl.load(x + rows[:, None] * N_IN + k[None, :], mask=s_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BM, BK]
        w = tl.load(w_rows[:, None] + k[None, :], mask=c_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BN, BK]
        acc = _dot_t(a, w, acc, F32_DOT)
    tl.store(y + rows[:, None] * N_OUT + c[None, :], acc.to(y.dtype.element_ty),
             mask=s_ok[:, None] & c_ok[None, :])


@triton.jit
def _gemm_kernel(x, bank, index, expert_id, S, N_OUT, N_IN, y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 F32_DOT: tl.constexpr):
    # grid: (cdiv(S, BLOCK_M), cdiv(N_OUT, BLOCK_N), B); one expert per batch entry b
    _gemm_tile(x, x, bank, index, expert_id, tl.program_id(2).to(tl.int64), tl.program_id(0),
               tl.program_id(1), S, N_OUT, N_IN, y, BLOCK_M, BLOCK_N, BLOCK_K, F32_DOT, False)


@triton.jit
def _gemm_persistent_kernel(x, bank, index, expert_id, S, N_OUT, N_IN, B, y,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            F32_DOT: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                            X_TMA: tl.constexpr, FLATTEN: tl.constexpr):
    """`_gemm_kernel`'s tiles, scheduled like a Hopper GEMM: one program per SM walks the tiles
    (no launch tail), GROUP_M row tiles share each weight tile while it is in L2, and X_TMA loads
    x tiles with the TMA unit (W's rows are gathered, so they stay pointer loads: Hopper's TMA
    has no row gather). FLATTEN fuses the tile and K loops into one pipelined loop, so the next
    tile's loads overlap this one's epilogue; Triton 3.6 then stages W through registers instead
    of cp.async (seen in sm_90 PTX), so the benchmark times both. No warp specialization: on
    sm_90 `tl.range(warp_specialize=True)` compiles to the same code for this loop."""
    # grid: (min(NUM_SMS, tiles),); tile t = (b, pid_m, pid_n), b-major, grouped within b
    tiles_m = tl.cdiv(S, BLOCK_M)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    per_b = tiles_m * tiles_n
    per_group = GROUP_M * tiles_n
    x_desc = x
    if X_TMA:  # x viewed as [B * S, in]
        x_desc = tl.make_tensor_descriptor(x, shape=[B * S, N_IN], strides=[N_IN, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    for t in tl.range(tl.program_id(0), B * per_b, NUM_SMS, flatten=FLATTEN):
        r = t % per_b
        first_m = (r // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        _gemm_tile(x, x_desc, bank, index, expert_id, (t // per_b).to(tl.int64),
                   first_m + r % group_m, (r % per_group) // group_m, S, N_OUT, N_IN, y,
                   BLOCK_M, BLOCK_N, BLOCK_K, F32_DOT, X_TMA)


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
# Prefill kernels: "default" is `_gemm_kernel` (also the one TensorRT embeds: the others need
# Triton's global scratch for their TMA descriptors); the rest are `_gemm_persistent_kernel` with
# these flags, candidates until a GPU benchmark (benchmarks/gpu_kernels.py) names a winner.
PREFILL_VARIANTS: dict[str, dict[str, bool]] = {
    "default": {},
    "persistent": {"X_TMA": False, "FLATTEN": False},
    "persistent_tma": {"X_TMA": True, "FLATTEN": False},
    "persistent_flat": {"X_TMA": False, "FLATTEN": True},
    "persistent_tma_flat": {"X_TMA": True, "FLATTEN": True},
}
GROUP_M = 8  # row tiles that take turns on one weight tile (L2 reuse)
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
    """triton.autotune over CANDIDATES, built on first use (CUDA only); mode "persistent" is
    `_gemm_persistent_kernel` over the prefill candidates, tuned per flag set."""
    if mode not in _TUNED:
        kind = "prefill" if mode == "persistent" else mode
        configs = [triton.Config(_meta(kind, c), num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in CANDIDATES[kind]]
        key = {"mixed": ["BLOCK_M"], "persistent": ["X_TMA", "FLATTEN"]}.get(mode, [])
        fn = _gemm_persistent_kernel if mode == "persistent" else KERNELS[mode]
        _TUNED[mode] = triton.autotune(configs=configs, key=["N_OUT", "N_IN", *key])(fn)
    return _TUNED[mode]


def _meta(mode: str, launch: Launch) -> dict[str, int]:
    meta = {"BLOCK_N": launch.block_n, "BLOCK_K": launch.block_k}
    if mode == "prefill":
        meta["BLOCK_M"] = launch.block_m
    return meta


def _check(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
           expert_id: torch.Tensor) -> None:
    if x.ndim != 3 or bank.ndim != 3 or index.ndim != 2 or expert_id.ndim != 1:
        raise ValueError(
            "expected x [B, S, in], bank [K, out, in], index [N, out], expert_id [B]; "
            f"got {tuple(x.shape)}, {tuple(bank.shape)}, {tuple(index.shape)}, "
            f"{tuple(expert_id.shape)}")
    if (x.shape[2] != bank.shape[2] or index.shape[1] != bank.shape[1]
            or expert_id.shape[0] != x.shape[0]):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, bank {tuple(bank.shape)}, "
                         f"index {tuple(index.shape)}, expert_id {tuple(expert_id.shape)}")
    if x.dtype != bank.dtype:
        raise ValueError(f"x is {x.dtype} but bank is {bank.dtype}")
    if not (x.is_cuda or interpreting()):
        raise ValueError("channel_gather_matmul runs on CUDA tensors "
                         "(or on CPU under TRITON_INTERPRET=1)")


def fixed_launch(kind: str, rows: int, launch: Launch | None = None) -> Launch:
    """The launch used without autotuning; the mixed kernel's BLOCK_M always follows the rows."""
    launch = launch or DEFAULTS[kind]
    if kind == "mixed":
        launch = replace(launch, block_m=mixed_block_m(rows))
    return launch


@functools.lru_cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's global scratch (device-side TMA descriptors live there), from torch's caching
    allocator, so launches inside CUDA-graph capture take it from the graph's pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator when none is set (per context; never at import)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def x_tma_ok(x: torch.Tensor) -> bool:
    """Whether the TMA can load x [B, S, in]: 16-byte aligned base and row stride."""
    return x.data_ptr() % 16 == 0 and x.shape[2] * x.element_size() % 16 == 0


def _prefill_persistent(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                        expert_id: torch.Tensor, y: torch.Tensor, variant: str,
                        fixed: dict[str, int], chosen: Launch, tune: bool) -> None:
    """Launch `_gemm_persistent_kernel`: one program per SM (3 under the interpreter, so each
    walks several tiles). Where the TMA cannot load x (`x_tma_ok`) it takes pointer loads."""
    batch, seq, n_in = x.shape
    n_out = bank.shape[1]
    args = (x, bank, index, expert_id, seq, n_out, n_in, batch, y)
    flags = dict(PREFILL_VARIANTS[variant])
    flags["X_TMA"] &= x_tma_ok(x)
    if flags["X_TMA"] and not interpreting():
        _ensure_allocator()
    sms = 3 if interpreting() else _sm_count(x.device.index or torch.cuda.current_device())
    consts = {**fixed, **flags, "GROUP_M": GROUP_M, "NUM_SMS": sms}

    def programs(meta: dict[str, int]) -> tuple[int]:
        tiles = batch * triton.cdiv(seq, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"])
        return (min(sms, tiles),)

    if tune:
        _tuned_kernel("persistent")[programs](*args, **consts)
        return
    meta = _meta("prefill", chosen)
    _gemm_persistent_kernel[programs(meta)](*args, **meta, **consts, num_warps=chosen.num_warps,
                                            num_stages=chosen.num_stages)


def channel_gather_matmul(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                          expert_id: torch.Tensor, *, mode: Mode = "auto", tuned: bool = True,
                          launch: Launch | None = None, out: torch.Tensor | None = None,
                          variant: Variant = "default") -> torch.Tensor:
    """y [B, S, out] = x [B, S, in] @ (bank [K, out, in] rows picked by index [N, out] for
    expert_id [B])^T.

    `index` should already be int32 and contiguous (convert once at load time: a conversion here
    allocates on every call). `mode` forces a kernel; "auto" picks from B and S. `tuned` autotunes
    block sizes on CUDA (first call per (out, in); warm up before CUDA-graph capture); `launch`
    fixes them instead. `variant` picks the prefill kernel (PREFILL_VARIANTS; other modes ignore
    it).
    """
    _check(x, bank, index, expert_id)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if variant not in PREFILL_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {tuple(PREFILL_VARIANTS)}")
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
    tune = tuned and launch is None and x.is_cuda and not interpreting()
    if kind == "prefill" and variant != "default":
        _prefill_persistent(x, bank, index, expert_id, y, variant, fixed, chosen, tune)
    elif tune:
        def tuned_grid(meta: dict[str, int]) -> tuple[int, int, int]:
            return grid(kind, Launch(meta.get("BLOCK_M", 1), meta["BLOCK_N"], meta["BLOCK_K"]),
                        batch, seq, n_out)
        _tuned_kernel(kind)[tuned_grid](*args, **fixed)
    else:
        KERNELS[kind][grid(kind, chosen, batch, seq, n_out)](
            *args, **_meta(kind, chosen), **fixed,
            num_warps=chosen.num_warps, num_stages=chosen.num_stages)
    return y
