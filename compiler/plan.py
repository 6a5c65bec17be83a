"""The build plan: everything `chmc build` will do, validated before any weight is read.

mergekit's planner/executor split: `plan_build` opens every checkpoint from its headers and checks
names, architectures, tensor sets, shapes, dtypes, K, method parameters and calibration sources,
then emits one immutable `TensorTask` per base tensor. Planning steps (calibration.calibrate,
budget.apply_budget) take a plan and return a new one; merge.write_artifact executes the final
plan. Nothing here writes a byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any, Literal

from chmc.compiler.grams import GRAMS_INDEX, GramFiles
from chmc.compiler.grouping import get_clustering
from chmc.compiler.methods import MergeMethod, Resolved, get_method
from chmc.errors import ChmcError
from chmc.formats.adapter import Adapter, open_expert
from chmc.formats.artifact import MAX_EXPERTS, Budget
from chmc.formats.checkpoint import Checkpoint
from chmc.formats.safetensors import FLOAT_DTYPES, TensorSpec


@dataclass(frozen=True)
class TensorTask:
    """One base tensor's work: channel-merged into K banks, or stored per expert."""

    name: str
    kind: Literal["merged", "stacked"]
    shape: tuple[int, ...]
    dtype: str  # source dtype
    out_dtype: str
    groups: int  # this tensor's K (the budget step may choose it per tensor)

    def specs(self, n_experts: int) -> list[TensorSpec]:
        if self.kind == "stacked":
            return [TensorSpec(f"{self.name}.experts", (n_experts, *self.shape), self.out_dtype)]
        out, inp = self.shape
        return [TensorSpec(f"{self.name}.bank", (self.groups, out, inp), self.out_dtype),
                TensorSpec(f"{self.name}.index", (n_experts, out), "uint8")]

    @property
    def stored_parameters(self) -> int:
        """Parameters this tensor stores per K (merged) or per expert (stacked)."""
        return prod(self.shape)


@dataclass(frozen=True)
class BuildPlan:
    base: Checkpoint
    experts: dict[str, Checkpoint | Adapter]  # full fine-tunes and adapters over the base
    tasks: tuple[TensorTask, ...]
    groups: int  # the largest K a tensor may get
    clustering: str
    method: MergeMethod
    params: Resolved
    seed: int
    dtype: str | None
    calibration: dict[str, Path] | None = None  # expert -> prompts .jsonl or Gram folder
    warnings: tuple[str, ...] = ()  # what the planner found doubtful but not wrong
    budget: float | None = None  # fraction of the ensemble's parameters; K per tensor <= groups
    gram_files: GramFiles | None = field(default=None, compare=False)  # after calibrate()
    budget_summary: Budget | None = None  # after apply_budget(): K choice and error curves

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    @property
    def base_parameters(self) -> int:
        return sum(info.numel for info in self.base.tensors.values())

    def with_(self, **changes: Any) -> BuildPlan:
        return replace(self, **changes)


def plan_build(base: str | Path, experts: Mapping[str, str | Path], *, groups: int,
               clustering: str = "cosine", method: str = "mean",
               parameters: Mapping[str, Any] | None = None, seed: int = 0,
               dtype: str | None = None, calibration: Mapping[str, str | Path] | None = None,
               budget: float | None = None, strict: bool = False) -> BuildPlan:
    """Validate everything and list the per-tensor tasks; reads headers only, writes nothing."""
    names = list(experts)
    if len(names) < 2:
        raise ChmcError(f"need at least two experts to merge, got {len(names)} "
                        f"({', '.join(names)})")
    if len(names) > MAX_EXPERTS:
        raise ChmcError(f"at most {MAX_EXPERTS} experts are supported, got {len(names)}")
    for name in names:
        if not name or "=" in name or "/" in name:
            raise ChmcError(f"invalid expert name '{name}' (no '=', '/' or empty names)")
    if not 1 <= groups <= len(names):
        raise ChmcError(f"--groups must be between 1 and the number of experts ({len(names)}), "
                        f"got {groups}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ChmcError(f"--dtype '{dtype}' is not a float dtype "
                        f"({', '.join(sorted(FLOAT_DTYPES))})")
    get_clustering(clustering)
    merge_method = get_method(method)
    params = merge_method.resolve(parameters, names)
    base_ckpt = Checkpoint(base, "base")
    ckpts = {name: open_expert(path, base_ckpt, f"expert '{name}'")
             for name, path in experts.items()}
    for name, ckpt in ckpts.items():
        if isinstance(ckpt, Checkpoint):
            check_compatible(base_ckpt, name, ckpt)
    warnings = tuple(w for name, ckpt in ckpts.items() if (w := (
        check_adapter_base(base_ckpt, name, ckpt) if isinstance(ckpt, Adapter)
        else check_provenance(base_ckpt, name, ckpt))) is not None)
    if strict and warnings:
        raise ChmcError(warnings[0].replace("; --strict makes this an error", ""))
    calib = check_calibration(calibration, names, clustering, merge_method, budget)
    plan = BuildPlan(base_ckpt, ckpts, plan_tasks(base_ckpt, groups, dtype), groups, clustering,
                     merge_method, params, seed, dtype, calib, warnings, budget)
    if budget is not None:
        smallest = tuple(replace(t, groups=1) for t in plan.tasks)
        least = stored_parameters(smallest, len(names)) / (len(names) * plan.base_parameters)
        if least > budget:
            raise ChmcError(f"--budget {budget} is below the smallest artifact: K=1 everywhere "
                            f"stores {least:.4f} of the ensemble's parameters")
    return plan


def check_calibration(calibration: Mapping[str, str | Path] | None, names: list[str],
                      clustering: str, method: MergeMethod,
                      budget: float | None) -> dict[str, Path] | None:
    """Every expert or none has calibration (.jsonl prompts or a Gram folder); methods and
    clusterings that need it get it; the budget is a fraction in (0, 1]."""
    if budget is not None and not 0 < budget <= 1:
        raise ChmcError(f"--budget must be a fraction of the ensemble in (0, 1], got {budget}")
    if not calibration:
        need = "method 'regmean'" if method.calibrated else (
            "clustering 'output-error'" if clustering == "output-error" else None)
        if need:
            raise ChmcError(f"{need} needs calibration prompts: --calibration NAME=prompts.jsonl "
                            f"for every expert ({', '.join(names)})")
        return None
    for name in calibration:
        if name not in names:
            raise ChmcError(f"--calibration names unknown expert '{name}' "
                            f"(experts: {', '.join(names)})")
    out = {}
    for name in names:
        if name not in calibration:
            raise ChmcError(f"--calibration has no prompts for expert '{name}' (every expert "
                            "needs them)")
        path = Path(calibration[name])
        if not (path.is_file() and path.suffix == ".jsonl" or (path / GRAMS_INDEX).is_file()):
            raise ChmcError(f"--calibration {name}={path}: expected an existing .jsonl prompt file "
                            f"(or a Gram folder from chmc.compiler.calibration.collect_grams)")
        out[name] = path
    return out


def check_compatible(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    """Same architecture, same tensor names, shapes and dtypes as the base."""
    if expert.architecture != base.architecture:
        raise ChmcError(f"expert '{name}' ({expert.path}) is a {expert.architecture}, "
                        f"the base is a {base.architecture}")
    if expert.tied != base.tied:
        raise ChmcError(f"expert '{name}': tie_word_embeddings is {expert.tied}, "
                        f"the base has {base.tied}")
    for tname, info in base.tensors.items():
        other = expert.tensors.get(tname)
        if other is None:
            raise ChmcError(f"expert '{name}' ({expert.path}) has no tensor '{tname}'")
        if other.shape != info.shape or other.dtype != info.dtype:
            raise ChmcError(
                f"expert '{name}': tensor '{tname}' is {list(other.shape)} {other.dtype}, "
                f"the base has {list(info.shape)} {info.dtype}")
    extra = sorted(set(expert.tensors) - set(base.tensors))
    if extra:
        raise ChmcError(f"expert '{name}' has tensor '{extra[0]}', which the base lacks")


PROVENANCE_TENSORS = 8  # 2-D tensors compared per expert, spread over the model
PROVENANCE_MAX_ELEMENTS = 1 << 26  # skip the largest (embeddings): the sample stays cheap
MIN_COSINE = 0.5  # cos(base, expert) over the sample; a fine-tune of this base keeps it near 1


def sample(base: Checkpoint) -> list[str]:
    """Up to PROVENANCE_TENSORS 2-D float tensors spread over the model, the largest left out."""
    candidates = [n for n, i in base.tensors.items() if len(i.shape) == 2
                  and i.dtype in FLOAT_DTYPES and i.numel <= PROVENANCE_MAX_ELEMENTS]
    step = max(1, len(candidates) // PROVENANCE_TENSORS)
    return candidates[::step][:PROVENANCE_TENSORS]


def check_provenance(base: Checkpoint, name: str, expert: Checkpoint) -> str | None:
    """A warning when the expert does not look like a fine-tune of this base: over a sample of
    its 2-D tensors the cosine between expert and base weights is below MIN_COSINE. Real
    fine-tunes move weights by a few percent (cosine ~1); a model trained apart from the base,
    with the same shapes, has a cosine near 0."""
    tensors = sample(base)
    if not tensors:
        return None
    dot = base_sq = expert_sq = delta_sq = 0.0
    for tensor in tensors:  # dot products in place: every temporary is pages to fault in
        # float32 dot products (half the bytes of float64), ample for a threshold of 0.5
        b, e = base.tensor(tensor).float().view(-1), expert.tensor(tensor).float().view(-1)
        dot, base_sq = dot + float(b @ e), base_sq + float(b @ b)
        expert_sq += float(e @ e)
        delta = e.sub_(b)
        delta_sq += float(delta @ delta)
    cosine = dot / max((base_sq * expert_sq) ** 0.5, 1e-30)
    if cosine >= MIN_COSINE:
        return None
    return (f"expert '{name}' ({expert.path}) does not look like a fine-tune of the base: over "
            f"{len(tensors)} tensors ({tensors[0]}, ...) ||expert - base|| / ||base|| is "
            f"{(delta_sq / max(base_sq, 1e-30)) ** 0.5:.2f} and the cosine {cosine:.2f} (a "
            f"fine-tune keeps it near 1, below {MIN_COSINE} is suspect); --strict makes this an "
            "error")


def check_adapter_base(base: Checkpoint, name: str, adapter: Adapter) -> str | None:
    """The base an adapter names (adapter_config's base_model_name_or_path) is --base: the same
    folder, or one with the same weights (a sample compared exactly); another folder is an
    error. A hub id cannot be compared offline: unless --base goes by that name, a warning."""
    declared = adapter.settings.base_model_name_or_path
    if not declared:
        return (f"expert '{name}' ({adapter.path}) is an adapter that names no base model; "
                f"--base {base.path} is assumed to be its base; --strict makes this an error")
    local = Path(declared)
    if (local / "config.json").is_file():
        if local.resolve() == base.path.resolve():
            return None
        other = Checkpoint(local, f"the base of adapter '{name}'")
        for tensor in sample(base):
            theirs = other.tensors.get(tensor)
            if theirs is None or theirs.shape != base.tensors[tensor].shape or not bool(
                    (other.tensor(tensor) == base.tensor(tensor)).all()):
                raise ChmcError(f"expert '{name}' ({adapter.path}) is an adapter of {declared}, "
                                f"not of --base {base.path}: tensor '{tensor}' differs")
        return None
    names = {base.path.resolve().name.lower(),
             str(base.config.get("_name_or_path", "")).rstrip("/").rsplit("/", 1)[-1].lower()}
    if declared.rstrip("/").rsplit("/", 1)[-1].lower() in names:
        return None
    return (f"expert '{name}' ({adapter.path}) is an adapter of '{declared}', which is not a "
            f"folder here: --base {base.path} is assumed to be it (the shapes match); --strict "
            "makes this an error")


def plan_tasks(base: Checkpoint, groups: int, dtype: str | None) -> tuple[TensorTask, ...]:
    """2-D float tensors are channel-merged; everything else is stored per expert."""
    tasks = []
    for name, info in base.tensors.items():
        if base.tied and name == "lm_head.weight":
            continue  # tied to the embedding: stored once, re-tied on load
        merged = len(info.shape) == 2 and info.dtype in FLOAT_DTYPES
        out_dtype = dtype if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype
        tasks.append(TensorTask(name, "merged" if merged else "stacked", info.shape, info.dtype,
                                out_dtype, groups))
    return tuple(tasks)


def stored_parameters(tasks: tuple[TensorTask, ...] | list[TensorTask], n: int) -> int:
    """Parameters an artifact of these tasks stores: K per merged tensor, N per stacked one."""
    return sum((t.groups if t.kind == "merged" else n) * t.stored_parameters for t in tasks)
