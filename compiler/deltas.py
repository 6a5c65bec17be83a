"""The experts' deltas of one tensor, read in the layout the merge and the budget stream through."""

from __future__ import annotations

import torch

from chmc.compiler.methods import Map, serial_map
from chmc.compiler.plan import BuildPlan, TensorTask
from chmc.compiler.regmean import DAMPING, GramSolver

CHUNK_ELEMENTS = 1 << 22  # rows per block: about this many fp32 values per expert stack


def row_blocks(rows: int, row_elements: int, divide: int = 1) -> list[tuple[int, int]]:
    """[a, b) row ranges of about CHUNK_ELEMENTS / `divide` values each."""
    step = max(1, CHUNK_ELEMENTS // divide // max(1, row_elements))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def load_deltas(plan: BuildPlan, task: TensorTask, base: torch.Tensor | None = None,
                pmap: Map = serial_map, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """expert_n - base in fp32: [N, out, in], a view of [out, N, in] storage, so that a block of
    rows [N, R, in] is one contiguous [R, N, in] batch for the per-row matmuls."""
    if base is None:
        base = plan.base.tensor(task.name).float()
    out, inp = task.shape
    shape = (out, len(plan.experts), inp)
    deltas = torch.empty(shape) if buffer is None else buffer.view(shape)  # fp32
    ckpts = list(plan.experts.values())
    # a plain copy converts, then an fp32 sub: twice as fast as one mixed-dtype sub
    pmap(lambda i: deltas[:, i].copy_(ckpts[i].tensor(task.name)).sub_(base), range(len(ckpts)))
    return deltas.transpose(0, 1)


def tensor_solver(plan: BuildPlan, task: TensorTask) -> GramSolver | None:
    """This tensor's calibration Grams (identity where it has none), or None without calibration."""
    if plan.gram_files is None:
        return None
    damping = plan.params.values.get("damping", DAMPING)
    return plan.gram_files.solver(task.name, len(plan.experts), damping)


def merge_weights(plan: BuildPlan, n: int) -> torch.Tensor:
    """The merge weights [N]; a method without any (regmean) groups with uniform ones."""
    weights = plan.params.weights()
    return weights if len(weights) else torch.ones(n)
