"""Merge methods: how the row deltas inside one group become that group's merged delta.

A method is a registry entry (mergekit style) with typed parameters and two small callables:
- `sparsify(delta [out, in], params, generator)`: per expert and per whole tensor, in place
  (TIES' top-k trim, DARE's random drop + L1 rescale); None for dense methods.
- `combine(deltas [N, R, in], labels [R, N], k, params)`: the merged delta of every group [K, R, in].

Semantics (mergekit's, so K=1 reproduces a mergekit merge):
- mean / linear:   sum_g(w_n d_n) / sum_g(w_n)
- task_arithmetic: lambda * sum_g(w_n d_n)
- ties:            trim each d_n to its top k = max(1, int(density * numel)) entries by |d|, weight
                   them, elect a sign per coordinate (sign of the group sum, zero counts as +), keep
                   members whose sign agrees, divide by their summed weight (0 -> 1), times lambda.
- dare_ties / dare_linear: keep each entry with probability `density` (seeded), rescale per tensor
                   by |d|_1 / |kept d|_1, then as ties / as a plain weighted sum.
Parameters are global or per expert ({name: value}); `weights` is accepted for `weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch


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
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            lo = "(" if self.low_open else "["
            raise ChmcError(f"parameter '{where}' = {value} is outside {lo}{self.low}, {self.high}]")
        return value


@dataclass(frozen=True)
class Resolved:
    """A method's parameters after validation: scalars, and per-expert values as lists in order."""

    values: dict[str, Any]
    per_expert: dict[str, list[Any]]

    def expert(self, n: int) -> dict[str, Any]:
        return {**self.values, **{k: v[n] for k, v in self.per_expert.items()}}

    def weights(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.per_expert.get("weight", []), dtype=torch.float32)

    def to_json(self, names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.values)
        for k, v in self.per_expert.items():
            out[k] = dict(zip(names, v))
        return out


SparsifyFn = Callable[["torch.Tensor", dict[str, Any], "torch.Generator"], None]
CombineFn = Callable[["torch.Tensor", "torch.Tensor", int, Resolved], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    combine: CombineFn
    sparsify: SparsifyFn | None = None
    params: tuple[Param, ...] = field(default_factory=tuple)

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


METHODS: dict[str, MergeMethod] = {}
ALIASES = {"linear": "mean"}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    method = METHODS.get(ALIASES.get(name, name))
    if method is None:
        choices = ", ".join([*METHODS, *ALIASES])
        raise ChmcError(f"unknown merge method '{name}' (choose from {choices})")
    return method


# --- the shared arithmetic --------------------------------------------------------------------

def _membership(labels: torch.Tensor, k: int) -> torch.Tensor:
    """One-hot group membership: labels [R, N] -> [R, K, N] fp32."""
    import torch

    return torch.nn.functional.one_hot(labels, k).transpose(1, 2).float()


def _group_sum(member: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over each group's members: member [R, K, N], x [N, R, in] -> [K, R, in]."""
    return (member @ x.transpose(0, 1)).transpose(0, 1)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """A divisor with zeros replaced by 1 (mergekit: an empty divisor leaves the sum as it is)."""
    return x.masked_fill(x == 0, 1.0)


def weighted_sum(deltas: torch.Tensor, labels: torch.Tensor, k: int, p: Resolved,
                 normalize: bool) -> torch.Tensor:
    member = _membership(labels, k)  # [R, K, N]
    w = p.weights()
    total = _group_sum(member, deltas * w[:, None, None])  # [K, R, in]
    if normalize:
        total = total / _nonzero(member @ w).T[:, :, None]
    return total * p.values.get("lambda", 1.0)


def sign_consensus(deltas: torch.Tensor, labels: torch.Tensor, k: int, p: Resolved) -> torch.Tensor:
    """TIES' disjoint merge: elect a sign per group and coordinate, merge only agreeing members."""
    import torch

    member = _membership(labels, k)  # [R, K, N]
    w = p.weights()
    weighted = deltas * w[:, None, None]  # [N, R, in]
    total = _group_sum(member, weighted)  # [K, R, in]
    elected = torch.where(total >= 0, 1.0, -1.0)  # zero sum counts as +
    rows = torch.arange(labels.shape[0])
    mine = elected[labels.T, rows[None, :]]  # [N, R, in]: the sign elected in each expert's group
    agree = (weighted.sign() == mine).float()
    del elected, mine
    merged = _group_sum(member, weighted * agree)
    if p.values.get("normalize", True):
        merged = merged / _nonzero(_group_sum(member, agree * w[:, None, None]))
    return merged * p.values.get("lambda", 1.0)


def trim_top_k(delta: torch.Tensor, params: dict[str, Any], gen: torch.Generator) -> None:
    """Keep the k = max(1, int(density * numel)) largest |d| (lowest index first among equals)."""
    density = params["density"]
    if density >= 1:
        return
    flat = delta.view(-1)
    mag = flat.abs()
    k = max(1, int(density * flat.numel()))
    threshold = mag.kthvalue(flat.numel() - k + 1).values  # the k-th largest magnitude
    keep = mag > threshold
    need = k - int(keep.sum())
    if need > 0:
        at = mag == threshold
        keep |= at & (at.cumsum(0) <= need)
    flat.mul_(keep)


def dare_drop(delta: torch.Tensor, params: dict[str, Any], gen: torch.Generator) -> None:
    """Keep each entry with probability density, then restore the tensor's L1 norm."""
    import torch

    density = params["density"]
    if density >= 1:
        return
    l1 = delta.abs().sum()
    keep = torch.rand(delta.shape, generator=gen) < density
    delta.mul_(keep)
    kept = delta.abs().sum()
    if kept > 0:
        delta.mul_(l1 / kept)


WEIGHT = Param("weight", float, 1.0, per_expert=True, low=0.0)
DENSITY = Param("density", float, 1.0, per_expert=True, low=0.0, high=1.0, low_open=True)
LAMBDA = Param("lambda", float, 1.0)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default)


register(MergeMethod("mean", lambda d, lab, k, p: weighted_sum(d, lab, k, p, normalize=True),
                     params=(WEIGHT,)))
register(MergeMethod("task_arithmetic", lambda d, lab, k, p: weighted_sum(d, lab, k, p, False),
                     params=(WEIGHT, LAMBDA)))
register(MergeMethod("ties", sign_consensus, trim_top_k,
                     params=(WEIGHT, DENSITY, LAMBDA, _normalize(True))))
register(MergeMethod("dare_ties", sign_consensus, dare_drop,
                     params=(WEIGHT, DENSITY, LAMBDA, _normalize(True))))
register(MergeMethod(
    "dare_linear",
    lambda d, lab, k, p: weighted_sum(d, lab, k, p, p.values["normalize"]),
    dare_drop,
    params=(WEIGHT, DENSITY, LAMBDA, _normalize(False)),
))
