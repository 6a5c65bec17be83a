"""Set partitions of the experts: the candidates every grouping rule scores per row.

A row's grouping is a label per expert [N]; labels are canonical (groups numbered in order of
first appearance over the experts, expert 0 always in group 0), so identical partitions always
get identical labels.
"""

from __future__ import annotations

from functools import cache

import torch


def canonical(labels: torch.Tensor) -> torch.Tensor:
    """Renumber groups per row in order of first appearance: [R, N] -> [R, N] in 0..groups-1."""
    r, n = labels.shape
    pos = torch.arange(n).expand(r, n)
    first = torch.full((r, n + 1), n, dtype=torch.long)  # first position of each label value
    first.scatter_reduce_(1, labels, pos, reduce="amin")
    rank = torch.empty_like(first)
    rank.scatter_(1, first.argsort(dim=1, stable=True), torch.arange(n + 1).expand(r, n + 1))
    return rank.gather(1, labels)


@cache
def set_partitions(n: int, k: int) -> tuple[tuple[int, ...], ...]:
    """All partitions of n items into <= k blocks as canonical label tuples, most blocks first."""
    out: list[tuple[int, ...]] = []

    def grow(prefix: list[int], top: int) -> None:
        if len(prefix) == n:
            out.append(tuple(prefix))
            return
        for g in range(min(top + 2, k)):
            grow(prefix + [g], max(top, g))

    grow([0], 0)
    return tuple(sorted(out, key=lambda p: -max(p)))  # ties in cost prefer finer partitions


def count_partitions(n: int, k: int) -> int:
    """Number of set partitions of n items into <= k blocks (sum of Stirling numbers S(n, j))."""
    s = [[0] * (k + 1) for _ in range(n + 1)]
    s[0][0] = 1
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            s[i][j] = j * s[i - 1][j] + s[i - 1][j - 1]
    return sum(s[n][1:])
