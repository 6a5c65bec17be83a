"""ChannelGatherMatMul on torch tensors: `implementation(device)`, the Triton kernels on CUDA and
the PyTorch reference elsewhere, and the same as a torch custom op,
`torch.ops.chmc.channel_gather_matmul` (`torch_op()`): one opaque node to torch.compile, which
fuses what lies between such nodes (norms, RoPE, casts) but must not trace into the Triton
kernels' launcher (autotuning, Python-side dispatch).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from chmc.plugins.channel_gather_matmul.reference import channel_gather_matmul_torch

SCHEMA = "(Tensor x, Tensor bank, Tensor index, Tensor expert_id) -> Tensor"


def implementation(device: torch.device) -> Any:
    """The ChannelGatherMatMul function for tensors on `device`."""
    if device.type == "cuda":  # triton is on CUDA machines only
        from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

        return channel_gather_matmul
    return channel_gather_matmul_torch


def _run(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
         expert_id: torch.Tensor) -> torch.Tensor:
    return implementation(x.device)(x, bank, index, expert_id)


def _shape(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
           expert_id: torch.Tensor) -> torch.Tensor:
    """The output's shape and dtype, for tracing: y [B, S, out] in x's dtype."""
    return x.new_empty((*x.shape[:-1], bank.shape[1]))


@functools.cache
def torch_op() -> Any:
    """The op, registered on first use (not at import: the package imports without it)."""
    op = torch.library.custom_op("chmc::channel_gather_matmul", _run, mutates_args=(),
                                 schema=SCHEMA)
    op.register_fake(_shape)
    return op
