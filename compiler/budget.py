"""K per tensor under a memory budget (--budget F: at most F x the ensemble's parameters).

For each channel-merged tensor, the error of its best grouping at every K = 1..N is measured in
one streamed pass: the output error on the calibration inputs when the build has calibration
(RegMean-merged groups), else the weight-space error of mean-merged groups (regmean.py with
identity Grams). Each curve is divided by the tensor's error at "no delta kept", so tensors of
different scale compare. Then, starting from K=1 everywhere, the step (tensor, K -> K') with the
largest error reduction per added parameter that still fits is taken until none fits (looking past
the next K, so a curve that drops late is not starved).
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import TYPE_CHECKING

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch
    from chmc.compiler.grouping import RowBatch
    from chmc.compiler.merge import BuildPlan, TensorTask
    from chmc.compiler.regmean import GramSolver


def error_curve(plan: BuildPlan, task: TensorTask) -> list[float]:
    """Relative error of the best grouping at K = 1..N for one merged tensor."""
    import torch
    from chmc.compiler.grouping import RowBatch
    from chmc.compiler.merge import load_deltas, row_blocks, tensor_solver
    from chmc.compiler.regmean import GramSolver

    deltas = load_deltas(plan, task)  # [N, out, in]
    n = deltas.shape[0]
    solver = tensor_solver(plan, task) or GramSolver(None, n, 0.0)
    curve = torch.zeros(n, dtype=torch.float64)
    total = 0.0
    for a, b in row_blocks(task.shape[0], n * task.shape[1]):
        batch = RowBatch(deltas[:, a:b], plan.params.weights(), calib=solver)
        errors, row_total = errors_by_k(solver, batch)
        curve += errors.double().sum(0)
        total += float(row_total.double().sum())
    return (curve / total).tolist() if total > 0 else [0.0] * n


def errors_by_k(solver: GramSolver, batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the output error of the grouping the build would choose at each K = 1..N, and
    of merging nothing: -> [R, N], [R]. Exhaustive up to MAX_SUBSET_EXPERTS experts; above, the
    output-error clustering's heuristic at each K, scored by its exact error."""
    import torch
    from chmc.compiler.grouping import output_error_clustering
    from chmc.compiler.regmean import MAX_SUBSET_EXPERTS, best_partitions

    if solver.n <= MAX_SUBSET_EXPERTS:
        _, errors, total = best_partitions(solver, batch, solver.n)
        return errors, total
    e = solver.weighted(batch.deltas)  # [N, R, in]
    errors = torch.stack([solver.partition_error(batch, output_error_clustering(batch, k), e)
                          for k in range(1, solver.n + 1)], 1)
    return errors.clamp_min(0), solver.total(batch, e)


def params_at(tasks: list[TensorTask], n: int, ks: dict[str, int] | None = None) -> int:
    """Stored parameters (banks + per-expert tensors) with K per merged tensor (default 1)."""
    return sum((ks or {}).get(t.name, 1) * prod(t.shape) if t.kind == "merged"
               else n * prod(t.shape) for t in tasks)


def check_budget(tasks: list[TensorTask], n: int, ensemble: int, budget: float) -> None:
    """Before any work: the budget must hold the K=1 artifact."""
    least = params_at(tasks, n) / ensemble
    if least > budget:
        raise ChmcError(f"--budget {budget} is below the smallest artifact: K=1 everywhere "
                        f"stores {least:.4f} of the ensemble's parameters")


def choose_groups(curves: dict[str, list[float]], sizes: dict[str, int], fixed: int,
                  limit: float, max_k: int) -> dict[str, int]:
    """Greedy K per tensor: curves {name: err at K=1..N}, sizes {name: out*in}, `fixed` params
    that do not depend on K, `limit` params allowed. -> {name: K}."""
    ks = dict.fromkeys(curves, 1)
    used = fixed + sum(sizes.values())
    if used > limit:
        raise ChmcError(f"--budget is below the smallest artifact (K=1 everywhere needs "
                        f"{used} parameters, the budget allows {int(limit)})")
    while True:
        best: tuple[float, str, int] | None = None
        for name, curve in curves.items():
            k = ks[name]
            for k2 in range(k + 1, max_k + 1):
                cost = (k2 - k) * sizes[name]
                if used + cost > limit:
                    break
                gain = (curve[k - 1] - curve[k2 - 1]) / cost
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, k2)
        if best is None:
            return ks
        _, name, k2 = best
        used += (k2 - ks[name]) * sizes[name]
        ks[name] = k2


def apply_budget(plan: BuildPlan, progress: bool = True) -> tuple[list[TensorTask], dict]:
    """The plan's tasks with each merged tensor's K chosen under plan.budget, and a summary."""
    from rich.progress import Progress

    n = len(plan.experts)
    merged = [t for t in plan.tasks if t.kind == "merged"]
    curves: dict[str, list[float]] = {}
    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("budget: error per K", total=len(merged))
        for task in merged:
            bar.update(job, description=f"budget: {task.name}")
            curves[task.name] = error_curve(plan, task)
            bar.advance(job)
    sizes = {t.name: t.shape[0] * t.shape[1] for t in merged}
    fixed = params_at(plan.tasks, n) - sum(sizes.values())
    base_params = sum(info.numel for info in plan.base.tensors.values())
    assert plan.budget is not None
    ks = choose_groups(curves, sizes, fixed, plan.budget * n * base_params, plan.groups)
    tasks = [replace(t, groups=ks[t.name]) if t.kind == "merged" else t for t in plan.tasks]
    summary = {"fraction": plan.budget, "max_groups": plan.groups,
               "error": {name: curves[name][ks[name] - 1] for name in curves},
               "curves": curves}
    return tasks, summary
