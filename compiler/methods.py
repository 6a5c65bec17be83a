"""Merge methods: how the row deltas inside one group become that group's merged delta.

A method is a registry entry (mergekit style) with typed parameters and two small callables:
- `sparsify(deltas, params, generators, blocks, pmap)`: per expert and per whole tensor (TIES'
  top-k trim, DARE's random drop + L1 rescale), it scans the tensor's deltas (a Deltas: [N, out,
  in] in row slices, all experts at once, per-expert work mapped with pmap, maybe on threads) and
  returns an `apply(rows [N, R, in], i)` that sparsifies block i of all experts' rows as it
  streams past; None for dense methods.
- `combine(deltas [N, R, in], labels [R, N], k, params)`: the merged delta of every group
  [K, R, in].
- optionally `fused(raw [N, R, in], labels, k, params, apply, i, err_sq)`: apply, combine and
  the reconstruction error of block i in one compiled pass (ties: compiler/fused.py, imported on
  first use: numba's import would add 0.7 s to every CLI start); the two callables above stay
  the reference it is tested against.

Semantics (mergekit's, so K=1 reproduces a mergekit merge):
- mean / linear:   sum_g(w_n d_n) / sum_g(w_n)
- task_arithmetic: lambda * sum_g(w_n d_n)
- ties:            trim each d_n to its top k = max(1, int(density * numel)) entries by |d|, weight
                   them, elect a sign per coordinate (sign of the group sum, zero counts as +), keep
                   members whose sign agrees, divide by their summed weight (0 -> 1), times lambda.
- dare_ties / dare_linear: keep each entry with probability `density` (seeded), rescale per tensor
                   by |d|_1 / |kept d|_1, then as ties / as a plain weighted sum.
- regmean:         (sum_g C_n)^-1 sum_g C_n d_n per row, C_n expert n's damped calibration Gram
                   (regmean.py; needs calibration; the identity where a tensor has no Gram).
Parameters are global or per expert ({name: value}); `weights` is accepted for `weight`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from chmc.compiler.regmean import DAMPING
from chmc.errors import ChmcError

if TYPE_CHECKING:
    from chmc.compiler.deltas import Deltas


@dataclass(frozen=True)
class Param:
    """A typed method parameter; per-expert ones may be given as {expert name: value}."""

    name: str
    type: type
    default: Any
    per_expert: bool = False
    low: float | None = None  # inclusive bounds
    high: float | None = None
    low_open: bool = False  # True: the low bound is exclusive

    def check(self, value: Any, where: str) -> Any:
        ok_type = (float, int) if self.type is float else (self.type,)
        if isinstance(value, bool) and self.type is not bool or not isinstance(value, ok_type):
            raise ChmcError(f"parameter '{where}' must be {self.type.__name__}, got {value!r}")
        value = self.type(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ChmcError(f"parameter '{where}' must be a finite number, got {value}")
        too_low = self.low is not None and (value <= self.low if self.low_open
                                            else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            lo = "(" if self.low_open else "["
            raise ChmcError(f"parameter '{where}' = {value} is outside "
                            f"{lo}{self.low}, {self.high}]")
        return value


@dataclass(frozen=True)
class Resolved:
    """A method's parameters after validation: scalars, and per-expert values as lists in order."""

    values: dict[str, Any]
    per_expert: dict[str, list[Any]]

    def expert(self, n: int) -> dict[str, Any]:
        return {**self.values, **{k: v[n] for k, v in self.per_expert.items()}}

    def weights(self) -> torch.Tensor:
        return torch.tensor(self.per_expert.get("weight", []), dtype=torch.float32)

    def to_json(self, names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.values)
        for k, v in self.per_expert.items():
            out[k] = dict(zip(names, v))
        return out


Map = Callable[[Callable[[Any], Any], Any], list]  # (fn, items) -> [fn(item)], maybe on threads


def serial_map(fn: Callable[[Any], Any], items: Any) -> list:
    """[fn(x) for x in items]: the default map for per-expert and per-block work."""
    return [fn(x) for x in items]


Blocks = list[tuple[int, int]]  # row ranges [a, b) the tensor is streamed in


def blocks_in(blocks: Blocks, rows: tuple[int, int]) -> list[int]:
    """The indices of the blocks that start in the row range `rows`."""
    return [i for i, (a, _) in enumerate(blocks) if rows[0] <= a < rows[1]]

Apply = Callable[["torch.Tensor", int], "torch.Tensor"]  # (block i's rows [N, R, in], i) -> sparse
SparsifyFn = Callable[..., Apply]  # (deltas, params, generators, blocks, pmap) -> Apply
CombineFn = Callable[..., "torch.Tensor"]  # (deltas, labels, k, params[, calib=]) -> [K, R, in]
# (raw block [N, R, in], labels, k, params, apply, block i, err_sq [N] to add to) -> [K, R, in]
FusedFn = Callable[..., "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    combine: CombineFn
    sparsify: SparsifyFn | None = None
    params: tuple[Param, ...] = field(default_factory=tuple)
    calibrated: bool = False  # combine takes calib= (a GramSolver); the build needs calibration
    fused: FusedFn | None = None  # sparsify's apply + combine + the merge error in one pass

    def resolve(self, parameters: Mapping[str, Any] | None, names: list[str]) -> Resolved:
        """Validate `parameters` against this method's typed parameters, filling defaults."""
        given = dict(parameters or {})
        if "weights" in given:
            given.setdefault("weight", given.pop("weights"))
        known = {p.name: p for p in self.params}
        for key in given:
            if key not in known:
                raise ChmcError(
                    f"method '{self.name}' has no parameter '{key}' (it takes {', '.join(known)})"
                )
        values: dict[str, Any] = {}
        per_expert: dict[str, list[Any]] = {}
        for p in self.params:
            v = given.get(p.name, p.default)
            if not p.per_expert:
                values[p.name] = p.check(v, p.name)
                continue
            if isinstance(v, Mapping):
                unknown = sorted(set(v) - set(names))
                if unknown:
                    raise ChmcError(f"parameter '{p.name}' names unknown expert '{unknown[0]}' "
                                    f"(experts: {', '.join(names)})")
                per_expert[p.name] = [p.check(v.get(n, p.default), f"{p.name}[{n}]") for n in names]
            else:
                per_expert[p.name] = [p.check(v, p.name)] * len(names)
        return Resolved(values, per_expert)


ALIASES = {"linear": "mean"}


def get_method(name: str) -> MergeMethod:
    method = METHODS.get(ALIASES.get(name, name))
    if method is None:
        choices = ", ".join([*METHODS, *ALIASES])
        raise ChmcError(f"unknown merge method '{name}' (choose from {choices})")
    return method


# --- the shared arithmetic --------------------------------------------------------------------

class GroupSums:
    """Weighted per-group sums over the members' rows, as one batched matmul over rows."""

    def __init__(self, labels: torch.Tensor, k: int, w: torch.Tensor):
        member = torch.nn.functional.one_hot(labels, k).transpose(1, 2).float()  # [R, K, N]
        self.total_w = (member @ w).T[:, :, None]  # [K, R, 1]: summed member weights
        self.member_w = member * w  # [R, K, N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """sum_{n in g} w_n x_n: x [N, R, in] -> [K, R, in]."""
        return (self.member_w @ x.transpose(0, 1)).transpose(0, 1)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """A divisor with zeros lifted, in place. A zero summed weight (no member, or only weight-0
    members) comes with a zero sum, so any positive divisor gives mergekit's result: 0."""
    return x.clamp_min_(torch.finfo(torch.float32).tiny)


def weighted_sum(deltas: torch.Tensor, labels: torch.Tensor, k: int, p: Resolved,
                 normalize: bool) -> torch.Tensor:
    """sum_g(w_n d_n) per group, optionally / sum_g(w_n), times lambda: [N, R, in] -> [K, R, in]."""
    sums = GroupSums(labels, k, p.weights())
    merged = sums(deltas)
    if normalize:
        merged = merged / _nonzero(sums.total_w.clone())
    return _scale(merged, p.values.get("lambda", 1.0))


def sign_consensus(deltas: torch.Tensor, labels: torch.Tensor, k: int, p: Resolved) -> torch.Tensor:
    """TIES' disjoint merge: elect a sign per group and coordinate, merge only agreeing members.

    From four weighted group sums (weights are >= 0, so w*d has the sign of d): S(d), S(|d|),
    S(sign d), S(|sign d|). The elected sign e is that of S(d) (zero counts as +); the agreeing
    members' sum is (S(d) + e S(|d|)) / 2 and their weight (S(|sign d|) + e S(sign d)) / 2, so no
    per-expert gather of the elected sign and no masks are needed.
    """
    sums = GroupSums(labels, k, p.weights())
    total = sums(deltas)  # [K, R, in]
    sign = deltas.sign()  # [N, R, in]
    elected = torch.copysign(torch.tensor(1.0), total)  # -1 only for -0.0: then every term is 0
    merged = torch.addcmul(total, sums(deltas.abs()), elected)  # 2 x the agreeing sum
    if not p.values.get("normalize", True):
        return merged * (0.5 * p.values.get("lambda", 1.0))
    weight = torch.addcmul(sums(sign.abs()), sums(sign), elected)  # 2 x the agreeing weight
    return _scale(merged.div_(_nonzero(weight)), p.values.get("lambda", 1.0))


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x * factor in place; a factor of 1 (the default lambda) is skipped: same bits, one pass
    less."""
    return x if factor == 1 else x.mul_(factor)


class Trim:
    """TIES' trim of a tensor's experts, found by trim_top_k: expert n keeps |d| >= t_n, except
    that past its last kept tie (cuts[n], a (row, col); (out, 0): none) only |d| > t_n. Called
    on block i's rows [N, R, in], it returns them trimmed; ties_fused reads the thresholds."""

    def __init__(self, found: list[tuple[float, float, tuple[int, int]]], blocks: Blocks):
        self.ge, self.gt, self.cuts = (list(x) for x in zip(*found))  # hardshrink lambdas
        self.blocks = blocks

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        a, b = self.blocks[i]
        kept = torch.empty_like(x.transpose(0, 1)).transpose(0, 1)  # [N, R, in], x's layout
        for e in range(x.shape[0]):
            row, col = self.cuts[e]
            torch.hardshrink(x[e], self.gt[e] if row < a else self.ge[e], out=kept[e])
            if a <= row < b:  # this block holds the last kept tie: only > t_n after it
                r = row - a
                torch.hardshrink(x[e, r + 1 :], self.gt[e], out=kept[e, r + 1 :])
                torch.hardshrink(x[e, r, col + 1 :], self.gt[e], out=kept[e, r, col + 1 :])
        return kept


def trim_top_k(deltas: Deltas, p: Resolved, gens: list[torch.Generator], blocks: Blocks,
               pmap: Map = serial_map) -> Trim:
    """TIES' trim, per expert over its whole tensor: keep the k = max(1, int(density * numel))
    largest |d|, the lowest flat index first among equal magnitudes.

    A count over the bit patterns of |d_n| (_kth_largest: O(numel), no sort) finds the k-th
    largest, the threshold t_n; when t_n also occurs below the cut (ties, common in bf16 deltas),
    the flat position of the last tie to keep is found too (_last_ties). Both scan the deltas'
    slices with all experts at once.
    """
    n, out, inp = deltas.shape
    densities = [p.expert(e)["density"] for e in range(n)]
    ks = {e: max(1, int(d * out * inp)) for e, d in enumerate(densities) if d < 1}
    found = _kth_largest(deltas, ks, pmap)
    lambdas, need = {}, {}
    for e, (t, greater, equal) in found.items():
        t_float = np.int32(t).view(np.float32)
        lambdas[e] = float(np.nextafter(t_float, np.float32(-1))), float(t_float)
        if ks[e] - greater < equal:  # keep only the first ks[e] - greater entries equal to t
            need[e] = (t, ks[e] - greater)
    cuts = _last_ties(deltas, need, pmap)
    return Trim([(*lambdas.get(e, (-math.inf, -math.inf)), cuts.get(e, (out, 0)))
                 for e in range(n)], blocks)


BUCKET = 1 << 16  # bit patterns per bucket of the first count; the second counts within one
SAMPLE_STEP = 16  # rows: the bucket holding the threshold is guessed from every 16th


def _stack(rows: torch.Tensor) -> np.ndarray:
    """The float32 bit patterns of rows [N, R, in] (|x| orders like x's bits without the sign),
    as a C-ordered int32 [R, N, in] array (the build's storage, so no copy there): numba compiles
    loops over its rows to vector code, over strided rows not."""
    return np.ascontiguousarray(rows.transpose(0, 1).view(torch.int32).numpy())


def _from_top(counts: np.ndarray, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest value, how many values lie in higher bins)."""
    at_least = np.cumsum(counts[::-1])[::-1]  # [i]: values in bins >= i
    i = int(np.flatnonzero(at_least >= k).max())
    return i, int(at_least[i + 1]) if i + 1 < len(at_least) else 0


def _count(deltas: Deltas, fn: Callable[[np.ndarray, int], np.ndarray], experts: list[int],
           pmap: Map) -> dict[int, np.ndarray]:
    """{e: fn(the slice's bits [R, N, in], e) summed over the slices}, one scan for all
    experts."""
    totals: dict[int, np.ndarray] = {}
    for a, b in deltas.scan():
        stack = _stack(deltas.rows(a, b))
        for e, counts in zip(experts, pmap(partial(fn, stack), experts)):
            totals[e] = totals[e] + counts if e in totals else counts
    return totals


def _kth_largest(deltas: Deltas, ks: dict[int, int], pmap: Map = serial_map
                 ) -> dict[int, tuple[int, int, int]]:
    """{e: (t, how many |d| exceed t, how many equal it)} for t the ks[e]-th largest |d| bit
    pattern of expert e, by counting: the upper 16 bits name the bucket of 2^16 patterns that
    holds t (guessed from every SAMPLE_STEP-th row, counted over all where the guess misses),
    then a count of that bucket's patterns names t. No selection: fine-tuned deltas of bf16
    weights repeat a few values so often that introselect degrades to a sort."""
    from chmc.compiler import fused

    if not ks:  # every density 1: nothing to count (a sliced tensor would be read for nothing)
        return {}
    out = deltas.shape[1]
    found: dict[int, tuple[int, int, int] | None] = dict.fromkeys(ks)
    if out >= 16 * SAMPLE_STEP:
        sample = _stack(deltas.sample(SAMPLE_STEP))  # [S, N, in]
        scale = sample.shape[0] / out

        def guess(e: int) -> tuple[int, int]:
            """(the bucket, its most frequent pattern or -1), from the sample."""
            bucket = _from_top(fused.high_counts(sample[:, e]), max(1, round(ks[e] * scale)))[0]
            counts = fused.bucket_counts(sample, e, bucket * BUCKET, BUCKET, -1)[1:-1]
            return bucket, bucket * BUCKET + int(counts.argmax()) if counts.any() else -1

        guesses = dict(zip(ks, pmap(guess, list(ks))))
        found = _in_buckets(deltas, ks, {e: g[0] for e, g in guesses.items()},
                            {e: g[1] for e, g in guesses.items()}, pmap)
    missed = [e for e, f in found.items() if f is None]
    if missed:
        highs = _count(deltas, lambda stack, e: fused.high_counts(stack[:, e]), missed, pmap)
        found |= _in_buckets(deltas, {e: ks[e] for e in missed},
                             {e: _from_top(highs[e], ks[e])[0] for e in missed},
                             dict.fromkeys(missed, -1), pmap)
    assert all(f is not None for f in found.values())
    return {e: f for e, f in found.items() if f is not None}


def _in_buckets(deltas: Deltas, ks: dict[int, int], buckets: dict[int, int],
                heavy: dict[int, int], pmap: Map) -> dict[int, tuple[int, int, int] | None]:
    """_kth_largest's answer per expert where its ks[e]-th largest pattern is in buckets[e],
    else None (heavy[e]: the bucket's most frequent pattern in the sample, or -1)."""
    from chmc.compiler import fused

    counts = _count(deltas, lambda stack, e: fused.bucket_counts(  # below, each, above
        stack, e, buckets[e] * BUCKET, BUCKET, heavy[e]), list(ks), pmap)
    found: dict[int, tuple[int, int, int] | None] = {}
    for e, k in ks.items():
        c = counts[e]
        above = int(c[-1])
        if not above < k <= above + int(c[1:-1].sum()):
            found[e] = None
            continue
        j, within = _from_top(c[1:-1], k - above)
        found[e] = buckets[e] * BUCKET + j, above + within, int(c[1 + j])
    return found


def _last_ties(deltas: Deltas, need: dict[int, tuple[int, int]], pmap: Map
               ) -> dict[int, tuple[int, int]]:
    """{e: (row, col) of the nth |d| equal to pattern t in flat order} for need {e: (t, nth)},
    scanning slices until every expert's is found."""
    from chmc.compiler import fused

    cuts: dict[int, tuple[int, int]] = {}
    left = dict(need)
    if not left:
        return cuts
    for a, b in deltas.scan():
        stack, todo = _stack(deltas.rows(a, b)), list(left)
        found = pmap(lambda args: fused.nth_equal(*args), [(stack, e, *left[e]) for e in todo])
        for e, (r, c, nth) in zip(todo, found):
            if nth == 0:
                cuts[e] = (a + r, c)
                del left[e]
            else:
                left[e] = (left[e][0], nth)
        if not left:
            break
    return cuts


def ties_fused(raw: torch.Tensor, labels: torch.Tensor, k: int, p: Resolved, trim: Trim,
               i: int, err_sq: torch.Tensor) -> torch.Tensor:
    """trim, then sign_consensus, and the reconstruction error, in one pass (compiler/fused.py):
    raw block i [N, R, in] (a view of [R, N, in] rows) -> merged [K, R, in]; err_sq [N] fp64
    += ||merged row - raw row||^2 over the rows where the expert is merged with others."""
    from chmc.compiler import fused

    _, rows, inp = raw.shape
    a = trim.blocks[i][0]
    ge, gt = np.array(trim.ge, np.float32), np.array(trim.gt, np.float32)
    cut_row = np.array([row - a for row, _ in trim.cuts], np.int64)
    cut_col = np.array([col for _, col in trim.cuts], np.int64)
    merged = torch.empty(k, rows, inp)
    fused.ties_rows(raw.transpose(0, 1).numpy(), labels.numpy(), ge, gt, cut_row, cut_col,
                    p.weights().numpy(), bool(p.values.get("normalize", True)),
                    float(p.values.get("lambda", 1.0)), merged.numpy(), err_sq.numpy())
    return merged


def dare_drop(deltas: Deltas, p: Resolved, gens: list[torch.Generator], blocks: Blocks,
              pmap: Map = serial_map) -> Apply:
    """DARE: keep each entry with probability density (seeded per expert), rescale each expert to
    its tensor's L1 norm."""
    n, _, inp = deltas.shape
    densities = [p.expert(e)["density"] for e in range(n)]

    def draw(e: int) -> list[torch.Tensor] | None:
        """Expert e's masks per block [R, in]; None: it keeps all."""
        if densities[e] >= 1:
            return None
        return [torch.rand((b - a, inp), generator=gens[e]) < densities[e] for a, b in blocks]

    masks = pmap(draw, range(n))
    if all(m is None for m in masks):
        return lambda x, i: x
    dropping = [e for e in range(n) if masks[e] is not None]
    l1, kept = [0.0] * n, [0.0] * n
    for rows in deltas.scan():
        inside = blocks_in(blocks, rows)

        def sums(e: int, inside: list[int] = inside) -> list[tuple[float, float]]:
            out = []
            for i in inside:
                d = deltas.rows(*blocks[i])[e]
                out.append((float(d.abs().sum(dtype=torch.float64)),
                            float((d * masks[e][i]).abs().sum(dtype=torch.float64))))
            return out

        for e, pairs in zip(dropping, pmap(sums, dropping)):
            for whole, part in pairs:  # in block order, as one sum over the tensor
                l1[e] += whole
                kept[e] += part
    scales = torch.tensor([l1[e] / kept[e] if kept[e] > 0 else 1.0 for e in range(n)],
                          dtype=torch.float32)[:, None, None]  # [N, 1, 1]

    def apply(x: torch.Tensor, i: int) -> torch.Tensor:
        a, b = blocks[i]
        ones = torch.ones((b - a, inp), dtype=torch.bool)
        return x * torch.stack([ones if m is None else m[i] for m in masks]) * scales

    return apply


WEIGHT = Param("weight", float, 1.0, per_expert=True, low=0.0)
DENSITY = Param("density", float, 1.0, per_expert=True, low=0.0, high=1.0, low_open=True)
LAMBDA = Param("lambda", float, 1.0)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default)


def regmean_combine(deltas: torch.Tensor, labels: torch.Tensor, k: int, p: Resolved,
                    calib: Any = None) -> torch.Tensor:
    """RegMean per group: the merged delta minimising the members' output error. [K, R, in]."""
    if calib is None:
        raise ChmcError("method 'regmean' needs calibration prompts "
                        "(--calibration NAME=prompts.jsonl for every expert)")
    return calib.merge(deltas, labels, k)


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("mean", lambda d, lab, k, p: weighted_sum(d, lab, k, p, normalize=True),
                params=(WEIGHT,)),
    MergeMethod("task_arithmetic", lambda d, lab, k, p: weighted_sum(d, lab, k, p, False),
                params=(WEIGHT, LAMBDA)),
    MergeMethod("ties", sign_consensus, trim_top_k,
                params=(WEIGHT, DENSITY, LAMBDA, _normalize(True)), fused=ties_fused),
    MergeMethod("dare_ties", sign_consensus, dare_drop,
                params=(WEIGHT, DENSITY, LAMBDA, _normalize(True))),
    MergeMethod("dare_linear",
                lambda d, lab, k, p: weighted_sum(d, lab, k, p, p.values["normalize"]),
                dare_drop, params=(WEIGHT, DENSITY, LAMBDA, _normalize(False))),
    MergeMethod("regmean", regmean_combine, calibrated=True,
                params=(Param("damping", float, DAMPING, low=0.0, low_open=True),)),
)}
