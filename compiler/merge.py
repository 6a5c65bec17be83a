"""Stage 2, the build: N experts + base -> a channel-merged artifact (see compiler/artifact.py).

Plan, then execute (mergekit style). `plan_build` opens every checkpoint from its headers and
validates everything (names, architectures, tensor sets, shapes, dtypes, K, method parameters,
the output path) without reading a weight or writing a byte. It emits one `TensorTask` per base
tensor. `execute` then streams the tasks: each reads its tensor from the memory-mapped files,
merges it in blocks of rows and appends the results to the artifact's shards, so peak memory is a
few copies of the largest tensor, never the model.

Per merged tensor [out, in]: deltas d_n = expert_n - base in fp32 [N, out, in]; labels [out, N]
from the clustering on the raw deltas; the method's per-tensor sparsification; per group the
merged delta; bank[k, c] = base[c] + merged[k, c]. A group with one member stores that expert's
row exactly, and bank slots unused by a row copy group 0, so the bank is always [K, out, in].
Experts (loading, TIES thresholds) and row blocks (grouping, merging) are independent work items,
spread over Python threads (`worker_map`); results do not depend on threads or block sizes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chmc.compiler.artifact import FORMAT, FORMAT_VERSION, MANIFEST, TensorSpec
from chmc.compiler.checkpoints import FLOAT_DTYPES, SIDE_FILES, Checkpoint
from chmc.compiler.grouping import get_clustering
from chmc.compiler.methods import MergeMethod, Resolved, get_method, serial_map
from chmc.compiler.outputs import check_output_path
from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch
    from chmc.compiler.calibration import GramFiles
    from chmc.compiler.regmean import GramSolver

MAX_EXPERTS = 256  # index tables are uint8
Map = Callable[[Callable[[Any], Any], Any], list]  # (fn, items) -> [fn(item)], maybe on threads
CHUNK_ELEMENTS = 1 << 22  # rows per block: about this many fp32 values per expert stack; plain
# merging (no per-block Gram factors) uses a quarter, so that the worker threads share even a
# 1024 x 1024 tensor of 4 experts


@dataclass(frozen=True)
class TensorTask:
    """One base tensor's work: channel-merged into K banks, or stored per expert."""

    name: str
    kind: str  # "merged" | "stacked"
    shape: tuple[int, ...]
    dtype: str  # source dtype
    out_dtype: str
    groups: int  # this tensor's K (a per-tensor budget may choose it later)

    def specs(self, n_experts: int) -> list[TensorSpec]:
        if self.kind == "stacked":
            return [TensorSpec(f"{self.name}.experts", (n_experts, *self.shape), self.out_dtype)]
        out, inp = self.shape
        return [TensorSpec(f"{self.name}.bank", (self.groups, out, inp), self.out_dtype),
                TensorSpec(f"{self.name}.index", (n_experts, out), "uint8")]


@dataclass
class BuildPlan:
    base: Checkpoint
    experts: dict[str, Checkpoint]
    tasks: list[TensorTask]
    groups: int
    clustering: str
    method: MergeMethod
    params: Resolved
    seed: int
    dtype: str | None
    out: Path
    force: bool
    calibration: dict[str, Path] | None = None  # expert -> prompts .jsonl or Gram folder
    budget: float | None = None  # fraction of the ensemble's parameters; K per tensor <= groups
    gram_files: GramFiles | None = None  # set by execute once the Grams exist
    budget_summary: dict[str, Any] | None = None  # set by execute: K choice and error curves
    scratch: torch.Tensor | None = None  # fp32, reused for every tensor's deltas

    @property
    def names(self) -> list[str]:
        return list(self.experts)


def parse_expert_specs(specs: list[str]) -> dict[str, str]:
    """['math=/a', 'code=/b'] -> {'math': '/a', 'code': '/b'}; a repeated name is an error."""
    experts: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ChmcError(f"expert '{spec}': expected NAME=PATH, e.g. math=./MetaMath-7B")
        if name in experts:
            raise ChmcError(f"duplicate expert name '{name}' ({experts[name]} and {path})")
        experts[name] = path
    return experts


def plan_build(base: str | Path, experts: dict[str, str | Path], out: str | Path, *, groups: int,
               clustering: str = "cosine", method: str = "mean",
               parameters: dict[str, Any] | None = None, seed: int = 0,
               dtype: str | None = None, force: bool = False,
               calibration: dict[str, str | Path] | None = None,
               budget: float | None = None) -> BuildPlan:
    """Validate everything and list the per-tensor tasks; reads headers only, writes nothing."""
    names = list(experts)
    if len(names) < 2:
        raise ChmcError(f"need at least two experts to merge, got {len(names)} ({', '.join(names)})")
    if len(names) > MAX_EXPERTS:
        raise ChmcError(f"at most {MAX_EXPERTS} experts are supported, got {len(names)}")
    for name in names:
        if not name or "=" in name or "/" in name:
            raise ChmcError(f"invalid expert name '{name}' (no '=', '/' or empty names)")
    if not 1 <= groups <= len(names):
        raise ChmcError(f"--groups must be between 1 and the number of experts ({len(names)}), "
                        f"got {groups}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ChmcError(f"--dtype '{dtype}' is not a float dtype ({', '.join(sorted(FLOAT_DTYPES))})")
    get_clustering(clustering)
    merge_method = get_method(method)
    params = merge_method.resolve(parameters, names)
    out_path = check_output_path(out, force)
    base_ckpt = Checkpoint(base)
    ckpts = {name: Checkpoint(path) for name, path in experts.items()}
    for name, ckpt in ckpts.items():
        check_compatible(base_ckpt, name, ckpt)
    tasks = plan_tasks(base_ckpt, groups, dtype)
    calib = check_calibration(calibration, names, clustering, merge_method, budget)
    if budget is not None:
        from chmc.compiler.budget import check_budget

        check_budget(tasks, len(names), len(names) * sum(i.numel for i in base_ckpt.tensors.values()),
                     budget)
    return BuildPlan(base_ckpt, ckpts, tasks, groups, clustering, merge_method, params, seed,
                     dtype, out_path, force, calib, budget)


def check_calibration(calibration: dict[str, str | Path] | None, names: list[str], clustering: str,
                      method: MergeMethod, budget: float | None) -> dict[str, Path] | None:
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
            raise ChmcError(f"--calibration names unknown expert '{name}' (experts: {', '.join(names)})")
    out = {}
    for name in names:
        if name not in calibration:
            raise ChmcError(f"--calibration has no prompts for expert '{name}' (every expert needs them)")
        path = Path(calibration[name])
        if not (path.is_file() and path.suffix == ".jsonl" or (path / "grams.json").is_file()):
            raise ChmcError(f"--calibration {name}={path}: expected an existing .jsonl prompt file "
                            f"(or a Gram folder from chmc.compiler.calibration.collect_grams)")
        out[name] = path
    return out


def tied(ckpt: Checkpoint) -> bool:
    return bool(ckpt.config.get("tie_word_embeddings", False))


def check_compatible(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    """Same architecture, same tensor names, shapes and dtypes as the base."""
    if expert.architecture != base.architecture:
        raise ChmcError(f"expert '{name}' ({expert.path}) is a {expert.architecture}, "
                        f"the base is a {base.architecture}")
    if tied(expert) != tied(base):
        raise ChmcError(f"expert '{name}': tie_word_embeddings is {tied(expert)}, "
                        f"the base has {tied(base)}")
    for tname, info in base.tensors.items():
        other = expert.tensors.get(tname)
        if other is None:
            raise ChmcError(f"expert '{name}' ({expert.path}) has no tensor '{tname}'")
        if other.shape != info.shape or other.dtype != info.dtype:
            raise ChmcError(
                f"expert '{name}': tensor '{tname}' is {list(other.shape)} {other.dtype}, "
                f"the base has {list(info.shape)} {info.dtype}"
            )
    extra = sorted(set(expert.tensors) - set(base.tensors))
    if extra:
        raise ChmcError(f"expert '{name}' has tensor '{extra[0]}', which the base lacks")


def plan_tasks(base: Checkpoint, groups: int, dtype: str | None) -> list[TensorTask]:
    """2-D float tensors are channel-merged; everything else is stored per expert."""
    tasks = []
    for name, info in base.tensors.items():
        if tied(base) and name == "lm_head.weight":
            continue  # tied to the embedding: stored once, re-tied on load
        merged = len(info.shape) == 2 and info.dtype in FLOAT_DTYPES
        out_dtype = dtype if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype
        tasks.append(TensorTask(name, "merged" if merged else "stacked", info.shape, info.dtype,
                                out_dtype, groups))
    return tasks


def build(base: str | Path, experts: dict[str, str | Path], out: str | Path, *, groups: int,
          clustering: str = "cosine", method: str = "mean",
          parameters: dict[str, Any] | None = None, seed: int = 0, force: bool = False,
          dtype: str | None = None, progress: bool = True,
          calibration: dict[str, str | Path] | None = None, budget: float | None = None) -> Path:
    """Channel-merge `experts` (name -> HF folder) over `base` into an artifact folder at `out`.
    `calibration` {expert: prompts.jsonl} enables output-aware grouping/merging; `budget` picks
    each tensor's K (<= groups) to fit that fraction of the ensemble's parameters."""
    plan = plan_build(base, experts, out, groups=groups, clustering=clustering, method=method,
                      parameters=parameters, seed=seed, dtype=dtype, force=force,
                      calibration=calibration, budget=budget)
    return execute(plan, progress=progress)


def execute(plan: BuildPlan, progress: bool = True) -> Path:
    """Stream every task into a staged folder; it appears at plan.out only when complete."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(build_threads())
    keep_freed_memory()
    try:
        return _execute(plan, progress)
    finally:
        torch.set_num_threads(previous)
        plan.scratch = None


def keep_freed_memory() -> None:
    """Have glibc reuse freed blocks up to 32 MB instead of unmapping them: the merge frees and
    allocates the same large temporaries per row block, and faulting in fresh zeroed pages each
    time cost 9 s of system time (3.3M page faults) on the 0.17B benchmark. Process-wide."""
    import ctypes
    import ctypes.util

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
    import torch

    value = os.environ.get("CHMC_THREADS", str(torch.get_num_threads()))
    if not value.isdigit() or int(value) < 1:
        raise ChmcError(f"CHMC_THREADS={value!r}: expected a positive integer")
    return int(value)


def _execute(plan: BuildPlan, progress: bool) -> Path:
    from chmc.compiler.artifact import ShardedSafetensorsWriter
    from chmc.compiler.outputs import staged_output
    from rich.progress import Progress

    n = len(plan.experts)
    entries: dict[str, Any] = {}
    with staged_output(plan.out, plan.force) as tmp:
        if plan.calibration:
            plan.gram_files = calibrate(plan, tmp / ".grams", progress)
        if plan.budget is not None:
            from chmc.compiler.budget import apply_budget

            plan.tasks, plan.budget_summary = apply_budget(plan, progress)
        specs = [s for t in plan.tasks for s in t.specs(n)]
        writer = ShardedSafetensorsWriter(tmp, specs)
        hashing = threading.Thread(target=content_hashes, args=(plan,), daemon=True)
        hashing.start()  # reads every weight file once; overlaps the merge's serial parts
        workers = build_threads() if plan.gram_files is None else 1  # regmean caches per tensor
        with Progress(transient=True, disable=not progress) as bar, worker_map(workers) as pmap:
            job = bar.add_task("channel-merging", total=len(plan.tasks))
            for task in plan.tasks:
                bar.update(job, description=task.name)
                entries[task.name] = run_task(plan, task, writer, pmap)
                bar.advance(job)
        writer.close()
        hashing.join()
        if plan.gram_files is not None:
            shutil.rmtree(tmp / ".grams", ignore_errors=True)
        copy_side_files(plan.base.path, tmp, plan.dtype)
        manifest = make_manifest(plan, entries, specs, writer.weight_map)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return plan.out


def content_hashes(plan: BuildPlan) -> None:
    """Fill the checkpoints' cached content hashes (a failure resurfaces in make_manifest)."""
    with suppress(OSError):
        for ckpt in [plan.base, *plan.experts.values()]:
            ckpt.content_hash  # noqa: B018


@contextmanager
def worker_map(workers: int) -> Iterator[Map]:
    """A map over `workers` Python threads, each running torch on one intra-op thread (torch and
    numpy release the GIL). Measured on the 0.17B benchmark with another job holding one of two
    cores: two OpenMP threads ran a layer in 3.0-3.5 s (barrier stalls), one in 1.4 s, two Python
    threads in 1.3-1.5 s; on idle cores they scale like OpenMP and overlap numpy's serial parts."""
    import torch

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


def run_task(plan: BuildPlan, task: TensorTask, writer: Any,
             pmap: Map = serial_map) -> dict[str, Any]:
    """Merge or stack one tensor, write it, and return its manifest entry."""
    import torch

    entry: dict[str, Any] = {"kind": task.kind, "shape": list(task.shape), "dtype": task.out_dtype}
    if task.kind == "stacked":
        out_dtype = getattr(torch, task.out_dtype)
        stacked = torch.stack([c.tensor(task.name).to(out_dtype) for c in plan.experts.values()])
        writer.write(f"{task.name}.experts", stacked)  # [N, ...]
        return entry
    bank, labels, stats = merge_tensor(plan, task, pmap)
    writer.write(f"{task.name}.bank", bank)  # [K, out, in]
    writer.write(f"{task.name}.index", labels.T.to(torch.uint8).contiguous())  # [N, out]
    entry.update(groups=task.groups, stats=stats)
    return entry


def merge_tensor(plan: BuildPlan, task: TensorTask, pmap: Map = serial_map
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One 2-D tensor -> (bank [K, out, in], labels [out, N], stats), streamed in row blocks;
    experts and blocks are independent work items for pmap."""
    import torch

    base = plan.base.tensor(task.name).float()  # [out, in]
    n, k = len(plan.experts), task.groups
    size = n * base.numel()
    if plan.scratch is None or plan.scratch.numel() < size:
        plan.scratch = None
        plan.scratch = torch.empty(size)  # over 32 MB: fresh pages from the kernel; keep it
    deltas = load_deltas(plan, task, base, pmap, plan.scratch[:size])  # [N, out, in], raw
    calib = tensor_solver(plan, task)
    # grouping's cost is mostly per call (small [R, N, N] ops), and regmean reads each subset's
    # [in, in] factor once per block: both on whole chunks; plain merging on quarter chunks
    big = row_blocks(task.shape[0], n * task.shape[1])
    blocks = big if plan.method.calibrated else row_blocks(
        task.shape[0], n * task.shape[1], CHUNK_ELEMENTS // 4)
    labels, delta_sq = group_all_rows(plan, deltas, big, k, calib, pmap)
    sizes = torch.nn.functional.one_hot(labels, k).sum(1)  # [out, K]: members per group
    shared = (sizes.gather(1, labels) > 1).float()  # [out, N]: 1 where expert n's row is merged
    sparsify = plan.method.sparsify
    apply = None if sparsify is None else sparsify(
        deltas, plan.params, [_generator(plan, task, i) for i in range(n)], blocks, pmap)
    bank = torch.empty((k, *task.shape), dtype=getattr(torch, task.out_dtype))
    extra = {"calib": calib} if plan.method.calibrated else {}

    def merge_block(b_i: int) -> torch.Tensor:
        a, b = blocks[b_i]
        raw = deltas[:, a:b]  # [N, R, in]
        used = raw if apply is None else apply(raw, b_i)
        merged = plan.method.combine(used, labels[a:b], k, plan.params, **extra)  # [K, R, in]
        torch.add(merged, base[a:b], out=bank[:, a:b])  # in fp32, cast to the bank's dtype
        return block_error(merged, raw, labels[a:b], shared[a:b])

    err_sq = sum(pmap(merge_block, range(len(blocks))), torch.zeros(n, dtype=torch.float64))
    copy_singletons(plan, task, bank, labels, sizes)
    names = list(plan.experts)
    return bank, labels, {
        "rel_error": {m: rel_error(float(e), float(d)) for m, e, d in zip(names, err_sq, delta_sq)},
        "err_sq": dict(zip(names, err_sq.tolist())),
        "delta_sq": dict(zip(names, delta_sq.tolist())),
        "mean_groups_used": float((sizes > 0).sum(1).float().mean()),
    }


def block_error(merged: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor,
                shared: torch.Tensor) -> torch.Tensor:
    """sum_r ||merged[labels[r, n], r] - raw[n, r]||^2 over the rows where expert n is merged
    (single-member rows are exact copies, see copy_singletons). -> [N] fp64."""
    import torch

    k, r, inp = merged.shape
    flat = merged.transpose(0, 1).reshape(r * k, inp)  # [R*K, in]
    rec = flat.index_select(0, (labels + torch.arange(r)[:, None] * k).view(-1))  # [R*N, in]
    rec.sub_(raw.transpose(0, 1).reshape(rec.shape))  # each expert's merged row minus its own
    row_sq = torch.linalg.vector_norm(rec, dim=1).square().view(labels.shape)  # [R, N]
    return (row_sq * shared).sum(0, dtype=torch.float64)


def group_all_rows(plan: BuildPlan, deltas: torch.Tensor, blocks: list[tuple[int, int]],
                   k: int, calib: GramSolver | None = None, pmap: Map = serial_map
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [out, N] from the clustering, and ||d_n||^2 [N] from the Gram diagonals."""
    import torch
    from chmc.compiler.grouping import RowBatch, group_rows

    weights = plan.params.weights()
    if not len(weights):  # a method without merge weights (regmean): the clusterings' uniform ones
        weights = torch.ones(deltas.shape[0])

    def group(block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = RowBatch(deltas[:, block[0] : block[1]], weights, calib=calib)
        return group_rows(plan.clustering, batch, k), batch.gram.diagonal(dim1=1, dim2=2).sum(0)

    done = pmap(group, blocks)
    delta_sq = sum((sq for _, sq in done), torch.zeros(deltas.shape[0], dtype=torch.float64))
    return torch.cat([labels for labels, _ in done]), delta_sq


def load_deltas(plan: BuildPlan, task: TensorTask, base: torch.Tensor | None = None,
                pmap: Map = serial_map, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """expert_n - base in fp32: [N, out, in], a view of [out, N, in] storage, so that a block of
    rows [N, R, in] is one contiguous [R, N, in] batch for the per-row matmuls."""
    import torch

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
    damping = plan.params.values.get("damping", 0.01)
    return plan.gram_files.solver(task.name, len(plan.experts), damping)


def calibrate(plan: BuildPlan, folder: Path, progress: bool) -> GramFiles:
    """Each expert's Grams: a given folder, or collected from its .jsonl prompts."""
    from chmc.compiler.calibration import GramFiles, collect_grams, read_sequences

    assert plan.calibration is not None
    folder.mkdir(exist_ok=True)
    merged = {t.name for t in plan.tasks if t.kind == "merged"}
    files = []
    for name, source in plan.calibration.items():
        if source.is_dir():
            files.append(source)
            continue
        ckpt = plan.experts[name]
        seqs = read_sequences(source, ckpt.path)
        files.append(collect_grams(ckpt.path, seqs, folder / name, merged, progress))
    return GramFiles(files)


def _generator(plan: BuildPlan, task: TensorTask, expert: int) -> torch.Generator:
    """Seeded per (seed, tensor, expert): DARE's drops do not depend on the tensor order."""
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{plan.seed}/{task.name}/{expert}".encode()))


def copy_singletons(plan: BuildPlan, task: TensorTask, bank: torch.Tensor, labels: torch.Tensor,
                    sizes: torch.Tensor) -> None:
    """A group with one member stores that expert's row exactly; unused slots copy group 0."""
    import torch

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


def row_blocks(rows: int, row_elements: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """[a, b) row ranges of about `chunk` (default CHUNK_ELEMENTS) values each."""
    step = max(1, (chunk or CHUNK_ELEMENTS) // max(1, row_elements))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def rel_error(err_sq: float, delta_sq: float) -> float:
    """||W_rec - W_expert|| / ||W_expert - W_base||; 0 when both are 0."""
    if delta_sq == 0:
        return 0.0 if err_sq == 0 else float("inf")
    return (err_sq / delta_sq) ** 0.5


def copy_side_files(src: Path, dst: Path, dtype: str | None) -> None:
    """config, generation config and tokenizer files, so the folder stays usable by HF tools."""
    for fname in SIDE_FILES:
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)
    if dtype is not None and (dst / "config.json").is_file():
        config = json.loads((dst / "config.json").read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        (dst / "config.json").write_text(json.dumps(config, indent=2))


def make_manifest(plan: BuildPlan, entries: dict[str, Any], specs: list[TensorSpec],
                  weight_map: dict[str, str]) -> dict[str, Any]:
    n = len(plan.experts)
    base_params = sum(info.numel for info in plan.base.tensors.values())
    artifact_params = sum(math.prod(s.shape) for s in specs if not s.name.endswith(".index"))
    index_bytes = sum(s.nbytes for s in specs if s.name.endswith(".index"))
    experts = []
    for name, ckpt in plan.experts.items():
        err = sum(e["stats"]["err_sq"][name] for e in entries.values() if e["kind"] == "merged")
        dsq = sum(e["stats"]["delta_sq"][name] for e in entries.values() if e["kind"] == "merged")
        experts.append({"name": name, "path": str(ckpt.path.resolve()), "sha256": ckpt.content_hash,
                        "rel_error": rel_error(err, dsq)})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": plan.base.architecture,
        "base": {"path": str(plan.base.path.resolve()), "sha256": plan.base.content_hash},
        "experts": experts,
        "groups": max((t.groups for t in plan.tasks if t.kind == "merged"), default=plan.groups),
        "budget": plan.budget_summary,
        "clustering": plan.clustering,
        "method": plan.method.name,
        "calibration": None if not plan.calibration else {
            name: str(path.resolve()) for name, path in plan.calibration.items()},
        "parameters": {**plan.params.to_json(plan.names), "seed": plan.seed},
        "dtype": plan.dtype or next((t.dtype for t in plan.tasks if t.kind == "merged"), None),
        "tie_word_embeddings": tied(plan.base),
        "tensors": entries,
        "weight_map": weight_map,
        "accounting": {"base": base_params, "ensemble": n * base_params,
                       "artifact": artifact_params, "index_bytes": index_bytes,
                       "ratio": artifact_params / (n * base_params)},
    }
