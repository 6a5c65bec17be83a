"""Where a K=2 TIES build spends its time: each phase of merging one tensor, on one core, in CPU
nanoseconds per expert value, streamed the way `chmc build` streams it (row blocks, buffers
reused, the compiled one-pass merge), and the torch ops that pass replaces, phase by phase.
Reads the llama-3.2-1b family of benchmarks/scale_cpu.py (made there, or with
`chmc family synth --shape llama-3.2-1b --experts 4`). Prints JSON and writes --json.

    python3 benchmarks/build_phases.py [--tensor model.layers.3.mlp.up_proj.weight]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chmc.cache import cache_root
from chmc.compiler.deltas import Deltas, Scratch
from chmc.compiler.merge import block_error, group_all_rows, keep_freed_memory, shared_rows
from chmc.compiler.methods import sign_consensus, ties_fused
from chmc.compiler.plan import plan_build

EXPERTS, GROUPS = 4, 2


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_of(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    """The least CPU time of `rounds` calls (user + system: page faults count), and a result."""
    best, result = float("inf"), None
    for _ in range(rounds):
        start = cpu_seconds()
        result = fn()
        best = min(best, cpu_seconds() - start)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensor", default="model.layers.3.mlp.up_proj.weight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path,
                   default=Path(__file__).parent / "results" / "build_phases.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the build does
    family = cache_root() / "bench" / f"llama-3.2-1b-x{EXPERTS}"
    plan = plan_build(family / "base", {f"expert_{i}": family / "experts" / f"expert_{i}"
                                        for i in range(EXPERTS)},
                      groups=GROUPS, method="ties", parameters={"density": 0.5})
    task = next(t for t in plan.tasks if t.name == args.tensor)
    values = EXPERTS * task.shape[0] * task.shape[1]
    scratch = Scratch()
    source = Deltas.read(plan, task, scratch=scratch)
    assert len(source.slices) == 1, "a tensor read in one slice"
    method = plan.method
    sparsify = method.sparsify
    assert sparsify is not None
    big, blocks = source.blocks(), source.blocks(4)
    ns: dict[str, float] = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        seconds, result = best_of(fn, args.rounds)
        ns[name] = round(seconds / values * 1e9, 2)
        return result

    phase("read and convert the deltas", lambda: source.load(0))
    deltas, base = source.rows(0, task.shape[0]), source.base(0, task.shape[0])
    labels = torch.empty(task.shape[0], EXPERTS, dtype=torch.long)
    phase("grouping", lambda: group_all_rows(plan, source, big, GROUPS, labels))
    apply = phase("TIES threshold", lambda: sparsify(
        source, plan.params, [torch.Generator()] * EXPERTS, blocks))
    shared = shared_rows(labels, GROUPS)
    bank = scratch.take("bank", (GROUPS, *task.shape), torch.bfloat16)

    def stream(parts: int) -> None:
        """The build's merge_block, its first `parts` steps, as torch ops (the reference)."""
        for i, (a, b) in enumerate(blocks):
            raw = deltas[:, a:b]
            used = apply(raw, i)
            if parts > 1:
                merged = sign_consensus(used, labels[a:b], GROUPS, plan.params)
            if parts > 2:
                torch.add(merged, base[a:b], out=bank[:, a:b])
            if parts > 3:
                block_error(merged, raw, labels[a:b], shared[a:b])

    err = torch.zeros(EXPERTS, dtype=torch.float64)

    def fused(bank_too: bool) -> None:
        """The build's merge_block: trim, merge and error in one compiled pass, then the bank."""
        for i, (a, b) in enumerate(blocks):
            merged = ties_fused(deltas[:, a:b], labels[a:b], GROUPS, plan.params, apply, i, err)
            if bank_too:
                torch.add(merged, base[a:b], out=bank[:, a:b])

    fused(True)  # numba compiles (or loads its cache) on the first call
    steps = ["trim", "sign election and disjoint merge", "bank (+ base, cast)",
             "reconstruction error"]
    cumulative = [best_of(partial(stream, n), args.rounds)[0] for n in range(1, 5)]
    reference = {}
    for name, seconds, before in zip(steps, cumulative, [0.0, *cumulative]):
        reference[name] = round((seconds - before) / values * 1e9, 2)
    one_pass = best_of(partial(fused, False), args.rounds)[0]
    with_bank = best_of(partial(fused, True), args.rounds)[0]
    ns["trim, merge and error (one compiled pass)"] = round(one_pass / values * 1e9, 2)
    ns["bank (+ base, cast)"] = round((with_bank - one_pass) / values * 1e9, 2)
    data = bytes(64 << 20)
    start = time.process_time()
    hashlib.sha256(data).hexdigest()
    result = {"tensor": task.name, "shape": list(task.shape), "experts": EXPERTS,
              "groups": GROUPS, "ns_per_expert_value": ns,
              "total_ns_per_expert_value": round(sum(ns.values()), 2),
              "torch_ops_instead_of_the_compiled_pass": reference,
              "sha256_ns_per_byte": round((time.process_time() - start) / len(data) * 1e9, 2),
              "measured": time.strftime("%Y-%m-%d %H:%M")}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
