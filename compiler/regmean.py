"""Output-aware merging from calibration Grams (RegMean's closed form, per row and group).

With C_n the damped Gram of expert n's inputs to a Linear (calibration.py), the group G's merged
row minimising sum_{n in G} ||X_n (w - w_n)||^2 is w_G = (sum_G C_n)^-1 sum_G C_n w_n. Since every
expert shares the base, the same holds for deltas: m_G = A_G^-1 b_G with A_G = sum_G C_n and
b_G = sum_G C_n d_n. The output error of a partition is
    sum_n d_n^T C_n d_n - sum_G b_G^T A_G^-1 b_G,
so a row's best partition maximises the "explained" sum over its blocks; each block's term needs
only A_G's Cholesky factor L_G (b^T A^-1 b = ||L^-1 b||^2, one triangular solve), which depends on
the subset alone: at most 2^N - 1 factorisations per tensor, shared by all its row blocks.

A tensor without Grams (embeddings, whose input is a one-hot token) uses C_n = I: then m_G is the
plain mean and the objective is the weight-space `error` clustering's (uniform weights).

Damping (GPTQ/RegMean style): C_n + damping * mean(diag C_n) * I, so A_G is always invertible.
More damping pulls each merged row toward the plain mean of its group (the weight-space merge);
DAMPING was chosen on the tiny families' validation splits (benchmarks/results/quality).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

from chmc.compiler.partitions import set_partitions
from chmc.errors import ChmcError

DAMPING = 1e-3  # x mean(diag C): 1e-2 kept up to 13 points less, 1e-5 lost on `distinct`
MAX_SUBSET_EXPERTS = 8  # exhaustive subsets (2^N - 1 factors) up to this N; above, a heuristic
MEMO_SUBSETS = 32  # subset sums kept per row block (32 x a block's [R, in]: ~128 MiB at most)
HEURISTIC_CACHE_BYTES = 1 << 30  # above it, the heuristic's factors are kept FIFO up to this size


@dataclass
class RowBatch:
    """The experts' row deltas for a block of rows, plus what the clusterings and the Gram solver
    share."""

    deltas: torch.Tensor  # [N, R, in] fp32
    weights: torch.Tensor  # [N] fp32 merge weights (the `error` cost uses the weighted mean)
    calib: GramSolver | None = None  # calibration Grams of this tensor, if any
    _gram: torch.Tensor | None = field(default=None, repr=False)

    @property
    def gram(self) -> torch.Tensor:
        """G[r, n, m] = <d_n[r], d_m[r]>, [R, N, N]."""
        if self._gram is None:
            d = self.deltas.permute(1, 0, 2)  # [R, N, in]
            self._gram = d @ d.transpose(1, 2)
        return self._gram


class GramSolver:
    """One tensor's damped Grams [N, in, in] (None: identity) and its cached subset factors."""

    def __init__(self, grams: torch.Tensor | None, n: int, damping: float):
        self.n = n
        self.c: torch.Tensor | None = None
        if grams is not None:
            c = grams.double()
            scale = c.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [N]
            c.diagonal(dim1=1, dim2=2).add_((damping * scale)[:, None])
            self.c = c.float()  # [N, in, in]
        self._factors: dict[int, torch.Tensor] = {}

    def factor(self, mask: int) -> torch.Tensor:
        """Lower Cholesky factor of sum_{n in mask} C_n [in, in], fp32. Factorised in fp64 once
        per subset: the damping bounds A's condition number only by about width / damping, too
        much for an fp32 factorisation; the triangular solves with it run in fp32 (a merged
        row's relative error grows with it: 8e-6 at 0.01, 8e-5 at 1e-3 on the tests' family)."""
        if mask not in self._factors:
            assert self.c is not None
            if self.n > MAX_SUBSET_EXPERTS:  # the heuristic meets many subsets: bounded FIFO
                limit = max(1, HEURISTIC_CACHE_BYTES // (4 * self.c.shape[1] ** 2))
                while len(self._factors) >= limit:
                    self._factors.pop(next(iter(self._factors)))
            members = [i for i in range(self.n) if mask >> i & 1]
            a = self.c[members[0]].double()  # [in, in]; summed in place, no [|G|, in, in] copy
            for i in members[1:]:
                a += self.c[i]
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info):
                raise ChmcError("calibration Gram sum is not positive definite; raise the damping")
            self._factors[mask] = chol.float()
        return self._factors[mask]

    def half_solve(self, mask: int, b: torch.Tensor) -> torch.Tensor:
        """y = b L^-T for rows b [R, in] (so ||y||^2 = b A^-1 b^T): one triangular solve."""
        return torch.linalg.solve_triangular(self.factor(mask).T, b, upper=True, left=False)

    def solve(self, mask: int, b: torch.Tensor) -> torch.Tensor:
        """m = b A^-1 for rows b [R, in]: two triangular solves with the subset's factor."""
        y = self.half_solve(mask, b)
        return torch.linalg.solve_triangular(self.factor(mask), y, upper=False, left=False)

    def weighted(self, deltas: torch.Tensor) -> torch.Tensor:
        """e_n = d_n C_n: [N, R, in] -> [N, R, in] (C symmetric); identity: the deltas."""
        return deltas if self.c is None else deltas @ self.c

    def group_explained(self, deltas: torch.Tensor, e: torch.Tensor, mask: int,
                        sums: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """b_G^T A_G^-1 b_G for one subset, per row: deltas and e = weighted(deltas) [N, R, in]
        -> [R]. One member: d C d, no solve; identity: ||sum d||^2 / |G|. `sums` keeps the
        subsets' b_G of this block so that each costs one addition."""
        if mask & (mask - 1) == 0:
            i = mask.bit_length() - 1
            return (e[i] * deltas[i]).sum(-1)
        b = _subset_sum(e, mask, {} if sums is None else sums)  # [R, in]
        if self.c is None:
            return b.square().sum(-1) / mask.bit_count()
        return self.half_solve(mask, b).square().sum(-1)

    def explained(self, batch: RowBatch, masks: list[int],
                  e: torch.Tensor | None = None) -> torch.Tensor:
        """b_G^T A_G^-1 b_G for each subset mask, per row: -> [R, S]. The identity case needs
        only the deltas' Gram [R, N, N] (b_G = sum d, A_G^-1 = I / |G|)."""
        if self.c is None:
            member = torch.tensor([[m >> i & 1 for i in range(self.n)] for m in masks],
                                  dtype=torch.float32)  # [S, N]
            quad = torch.einsum("sn,rnm,sm->rs", member, batch.gram, member)
            return quad / member.sum(1)
        e = self.weighted(batch.deltas) if e is None else e  # [N, R, in]
        sums: dict[int, torch.Tensor] = {}
        return torch.stack([self.group_explained(batch.deltas, e, m, sums) for m in masks], 1)

    def total(self, batch: RowBatch, e: torch.Tensor | None = None) -> torch.Tensor:
        """sum_n d_n^T C_n d_n per row (the error of merging nothing, all deltas lost): -> [R]."""
        if self.c is None:
            return batch.gram.diagonal(dim1=1, dim2=2).sum(-1)
        e = self.weighted(batch.deltas) if e is None else e
        return (e * batch.deltas).sum((0, 2))

    def partition_error(self, batch: RowBatch, labels: torch.Tensor,
                        e: torch.Tensor | None = None) -> torch.Tensor:
        """Output error of any labelling [R, N] (groups may be empty or unnumbered): -> [R]."""
        e = self.weighted(batch.deltas) if e is None else e
        explained = torch.zeros(labels.shape[0], dtype=torch.float32)
        for rows, mask in _subsets(labels):
            explained[rows] += self.group_explained(batch.deltas[:, rows], e[:, rows], mask)
        return self.total(batch, e) - explained

    def merge(self, deltas: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """m_G for each row's groups: deltas [N, R, in], labels [R, N] -> [K, R, in]."""
        n, r, width = deltas.shape
        out = torch.zeros((k, r, width), dtype=torch.float32)
        for rows, mask in _subsets(labels):
            members = [i for i in range(n) if mask >> i & 1]
            rows_of = [deltas[i].index_select(0, rows) for i in members]  # |G| x [r, in]
            g = int(labels[rows[0], members[0]])
            if len(members) == 1:  # the expert's own row (copy_singletons stores it exactly)
                merged = rows_of[0]
            elif self.c is None:
                merged = torch.stack(rows_of).mean(0)
            else:
                b = rows_of[0] @ self.c[members[0]]  # [r, in]: only the members' products
                for i, d in zip(members[1:], rows_of[1:]):
                    b.addmm_(d, self.c[i])
                merged = self.solve(mask, b)
            out[g].index_copy_(0, rows, merged)
        return out


def _subsets(labels: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """(rows, mask) for every non-empty group of every row, rows sharing a subset together."""
    n = labels.shape[1]
    bits = 2 ** torch.arange(n)
    out = []
    for g in labels.unique().tolist():
        masks = ((labels == g).long() * bits).sum(1)  # [R]: the subset in group g
        for mask in masks.unique().tolist():
            if mask:
                out.append(((masks == mask).nonzero()[:, 0], mask))
    return out


def _subset_sum(e: torch.Tensor, mask: int, sums: dict[int, torch.Tensor]) -> torch.Tensor:
    """sum_{n in mask} e[n] -> [R, in], from the subset without its highest member (memoised in
    `sums`, at most MEMO_SUBSETS of them per block)."""
    if mask in sums:
        return sums[mask]
    top = mask.bit_length() - 1
    rest = mask ^ (1 << top)
    if rest == 0:
        return e[top]
    b = _subset_sum(e, rest, sums) + e[top]
    if len(sums) < MEMO_SUBSETS:
        sums[mask] = b
    return b


@cache
def partition_subsets(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Partitions into <= k blocks [P, N] (set_partitions' order), their incidence on the
    subset masks they use [P, S] and those masks (S of them, ascending)."""
    parts = set_partitions(n, k)
    blocks = [{sum(1 << i for i, lab in enumerate(p) if lab == g) for g in set(p)} for p in parts]
    masks = sorted(set().union(*blocks))
    column = {m: s for s, m in enumerate(masks)}
    incidence = torch.zeros((len(parts), len(masks)), dtype=torch.float32)
    for p, used in enumerate(blocks):
        for m in used:
            incidence[p, column[m]] = 1
    return torch.tensor(parts), incidence, masks


def best_partitions(solver: GramSolver, batch: RowBatch,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the partition into <= k groups with the least output error, that error for
    every K' = 1..k, and the error of merging nothing: -> labels [R, N], errors [R, k], total [R].
    Only the subsets of partitions into <= k blocks are solved (K=1: the full set alone)."""
    parts, incidence, masks = partition_subsets(solver.n, k)
    e = solver.weighted(batch.deltas)  # [N, R, in], shared by explained and total
    score = solver.explained(batch, masks, e) @ incidence.T  # [R, P]
    blocks = torch.tensor([max(p) + 1 for p in parts.tolist()])  # [P]
    total = solver.total(batch, e)  # [R]
    errors = torch.stack([total - score[:, blocks <= j].max(1).values for j in range(1, k + 1)], 1)
    return parts[score.argmax(1)], errors.clamp_min(0), total
