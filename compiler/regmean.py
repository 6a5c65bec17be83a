"""Output-aware merging from calibration Grams (RegMean's closed form, per row and group).

With C_n the damped Gram of expert n's inputs to a Linear (calibration.py), the group G's merged
row minimising sum_{n in G} ||X_n (w - w_n)||^2 is w_G = (sum_G C_n)^-1 sum_G C_n w_n. Since every
expert shares the base, the same holds for deltas: m_G = A_G^-1 b_G with A_G = sum_G C_n and
b_G = sum_G C_n d_n. The output error of a partition is
    sum_n d_n^T C_n d_n - sum_G b_G^T A_G^-1 b_G,
so a row's best partition maximises the "explained" sum over its blocks; each block's term needs
only A_G^-1, which depends on the subset alone: at most 2^N - 1 inverses per tensor.

A tensor without Grams (embeddings, whose input is a one-hot token) uses C_n = I: then m_G is the
plain mean and the objective is the weight-space `error` clustering's (uniform weights).

Damping (GPTQ/RegMean style): C_n + damping * mean(diag C_n) * I, so A_G is always invertible.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch
    from chmc.compiler.grouping import RowBatch

MAX_SUBSET_EXPERTS = 8  # exhaustive subsets (2^N - 1 inverses) up to this N; above, a heuristic


class GramSolver:
    """One tensor's damped Grams [N, in, in] (None: identity) and its cached subset inverses."""

    def __init__(self, grams: torch.Tensor | None, n: int, damping: float):

        self.n = n
        self.c: torch.Tensor | None = None
        if grams is not None:
            c = grams.double()
            scale = c.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [N]
            c.diagonal(dim1=1, dim2=2).add_((damping * scale)[:, None])
            self.c = c.float()  # [N, in, in]
        self._inv: dict[int, torch.Tensor] = {}

    def inverse(self, mask: int) -> torch.Tensor:
        """(sum_{n in mask} C_n)^-1 [in, in] fp32, computed in fp64 once per subset."""
        import torch

        if mask not in self._inv:
            assert self.c is not None
            members = [i for i in range(self.n) if mask >> i & 1]
            a = self.c[members].double().sum(0)
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info):
                raise ChmcError("calibration Gram sum is not positive definite; raise the damping")
            self._inv[mask] = torch.cholesky_inverse(chol).float()
        return self._inv[mask]

    def weighted(self, deltas: torch.Tensor) -> torch.Tensor:
        """e_n = d_n C_n: [N, R, in] -> [N, R, in] (C symmetric)."""
        assert self.c is not None
        return deltas @ self.c

    def explained(self, batch: RowBatch, masks: list[int]) -> torch.Tensor:
        """b_G^T A_G^-1 b_G for each subset mask, per row: -> [R, S]. The identity case needs
        only the deltas' Gram [R, N, N] (b_G = sum d, A_G^-1 = I / |G|)."""
        import torch

        deltas = batch.deltas
        member = torch.tensor([[m >> i & 1 for i in range(self.n)] for m in masks],
                              dtype=torch.float32)  # [S, N]
        if self.c is None:
            quad = torch.einsum("sn,rnm,sm->rs", member, batch.gram, member)
            return quad / member.sum(1)
        e = self.weighted(deltas)  # [N, R, in]
        out = torch.empty((deltas.shape[1], len(masks)), dtype=torch.float32)
        for s, mask in enumerate(masks):
            if mask & (mask - 1) == 0:  # one member: b A^-1 b = d C d, no solve
                i = mask.bit_length() - 1
                out[:, s] = (e[i] * deltas[i]).sum(-1)
                continue
            b = torch.einsum("n,nri->ri", member[s], e)  # [R, in]
            out[:, s] = ((b @ self.inverse(mask)) * b).sum(-1)
        return out

    def total(self, batch: RowBatch) -> torch.Tensor:
        """sum_n d_n^T C_n d_n per row (the error of merging nothing, all deltas lost): -> [R]."""
        if self.c is None:
            return batch.gram.diagonal(dim1=1, dim2=2).sum(-1)
        return (self.weighted(batch.deltas) * batch.deltas).sum((0, 2))

    def merge(self, deltas: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """m_G for each row's groups: deltas [N, R, in], labels [R, N] -> [K, R, in]."""
        import torch

        n, r, width = deltas.shape
        out = torch.zeros((k, r, width), dtype=torch.float32)
        bits = 2 ** torch.arange(n)
        e = deltas if self.c is None or k >= n else self.weighted(deltas)  # [N, R, in]
        for g in range(k):
            masks = ((labels == g).long() * bits).sum(1)  # [R]: the subset in group g
            for mask in masks.unique().tolist():
                if mask == 0:
                    continue  # an empty group; copy_singletons fills it
                rows = (masks == mask).nonzero()[:, 0]
                members = [i for i in range(n) if mask >> i & 1]
                if len(members) == 1:  # the expert's own row (copy_singletons stores it exactly)
                    out[g, rows] = deltas[members[0], rows]
                    continue
                b = e[members][:, rows].sum(0)  # [r, in]
                out[g, rows] = b / len(members) if self.c is None else b @ self.inverse(mask)
        return out


@cache
def partition_subsets(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Partitions into <= k blocks [P, N] (set_partitions' order), their incidence on subset
    masks [P, S] and the masks 1..2^N-1 (S of them)."""
    import torch
    from chmc.compiler.grouping import set_partitions

    parts = set_partitions(n, k)
    masks = list(range(1, 2**n))
    incidence = torch.zeros((len(parts), len(masks)), dtype=torch.float32)
    for p, labels in enumerate(parts):
        for g in set(labels):
            mask = sum(1 << i for i, lab in enumerate(labels) if lab == g)
            incidence[p, mask - 1] = 1
    return torch.tensor(parts), incidence, masks


def best_partitions(solver: GramSolver, batch: RowBatch,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the partition into <= k groups with the least output error, and that error
    for every K' = 1..k: -> labels [R, N], errors [R, k]."""
    import torch

    n = solver.n
    parts, incidence, masks = partition_subsets(n, n)
    score = solver.explained(batch, masks) @ incidence.T  # [R, P]
    blocks = torch.tensor([max(p) + 1 for p in parts.tolist()])  # [P]
    total = solver.total(batch)  # [R]
    errors = torch.stack([total - score[:, blocks <= j].max(1).values for j in range(1, k + 1)], 1)
    allowed = score.masked_fill(blocks > k, float("-inf"))
    return parts[allowed.argmax(1)], errors.clamp_min(0)


def check_subset_count(n: int) -> None:
    if n > MAX_SUBSET_EXPERTS:
        raise ChmcError(f"output-error grouping and --budget enumerate subsets of experts: at most "
                        f"{MAX_SUBSET_EXPERTS} experts, got {n}")
