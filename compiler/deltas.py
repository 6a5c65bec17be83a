"""The experts' deltas of one tensor, read in the layout the merge and the budget stream through."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from chmc.compiler.methods import Blocks, Map, serial_map
from chmc.compiler.plan import BuildPlan, TensorTask
from chmc.compiler.regmean import DAMPING, GramSolver

CHUNK_ELEMENTS = 1 << 22  # rows per block: about this many fp32 values per expert stack
SLICE_ELEMENTS = 1 << 28  # fp32 deltas held at once (1 GiB): all experts' rows of a row slice


def row_blocks(rows: int, row_elements: int, divide: int = 1) -> list[tuple[int, int]]:
    """[a, b) row ranges of about CHUNK_ELEMENTS / `divide` values each."""
    step = max(1, CHUNK_ELEMENTS // divide // max(1, row_elements))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


class Scratch:
    """Large buffers kept from one tensor to the next: above glibc's 32 MB mmap threshold every
    fresh allocation is pages the kernel zeroes on first touch, which cost more than the merge's
    own arithmetic on them."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...],
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor over buffer `name`, which grows when it is too small."""
        nbytes = math.prod(shape) * dtype.itemsize
        if name not in self._buffers or self._buffers[name].numel() < nbytes:
            self._buffers.pop(name, None)  # freed before its successor is allocated
            self._buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[name][:nbytes].view(dtype).view(shape)


class Deltas:
    """One tensor's expert deltas d_n = expert_n - base in fp32, [N, out, in], held one row slice
    at a time: the whole tensor when it fits SLICE_ELEMENTS (read once, however often it is
    scanned), else slices read again on every scan, so memory stays bounded at any model size
    (a 128k-vocabulary embedding of 4 experts is 4 GB of deltas at 1B, 8 GB at 8B, and first
    touches of fresh memory cost more than reading the slices twice). A slice is stored
    [R, N, in]: a block of its rows is one contiguous [R, N, in] batch for per-row matmuls.

    `scan()` loads each slice in turn; `rows(a, b)` is the [N, R, in] view of rows [a, b) of the
    slice loaded; `base(a, b)` the base's rows in fp32; `blocks(divide)` row blocks that never
    cross a slice."""

    def __init__(self, shape: tuple[int, int, int], slice_rows: int,
                 read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
                 sample: Callable[[int], torch.Tensor]):
        self.shape = shape
        out = shape[1]
        self.slices = [(a, min(a + slice_rows, out)) for a in range(0, out, slice_rows)]
        self._read, self._sample = read, sample
        self._loaded: int | None = None
        self._rows = self._base = torch.empty(0)

    @classmethod
    def held(cls, deltas: torch.Tensor, slice_rows: int | None = None) -> Deltas:
        """Deltas already in memory [N, out, in] (tests), optionally scanned in slices."""
        n, out, inp = deltas.shape
        return cls((n, out, inp), slice_rows or out, lambda a, b: (deltas[:, a:b], None),
                   lambda step: deltas[:, ::step])

    @classmethod
    def read(cls, plan: BuildPlan, task: TensorTask, pmap: Map = serial_map,
             scratch: Scratch | None = None) -> Deltas:
        """The deltas of `task`'s tensor, read from the plan's checkpoints into scratch buffers
        'deltas' and 'base' (experts spread over pmap), samples too."""
        scratch = Scratch() if scratch is None else scratch
        n, (out, inp) = len(plan.experts), task.shape
        ckpts = list(plan.experts.values())
        slice_rows = max(1, SLICE_ELEMENTS // max(1, n * inp))

        def read(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            source = plan.base.tensor(task.name)[rows]
            base = scratch.take("base", tuple(source.shape))
            # converted by the workers in halves: on the main thread it left a core idle
            halves = [slice(0, len(base) // 2), slice(len(base) // 2, None)]
            pmap(lambda h: base[h].copy_(source[h]), halves)
            stored = scratch.take("deltas", (base.shape[0], n, inp))
            pmap(lambda i: difference(ckpts[i].tensor(task.name)[rows], base, stored, i),
                 range(n))
            return stored.transpose(0, 1), base

        return cls((n, out, inp), slice_rows, lambda a, b: read(slice(a, b)),
                   lambda step: read(slice(None, None, step))[0])

    def load(self, i: int) -> None:
        """Read slice i into the buffers (again)."""
        self._rows, base = self._read(*self.slices[i])
        self._base = torch.empty(0) if base is None else base
        self._loaded = i

    def scan(self) -> Iterator[tuple[int, int]]:
        """Each slice's rows [a, b), loaded before it is yielded."""
        for i, rows in enumerate(self.slices):
            if self._loaded != i:
                self.load(i)
            yield rows

    def rows(self, a: int, b: int) -> torch.Tensor:
        """[N, b - a, in]: rows [a, b) of the slice loaded."""
        start = self._start(a, b)
        return self._rows[:, a - start : b - start]

    def base(self, a: int, b: int) -> torch.Tensor:
        """[b - a, in]: the base's rows [a, b) of the slice loaded, in fp32."""
        start = self._start(a, b)
        return self._base[a - start : b - start]

    def _start(self, a: int, b: int) -> int:
        assert self._loaded is not None, "no slice loaded: scan() first"
        start, end = self.slices[self._loaded]
        assert start <= a <= b <= end, f"rows {a}..{b} are not in the slice loaded"
        return start

    def sample(self, step: int) -> torch.Tensor:
        """[N, S, in]: every step-th row from row 0, valid until the next scan."""
        if len(self.slices) > 1:
            self._loaded = None  # the sample may take the slice's buffers
            return self._sample(step)
        next(self.scan())
        return self._rows[:, ::step]

    def blocks(self, divide: int = 1) -> Blocks:
        """row_blocks of every slice, in order."""
        n, _, inp = self.shape
        return [(a + x, a + y) for a, b in self.slices for x, y in row_blocks(b - a, n * inp,
                                                                              divide)]


def difference(expert: torch.Tensor, base: torch.Tensor, out: torch.Tensor, i: int) -> None:
    """out[:, i] = expert - base in fp32 (expert [R, in] in its own dtype, base [R, in] fp32,
    out [R, N, in])."""
    if expert.dtype == torch.bfloat16 and expert.is_contiguous():
        from chmc.compiler import fused  # numba: imported on first use

        fused.bf16_minus(expert.view(torch.int16).numpy(), base.numpy(), out.numpy(), i)
    else:  # a plain copy converts, then an fp32 sub: twice as fast as one mixed-dtype sub
        out[:, i].copy_(expert).sub_(base)


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
