"""K per tensor under a memory budget (--budget F: at most F x the ensemble's parameters).

A planning step: `apply_budget(plan)` returns the plan with each merged tensor's K chosen. For
each channel-merged tensor, the error of its best grouping at every K = 1..N is measured in one
streamed pass: the output error on the calibration inputs when the build has calibration
(RegMean-merged groups), else the weight-space error of mean-merged groups (regmean.py with
identity Grams). Each curve is divided by the tensor's error at "no delta kept", so tensors of
different scale compare. Then, starting from K=1 everywhere, the step (tensor, K -> K') with the
largest error reduction per added parameter that still fits is taken until none fits (looking past
the next K, so a curve that drops late is not starved).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from chmc.compiler.deltas import Deltas, merge_weights, tensor_solver
from chmc.compiler.grouping import output_error_clustering
from chmc.compiler.methods import blocks_in
from chmc.compiler.plan import BuildPlan, TensorTask, stored_parameters
from chmc.compiler.regmean import MAX_SUBSET_EXPERTS, GramSolver, RowBatch, best_partitions
from chmc.errors import ChmcError
from chmc.formats.artifact import Budget
from chmc.progress import Stages, millions


def error_curve(plan: BuildPlan, task: TensorTask) -> list[float]:
    """Relative error of the best grouping at K = 1..N for one merged tensor."""
    deltas = Deltas.read(plan, task)  # [N, out, in]
    n = deltas.shape[0]
    solver = tensor_solver(plan, task) or GramSolver(None, n, 0.0)
    curve = torch.zeros(n, dtype=torch.float64)
    total = 0.0
    blocks = deltas.blocks()
    for rows in deltas.scan():
        for i in blocks_in(blocks, rows):
            batch = RowBatch(deltas.rows(*blocks[i]), merge_weights(plan, n), calib=solver)
            errors, row_total = errors_by_k(solver, batch)
            curve += errors.double().sum(0)
            total += float(row_total.double().sum())
    return (curve / total).tolist() if total > 0 else [0.0] * n


def errors_by_k(solver: GramSolver, batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the output error of the grouping the build would choose at each K = 1..N, and
    of merging nothing: -> [R, N], [R]. Exhaustive up to MAX_SUBSET_EXPERTS experts; above, the
    output-error clustering's heuristic at each K, scored by its exact error."""
    if solver.n <= MAX_SUBSET_EXPERTS:
        _, errors, total = best_partitions(solver, batch, solver.n)
        return errors, total
    e = solver.weighted(batch.deltas)  # [N, R, in]
    errors = torch.stack([solver.partition_error(batch, output_error_clustering(batch, k), e)
                          for k in range(1, solver.n + 1)], 1)
    return errors.clamp_min(0), solver.total(batch, e)


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


def apply_budget(plan: BuildPlan, stages: Stages) -> BuildPlan:
    """The plan with each merged tensor's K chosen under plan.budget, and the choice recorded."""
    if plan.budget is None:
        return plan
    n = len(plan.experts)
    merged = [t for t in plan.tasks if t.kind == "merged"]
    curves: dict[str, list[float]] = {}
    units = millions([math.prod(task.shape) for task in merged])
    with stages.bar("budget: error per K (M parameters)", sum(units)) as advance:
        for task, size in zip(merged, units):
            curves[task.name] = error_curve(plan, task)
            advance(task.name, size)
    sizes = {t.name: t.stored_parameters for t in merged}
    fixed = stored_parameters([replace(t, groups=1) for t in plan.tasks], n) - sum(sizes.values())
    ks = choose_groups(curves, sizes, fixed, plan.budget * n * plan.base_parameters, plan.groups)
    tasks = tuple(replace(t, groups=ks[t.name]) if t.kind == "merged" else t for t in plan.tasks)
    summary = Budget(fraction=plan.budget, max_groups=plan.groups,
                     error={name: curves[name][ks[name] - 1] for name in curves}, curves=curves)
    return plan.with_(tasks=tasks, budget_summary=summary)
