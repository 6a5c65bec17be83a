"""The build's executor: a final BuildPlan -> a channel-merged artifact (chmc.formats.artifact).

`write_artifact` streams the plan's tasks: each reads its tensor from the checkpoints, merges it
in blocks of rows and appends the results to the artifact's shards, so peak memory is the deltas
of one row slice (at most 1 GiB, deltas.Deltas) and two banks of the largest tensor, never the
model.

Per merged tensor [out, in]: deltas d_n = expert_n - base in fp32 [N, out, in]; labels [out, N]
from the clustering on the raw deltas; the method's per-tensor sparsification; per group the
merged delta; bank[k, c] = base[c] + merged[k, c]. A group with one member stores that expert's
row exactly, and bank slots unused by a row copy group 0, so the bank is always [K, out, in].
Experts (loading, TIES thresholds) and row blocks (grouping, merging) are independent work items,
spread over Python threads (`worker_map`); results do not depend on threads, block or slice
sizes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from chmc.compiler.deltas import Deltas, Scratch, merge_weights, tensor_solver
from chmc.compiler.grouping import group_rows
from chmc.compiler.methods import Blocks, Map, blocks_in, serial_map
from chmc.compiler.plan import BuildPlan, TensorTask
from chmc.compiler.regmean import GramSolver, RowBatch
from chmc.errors import ChmcError
from chmc.formats.artifact import (
    Accounting,
    ArtifactManifest,
    Expert,
    Source,
    TensorEntry,
    TensorStats,
    write_manifest,
)
from chmc.formats.checkpoint import copy_side_files
from chmc.formats.safetensors import ShardedSafetensorsWriter, TensorSpec
from chmc.progress import Stages, millions


def keep_freed_memory() -> None:
    """Have glibc reuse freed blocks up to 32 MB instead of unmapping them: the merge frees and
    allocates the same large temporaries per row block, and faulting in fresh zeroed pages for
    each is mostly system time. Process-wide."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 1 << 30)


def build_threads() -> int:
    """Threads for the build: $CHMC_THREADS, default torch's own (every core). Calibration runs
    them as torch's intra-op threads; plain merging as Python threads over experts and row blocks
    (see worker_map)."""
    value = os.environ.get("CHMC_THREADS", str(torch.get_num_threads()))
    if not value.isdigit() or int(value) < 1:
        raise ChmcError(f"CHMC_THREADS={value!r}: expected a positive integer")
    return int(value)


@contextmanager
def build_threading() -> Iterator[int]:
    """torch's intra-op threads set to build_threads() for the build, restored after."""
    previous = torch.get_num_threads()
    threads = build_threads()
    torch.set_num_threads(threads)
    keep_freed_memory()
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


@contextmanager
def worker_map(workers: int) -> Iterator[Map]:
    """A map over `workers` Python threads, each running torch on one intra-op thread (torch and
    numpy release the GIL). On a core shared with another job, OpenMP's barriers stall where
    independent Python threads do not; on idle cores they scale alike."""
    if workers == 1:
        yield serial_map
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            yield lambda fn, items: list(pool.map(fn, items))
    finally:
        torch.set_num_threads(previous)


def write_artifact(plan: BuildPlan, folder: Path, stages: Stages, threads: int) -> None:
    """Execute the final plan into `folder` (an empty staging folder): shards, side files,
    manifest."""
    n = len(plan.experts)
    entries: dict[str, TensorEntry] = {}
    specs = [s for t in plan.tasks for s in t.specs(n)]
    writer = ShardedSafetensorsWriter(folder, specs)
    hashing = threading.Thread(target=content_hashes, args=(plan,), daemon=True)
    hashing.start()  # reads every weight file once; overlaps the merge's serial parts
    workers = threads if plan.gram_files is None else 1  # regmean caches factors per tensor
    scratch = Scratch()
    # one write in flight while the next tensor merges (disk writes are a sixth of a 1B build):
    # tasks alternate between two bank buffers, and a task's write must end before the task
    # after next takes its buffer again
    writing: Future[None] | None = None
    # the first tensor, the embedding, is a fifth of a 1B model: counted in tensors, the ETA
    # after it was 50x the build
    sizes = millions([math.prod(task.shape) for task in plan.tasks])
    with stages.bar("channel-merging (M parameters)", sum(sizes)) as advance, \
            worker_map(workers) as pmap, ThreadPoolExecutor(1) as writer_thread:
        for i, task in enumerate(plan.tasks):
            entries[task.name], tensors = run_task(plan, task, pmap, scratch, f"bank{i % 2}")
            if writing is not None:
                writing.result()
            writing = writer_thread.submit(write_all, writer, tensors)
            advance(task.name, sizes[i])
        if writing is not None:
            writing.result()
    writer.close()
    hashing.join()
    copy_side_files(plan.base.path, folder, dtype=plan.dtype)
    write_manifest(folder, make_manifest(plan, entries, specs, writer.weight_map))


def write_all(writer: ShardedSafetensorsWriter, tensors: list[tuple[str, torch.Tensor]]) -> None:
    for name, tensor in tensors:
        writer.write(name, tensor)


def content_hashes(plan: BuildPlan) -> None:
    """Fill the checkpoints' cached content hashes (a failure resurfaces in make_manifest)."""
    with suppress(OSError):
        for ckpt in [plan.base, *plan.experts.values()]:
            ckpt.content_hash  # noqa: B018


def run_task(plan: BuildPlan, task: TensorTask, pmap: Map = serial_map,
             scratch: Scratch | None = None, bank: str = "bank"
             ) -> tuple[TensorEntry, list[tuple[str, torch.Tensor]]]:
    """Merge or stack one tensor: its manifest entry and the tensors to write, in order (the
    bank lives in scratch buffer `bank` until it is reused)."""
    if task.kind == "stacked":
        out_dtype = getattr(torch, task.out_dtype)
        stacked = torch.stack([c.tensor(task.name).to(out_dtype) for c in plan.experts.values()])
        return (TensorEntry(kind="stacked", shape=task.shape, dtype=task.out_dtype),
                [(f"{task.name}.experts", stacked)])  # [N, ...]
    merged, labels, stats = merge_tensor(plan, task, pmap, scratch, bank)
    return (TensorEntry(kind="merged", shape=task.shape, dtype=task.out_dtype,
                        groups=task.groups, stats=stats),
            [(f"{task.name}.bank", merged),  # [K, out, in]
             (f"{task.name}.index", labels.T.to(torch.uint8).contiguous())])  # [N, out]


def merge_tensor(plan: BuildPlan, task: TensorTask, pmap: Map = serial_map,
                 scratch: Scratch | None = None, bank_buffer: str = "bank"
                 ) -> tuple[torch.Tensor, torch.Tensor, TensorStats]:
    """One 2-D tensor -> (bank [K, out, in], labels [out, N], stats), streamed in row blocks over
    the deltas' slices; experts and blocks are independent work items for pmap. The deltas and
    the bank live in `scratch`'s buffers: the bank is valid until `bank_buffer` is taken again."""
    scratch = Scratch() if scratch is None else scratch
    n, k = len(plan.experts), task.groups
    deltas = Deltas.read(plan, task, pmap, scratch)
    calib = tensor_solver(plan, task)
    # grouping's cost is mostly per call (small [R, N, N] ops), and regmean reads each subset's
    # [in, in] factor once per block: both on whole chunks; plain merging on quarter chunks, so
    # that the worker threads share even a 1024 x 1024 tensor of 4 experts
    big = deltas.blocks()
    blocks = big if plan.method.calibrated else deltas.blocks(4)
    sparsify = plan.method.sparsify
    apply = None if sparsify is None else sparsify(
        deltas, plan.params, [_generator(plan, task, i) for i in range(n)], blocks, pmap)
    bank = scratch.take(bank_buffer, (k, *task.shape), getattr(torch, task.out_dtype))
    extra = {"calib": calib} if plan.method.calibrated else {}

    fused = plan.method.fused
    # per block, written in place: small results kept alive between the blocks' freed 2 MB
    # temporaries split those holes, and every block then takes fresh memory (+2 GB at embed)
    errors = torch.zeros(len(blocks), n, dtype=torch.float64)
    labels = torch.empty(task.shape[0], n, dtype=torch.long)
    delta_sq: list[torch.Tensor] = []  # ||d_n||^2 per grouping block [N], summed in order

    def merge_block(b_i: int) -> None:
        a, b = blocks[b_i]
        raw = deltas.rows(a, b)  # [N, R, in]
        if fused is not None:  # apply included
            merged = fused(raw, labels[a:b], k, plan.params, apply, b_i, errors[b_i])
        else:
            used = raw if apply is None else apply(raw, b_i)
            merged = plan.method.combine(used, labels[a:b], k, plan.params, **extra)  # [K, R, in]
            errors[b_i] = block_error(merged, raw, labels[a:b], shared_rows(labels[a:b], k))
        torch.add(merged, deltas.base(a, b), out=bank[:, a:b])  # in fp32, cast to bank's dtype

    for rows in deltas.scan():
        delta_sq += group_all_rows(plan, deltas, [big[i] for i in blocks_in(big, rows)], k,
                                   labels, calib, pmap)
        pmap(merge_block, blocks_in(blocks, rows))
    err_sq = errors.sum(0)
    dsq = sum(delta_sq, torch.zeros(n, dtype=torch.float64))
    sizes = torch.nn.functional.one_hot(labels, k).sum(1)  # [out, K]: members per group
    copy_singletons(plan, task, bank, labels, sizes)
    names = plan.names
    return bank, labels, TensorStats(
        rel_error={m: rel_error(float(e), float(d)) for m, e, d in zip(names, err_sq, dsq)},
        err_sq=dict(zip(names, err_sq.tolist())), delta_sq=dict(zip(names, dsq.tolist())),
        mean_groups_used=float((sizes > 0).sum(1).float().mean()))


def shared_rows(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[R, N]: 1 where expert n's row is merged with others' (its group has other members)."""
    sizes = torch.nn.functional.one_hot(labels, k).sum(1)  # [R, K]: members per group
    return (sizes.gather(1, labels) > 1).float()


def block_error(merged: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor,
                shared: torch.Tensor) -> torch.Tensor:
    """sum_r ||merged[labels[r, n], r] - raw[n, r]||^2 over the rows where expert n is merged
    (single-member rows are exact copies, see copy_singletons). -> [N] fp64."""
    k, r, inp = merged.shape
    flat = merged.transpose(0, 1).reshape(r * k, inp)  # [R*K, in]
    rec = flat.index_select(0, (labels + torch.arange(r)[:, None] * k).view(-1))  # [R*N, in]
    rec.sub_(raw.transpose(0, 1).reshape(rec.shape))  # each expert's merged row minus its own
    row_sq = torch.linalg.vector_norm(rec, dim=1).square().view(labels.shape)  # [R, N]
    return (row_sq * shared).sum(0, dtype=torch.float64)


def group_all_rows(plan: BuildPlan, deltas: Deltas, blocks: Blocks, k: int,
                   labels: torch.Tensor, calib: GramSolver | None = None,
                   pmap: Map = serial_map) -> list[torch.Tensor]:
    """The clustering's labels of the rows of `blocks` (in the slice loaded) into labels [out, N];
    -> ||d_n||^2 [N] per block, from the Gram diagonals."""
    weights = merge_weights(plan, deltas.shape[0])

    def group(block: tuple[int, int]) -> torch.Tensor:
        batch = RowBatch(deltas.rows(*block), weights, calib=calib)
        labels[block[0] : block[1]] = group_rows(plan.clustering, batch, k)
        return batch.gram.diagonal(dim1=1, dim2=2).sum(0)

    return pmap(group, blocks)


def _generator(plan: BuildPlan, task: TensorTask, expert: int) -> torch.Generator:
    """Seeded per (seed, tensor, expert): DARE's drops do not depend on the tensor order."""
    return torch.Generator().manual_seed(zlib.crc32(f"{plan.seed}/{task.name}/{expert}".encode()))


def copy_singletons(plan: BuildPlan, task: TensorTask, bank: torch.Tensor, labels: torch.Tensor,
                    sizes: torch.Tensor) -> None:
    """A group with one member stores that expert's row exactly; unused slots copy group 0."""
    out = task.shape[0]
    rows = torch.arange(out)
    flat = bank.view(-1, task.shape[1])  # [K*out, in]: slot (g, c) is row g*out + c
    for i, ckpt in enumerate(plan.experts.values()):
        alone = rows[sizes.gather(1, labels[:, i : i + 1])[:, 0] == 1]
        if len(alone):
            src = ckpt.tensor(task.name).index_select(0, alone).to(bank.dtype)
            flat.index_copy_(0, labels[alone, i] * out + alone, src)
    for g in range(1, task.groups):
        empty = rows[sizes[:, g] == 0]
        flat.index_copy_(0, g * out + empty, flat.index_select(0, empty))


def rel_error(err_sq: float, delta_sq: float) -> float:
    """||W_rec - W_expert|| / ||W_expert - W_base||; 0 when both are 0."""
    if delta_sq == 0:
        return 0.0 if err_sq == 0 else float("inf")
    return (err_sq / delta_sq) ** 0.5


def make_manifest(plan: BuildPlan, entries: dict[str, TensorEntry], specs: list[TensorSpec],
                  weight_map: dict[str, str]) -> ArtifactManifest:
    n = len(plan.experts)
    base_params = plan.base_parameters
    artifact_params = sum(math.prod(s.shape) for s in specs if not s.name.endswith(".index"))
    index_bytes = sum(s.nbytes for s in specs if s.name.endswith(".index"))
    merged = [e.stats for e in entries.values() if e.stats is not None]
    experts = []
    for name, ckpt in plan.experts.items():
        err = sum(s.err_sq[name] for s in merged)
        dsq = sum(s.delta_sq[name] for s in merged)
        experts.append(Expert(name=name, path=str(ckpt.path.resolve()), sha256=ckpt.content_hash,
                              kind=ckpt.kind, rel_error=rel_error(err, dsq)))
    return ArtifactManifest(
        architecture=plan.base.architecture,
        base=Source(path=str(plan.base.path.resolve()), sha256=plan.base.content_hash),
        experts=experts,
        groups=max((t.groups for t in plan.tasks if t.kind == "merged"), default=plan.groups),
        budget=plan.budget_summary, clustering=plan.clustering, method=plan.method.name,
        calibration=None if not plan.calibration else {
            name: str(path.resolve()) for name, path in plan.calibration.items()},
        parameters={**plan.params.to_json(plan.names), "seed": plan.seed},
        dtype=plan.dtype or next((t.dtype for t in plan.tasks if t.kind == "merged"), None),
        tie_word_embeddings=plan.base.tied, tensors=entries, weight_map=weight_map,
        accounting=Accounting(base=base_params, ensemble=n * base_params,
                              artifact=artifact_params, index_bytes=index_bytes,
                              ratio=artifact_params / (n * base_params)))
