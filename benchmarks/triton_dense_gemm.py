"""A control for benchmarks/gpu_kernels.py: the best plain Triton GEMM we know how to write.

y [M, N] = x [M, K] @ w [N, K]^T on a dense weight, both operands and the output through TMA
tensor descriptors, persistent over the SMs with grouped tile order (the shape of Triton's
persistent-matmul tutorial). Nothing is gathered, so its time against cuBLAS is the ceiling any
Triton ChannelGatherMatMul prefill kernel can reach on this GPU and Triton: if this control is
itself above the 1.10x goal, no gather-GEMM written in Triton will meet it.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def _dense_tma_gemm(x, w, y, M, N, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(x, shape=[M, K], strides=[K, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y, shape=[M, N], strides=[N, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    for t in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=FLATTEN):
        first_m = (t // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + t % group_m
        pid_n = (t % per_group) // group_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([pid_m * BLOCK_M, k0])  # [BM, BK]
            b = w_desc.load([pid_n * BLOCK_N, k0])  # [BN, BK]
            acc = tl.dot(a, b.T, acc)
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y.dtype.element_ty))


def dense_tma_gemm(x: Any, w: Any, y: Any, launch: Any, sms: int, flatten: bool) -> Any:
    """y [..., N] = x [..., K] @ w [N, K]^T; `launch` a kernels.Launch. Needs an allocator set
    for the descriptors (kernels sets one for its TMA variants: call one of those first, or
    triton.set_allocator)."""
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    n = w.shape[0]
    tiles = triton.cdiv(m, launch.block_m) * triton.cdiv(n, launch.block_n)
    _dense_tma_gemm[(min(sms, tiles),)](
        x, w, y, m, n, k, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k, GROUP_M=8, NUM_SMS=sms, FLATTEN=flatten,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return y
