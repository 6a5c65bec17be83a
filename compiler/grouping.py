"""Clusterings: for every row (output channel) of a tensor, partition the N experts into
<= K groups.

A clustering is a small callable registered by name. It gets a `RowBatch` (the experts' row
deltas for a block of rows, with their Gram matrix computed once) and K, and returns group labels
[R, N]. Labels are canonical: groups are numbered in order of first appearance over the experts
(expert 0 is always in group 0), so identical partitions always get identical labels.

- `cosine`: the paper's rule. Average-linkage agglomeration on the cosine similarity of the row
  deltas, batched over rows, until K clusters remain.
- `error`: the partition that minimises sum_n ||d_n - m_g(n)||^2, where m_g is the (weighted) mean
  delta of expert n's group. This is computable from the N x N Gram matrix alone, so for small N
  every set partition into <= K blocks is enumerated once and scored for all rows with one matmul;
  above `MAX_ENUMERATED` partitions a deterministic heuristic (Ward agglomeration vs. the cosine
  result, then single-expert moves) is used.

- `output-error`: the partition that minimises the experts' output error on their calibration
  inputs with RegMean-merged groups (regmean.py); exhaustive over set partitions for N <= 8, above
  that the `error` rule's heuristic with the output error as its cost.

A new clustering is a function added to `CLUSTERINGS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chmc.compiler.partitions import canonical, count_partitions, set_partitions
from chmc.compiler.regmean import MAX_SUBSET_EXPERTS, RowBatch, best_partitions
from chmc.errors import ChmcError

MAX_ENUMERATED = 5000  # set partitions scored exhaustively; above this, the heuristic


ClusteringFn = Callable[[RowBatch, int], torch.Tensor]  # (batch, K) -> labels [R, N]


def get_clustering(name: str) -> ClusteringFn:
    if name not in CLUSTERINGS:
        raise ChmcError(f"unknown clustering '{name}' (choose from {', '.join(CLUSTERINGS)})")
    return CLUSTERINGS[name]


def group_rows(name: str, batch: RowBatch, k: int) -> torch.Tensor:
    """Canonical labels [R, N] for each row; K >= N means every expert keeps its own group."""
    n, r = batch.deltas.shape[:2]
    if k >= n:
        return torch.arange(n).expand(r, n).clone()
    return canonical(get_clustering(name)(batch, k))


def partition_cost(gram: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_n ||d_n - m_g(n)||^2 per row for labels [R, N] (m_g: weighted mean of group g).
    -> [R]."""
    n = gram.shape[1]
    onehot = torch.nn.functional.one_hot(labels, n).transpose(1, 2).to(gram.dtype)  # [R, G, N]
    wb = onehot * weights  # [R, G, N]
    total_w = wb.sum(-1)  # [R, G]
    size = onehot.sum(-1)
    cross = torch.einsum("rgn,rnm,rgm->rg", onehot, gram, wb)  # sum_{n,j in g} w_j G_nj
    within = torch.einsum("rgn,rnm,rgm->rg", wb, gram, wb)  # sum_{i,j in g} w_i w_j G_ij
    tw = torch.where(total_w == 0, torch.ones_like(total_w), total_w)
    explained = 2 * cross / tw - size * within / tw**2
    return gram.diagonal(dim1=1, dim2=2).sum(-1) - explained.sum(-1)


def _pair_coefficients(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A[p, i, j] such that the cost of partition p is trace(G) - <G, A[p]>. -> [P, N, N]."""
    n = parts.shape[1]
    same = (parts[:, :, None] == parts[:, None, :]).to(weights.dtype)  # [P, N, N]
    total_w = same @ weights  # [P, N]: weight of expert i's block
    size = same.sum(-1)  # [P, N]
    tw = torch.where(total_w == 0, torch.ones_like(total_w), total_w)
    w_j = weights.expand(n, n)
    return same * (2 * w_j / tw[:, :, None]
                   - size[:, :, None] * weights[:, None] * w_j / tw[:, :, None] ** 2)


def error_clustering(batch: RowBatch, k: int) -> torch.Tensor:
    """Minimise the mean-merge squared reconstruction error: exhaustive for small N."""
    n = batch.deltas.shape[0]
    if count_partitions(n, k) > MAX_ENUMERATED:
        return _error_heuristic(batch, k)
    parts = torch.tensor(set_partitions(n, k))  # [P, N]
    coef = _pair_coefficients(parts, batch.weights).reshape(len(parts), n * n)  # [P, N*N]
    explained = batch.gram.reshape(-1, n * n) @ coef.T  # [R, P]
    return parts[explained.argmax(dim=1)]  # first max: the finest among equal-cost partitions


def _error_heuristic(batch: RowBatch, k: int,
                     cost_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Best of Ward agglomeration and the cosine partition per row, improved by single moves;
    `cost_of(labels [R, N]) -> [R]` defaults to the weight-space error (partition_cost)."""
    g, w = batch.gram, batch.weights
    if cost_of is None:
        def cost_of(labels: torch.Tensor) -> torch.Tensor:
            return partition_cost(g, labels, w)

    candidates = [canonical(_agglomerate(g, k, _ward_score)),
                  canonical(cosine_clustering(batch, k))]
    costs = torch.stack([cost_of(c) for c in candidates])  # [2, R]
    labels = torch.where((costs[0] <= costs[1])[:, None], candidates[0], candidates[1])
    cost = costs.min(0).values
    n = labels.shape[1]
    for _ in range(n):  # sweeps of moves; each accepted move strictly lowers the row's cost
        improved = False
        for i in range(n):
            for target in range(k):
                trial = labels.clone()
                trial[:, i] = target
                trial_cost = cost_of(trial)
                better = trial_cost < cost - 1e-12 * cost.abs().clamp_min(1)
                if bool(better.any()):
                    labels = torch.where(better[:, None], trial, labels)
                    cost = torch.where(better, trial_cost, cost)
                    improved = True
        if not improved:
            break
    return labels


def _ward_score(sums: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Minus Ward's merge cost from block sums S[a, b] = sum G over a x b and sizes.
    -> [R, C, C]."""
    diag = sums.diagonal(dim1=1, dim2=2) / size.clamp_min(1)  # [R, C]
    s = size[:, :, None] + size[:, None, :]
    aa = sums.diagonal(dim1=1, dim2=2)
    merged = (aa[:, :, None] + aa[:, None, :] + 2 * sums) / s.clamp_min(1)
    return merged - diag[:, :, None] - diag[:, None, :]


def _average_score(sums: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Average linkage: mean pairwise similarity between two blocks. -> [R, C, C]."""
    return sums / (size[:, :, None] * size[:, None, :]).clamp_min(1)


def _agglomerate(sim: torch.Tensor, k: int, score: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Merge the best-scoring pair of blocks until k remain, all rows at once.
    sim [R, N, N] -> [R, N]."""
    r, n, _ = sim.shape
    labels = torch.arange(n).expand(r, n).clone()  # block id = its smallest member
    eye = torch.eye(n, dtype=torch.bool)
    for _ in range(n - k):
        onehot = torch.nn.functional.one_hot(labels, n).transpose(1, 2).to(sim.dtype)  # [R, C, N]
        sums = onehot @ sim @ onehot.transpose(1, 2)  # [R, C, C]
        size = onehot.sum(-1)  # [R, C]
        s = score(sums, size)
        alive = size > 0
        valid = alive[:, :, None] & alive[:, None, :] & ~eye
        s = s.masked_fill(~valid, float("-inf"))
        best = s.reshape(r, n * n).argmax(dim=1)
        a, b = best // n, best % n
        keep, gone = torch.minimum(a, b), torch.maximum(a, b)
        labels = torch.where(labels == gone[:, None], keep[:, None], labels)
    return labels


def cosine_clustering(batch: RowBatch, k: int) -> torch.Tensor:
    """The paper's rule: average-linkage on the cosine similarity of the experts' row deltas."""
    g = batch.gram
    norm = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [R, N]
    denom = norm[:, :, None] * norm[:, None, :]
    cos = g / denom.clamp_min(1e-30) * (denom > 0)  # zero rows: similarity 0
    return _agglomerate(cos, k, _average_score)


def output_error_clustering(batch: RowBatch, k: int) -> torch.Tensor:
    """Minimise sum_n ||X_n (w_G(n) - w_n)||^2 with RegMean-merged groups (needs calibration):
    every partition for small N, the `error` rule's heuristic on this cost above."""
    solver = batch.calib
    if solver is None:
        raise ChmcError("clustering 'output-error' needs calibration prompts "
                        "(--calibration NAME=prompts.jsonl for every expert)")
    if solver.n <= MAX_SUBSET_EXPERTS:
        return best_partitions(solver, batch, k)[0]
    e = solver.weighted(batch.deltas)  # [N, R, in], shared by every trial
    return _error_heuristic(batch, k, lambda labels: solver.partition_error(batch, labels, e))


CLUSTERINGS: dict[str, ClusteringFn] = {"cosine": cosine_clustering, "error": error_clustering,
                                        "output-error": output_error_clustering}
