"""Reference semantics of ChannelGatherMatMul (shared with the GPU kernels; keep exactly):

    y[b, s, c] = sum_i x[b, s, i] * bank[index[expert_id[b], c], c, i]

x [B, S, in], bank [K, out, in], index [N, out] int32, expert_id [B] int64 -> y [B, S, out] in x's
dtype. No bias (biases stay a separate Gather + Add). Rows of one expert share one gathered weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def check_shapes(x: Any, bank: Any, index: Any, expert_id: Any) -> None:
    """Shapes and ranges, as the plugin checks them; a ValueError names the offending value."""
    if (len(x.shape) != 3 or len(bank.shape) != 3 or len(index.shape) != 2
            or len(expert_id.shape) != 1):
        raise ValueError(f"ChannelGatherMatMul: ranks x {len(x.shape)}, bank {len(bank.shape)}, "
                         f"index {len(index.shape)}, expert_id {len(expert_id.shape)}; "
                         "want 3, 3, 2, 1")
    if (x.shape[2] != bank.shape[2] or index.shape[1] != bank.shape[1]
            or x.shape[0] != expert_id.shape[0]):
        raise ValueError(f"ChannelGatherMatMul: x {tuple(x.shape)}, bank {tuple(bank.shape)}, "
                         f"index {tuple(index.shape)}, expert_id {tuple(expert_id.shape)} disagree")
    if len(expert_id) and not (int(expert_id.min()) >= 0 and int(expert_id.max()) < index.shape[0]):
        raise ValueError(f"ChannelGatherMatMul: expert_id {expert_id.tolist()} out of range "
                         f"[0, {index.shape[0]})")


def channel_gather_matmul(x: np.ndarray, bank: np.ndarray, index: np.ndarray,
                          expert_id: np.ndarray) -> np.ndarray:
    """NumPy reference: per distinct expert, gather its weight rows once, then one matmul."""
    check_shapes(x, bank, index, expert_id)
    y = np.empty((*x.shape[:2], bank.shape[1]), dtype=x.dtype)
    rows = np.arange(bank.shape[1])
    for e in np.unique(expert_id):
        sel = expert_id == e
        w = bank[index[e].astype(np.int64), rows]  # [out, in]
        y[sel] = np.matmul(x[sel], w.T)
    return y


def channel_gather_matmul_torch(x: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                                expert_id: torch.Tensor) -> torch.Tensor:
    """The same in PyTorch (any device): per-row gathered weights, [B, out, in], then bmm."""
    import torch

    check_shapes(x, bank, index, expert_id)
    bank_of = index[expert_id].long()  # [B, out]: each channel's bank per row
    w = bank[bank_of, torch.arange(bank.shape[1], device=bank.device)]  # [B, out, in]
    return torch.matmul(x, w.transpose(1, 2))  # [B, S, out]
