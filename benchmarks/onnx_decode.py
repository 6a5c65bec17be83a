"""Merged ONNX graph vs the same model exported dense, side by side on ONNX Runtime (CPU).
Prints JSON.

    python3 benchmarks/onnx_decode.py [--hidden 512 --intermediate 1408 --layers 8 --vocab 32000]
    python3 benchmarks/onnx_decode.py --export-memory   # export peak RSS vs artifact size

Builds a random-delta family (N experts), channel-merges it at K groups, exports the merged
artifact in each --forms and the base dense, then measures per graph: prefill time (batch 1,
--prefill tokens), decode tokens/s at batch 1, at batch 8 with rows of mixed experts and with
rows of one expert, and the resident memory one session adds (in a fresh process). The ensemble
is N dense sessions: its memory is N x dense, its mixed batch N steps of 8 / N rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from chmc.cache import cache_root

RSS_PROBE = """
import json, sys, numpy as np
from chmc.formats.export import ExportFolder
from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
before = rss()
b = OnnxRuntimeBackend(ExportFolder(sys.argv[1]), OnnxRuntimeOptions(threads=int(sys.argv[2])))
experts = np.arange(int(sys.argv[3]))
ids = np.ones((len(experts), 16), np.int64)
b.start(experts).step(ids, np.ones_like(ids), np.tile(np.arange(16), (len(experts), 1)))
print(json.dumps(rss() - before))
"""  # argv: folder, threads, experts; each expert runs once: a mapped weight counts once read


SPAWN_PROBE = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
assert status == 0, status
print(json.dumps({"wall_s": round(time.perf_counter() - start, 2),
                  "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3)}))
"""


def measure(graphs: dict[str, Path], n_experts: int, args: argparse.Namespace,
            probe_memory: bool = True) -> dict[str, Any]:
    """Time every graph side by side: each round runs one prefill / one decode step per graph in
    turn, so load from other processes hits all graphs alike; medians over rounds. With
    probe_memory, each graph's session memory is then measured in a fresh process."""
    from chmc.formats.export import ExportFolder
    from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions

    # spinning off: idle pools would steal the cores from the session being timed
    options = OnnxRuntimeOptions(threads=args.threads, spinning=False)
    backends = {name: OnnxRuntimeBackend(ExportFolder(f), options) for name, f in graphs.items()}
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in graphs}
    ids = rng.integers(0, args.vocab, (1, args.prefill))
    for _ in range(args.repeat + 1):  # the first round warms up
        for name, backend in backends.items():
            start = time.perf_counter()
            backend.start(np.zeros(1, np.int64)).step(ids, np.ones_like(ids),
                                                      np.arange(args.prefill)[None])
            times[name].setdefault("prefill", []).append(time.perf_counter() - start)
    cases = {"b1": np.zeros(1, np.int64), "b8": np.arange(8) % n_experts,  # b8: experts mixed
             "b8_one": np.ones(8, np.int64)}  # b8_one: eight rows of one expert
    for case, experts in cases.items():
        batch = len(experts)
        ctx = rng.integers(0, args.vocab, (batch, args.context))
        states = {name: b.start(experts) for name, b in backends.items()}
        for state in states.values():
            state.step(ctx, np.ones_like(ctx), np.tile(np.arange(args.context), (batch, 1)))
        for t in range(args.decode_steps):
            token = rng.integers(0, args.vocab, (batch, 1))
            mask = np.ones((batch, args.context + t + 1), np.int64)
            for name, state in states.items():
                start = time.perf_counter()
                state.step(token, mask, np.full((batch, 1), args.context + t))
                times[name].setdefault(case, []).append(time.perf_counter() - start)
    if "dense" in backends:  # the ensemble's mixed batch: N dense models, 8 / N rows each in turn
        per = max(1, 8 // n_experts)
        ctx = rng.integers(0, args.vocab, (per, args.context))
        ensemble = [backends["dense"].start(np.zeros(per, np.int64)) for _ in range(n_experts)]
        for state in ensemble:
            state.step(ctx, np.ones_like(ctx), np.tile(np.arange(args.context), (per, 1)))
        for t in range(args.decode_steps):
            token = rng.integers(0, args.vocab, (per, 1))
            mask = np.ones((per, args.context + t + 1), np.int64)
            start = time.perf_counter()
            for state in ensemble:
                state.step(token, mask, np.full((per, 1), args.context + t))
            times["dense"].setdefault("b8_ensemble", []).append(time.perf_counter() - start)
    out: dict[str, Any] = {}
    for name, folder in graphs.items():
        tn = times[name]
        out[name] = {
            "prefill_ms": round(statistics.median(tn["prefill"][1:]) * 1e3, 2),
            "decode_b1_tokens_per_s": round(1 / statistics.median(tn["b1"]), 2),
            "decode_b8_tokens_per_s": round(8 / statistics.median(tn["b8"]), 2),
            "decode_b8_one_expert_tokens_per_s": round(8 / statistics.median(tn["b8_one"]), 2)}
        if probe_memory:
            served = 1 if name == "dense" else n_experts
            res = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder),
                                  str(args.threads), str(served)],
                                 capture_output=True, text=True, check=True)
            out[name]["session_rss_mb"] = round(json.loads(res.stdout) / 2**20, 1)
        if "b8_ensemble" in tn:
            out[name]["decode_b8_ensemble_tokens_per_s"] = round(
                per * n_experts / statistics.median(tn["b8_ensemble"]), 2)
    return out


def export_memory(work: Path) -> dict[str, Any]:
    """Peak RSS of `chmc export --dtype float16` (a child process) on compile_benchmark's 0.17B
    family merged at K=2, against the artifact's size on disk (goal <= 1.5x)."""
    import importlib.util

    from chmc import build

    spec = importlib.util.spec_from_file_location(
        "compile_benchmark", Path(__file__).with_name("compile_benchmark.py"))
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = cache_root()
    base, experts = bench.make_family(root / "bench" / "compile_llama_0.17b")
    artifact = build(base, experts, work / "artifact_0.17b", groups=2, progress=False, force=True)
    cmd = [sys.executable, "-m", "chmc", "export", str(artifact), "--out",
           str(work / "onnx_0.17b"), "--dtype", "float16", "--force"]
    # Linux carries a parent's peak RSS into a forked child's ru_maxrss, and this process holds
    # torch and the build: start the export from a small helper process instead.
    res = subprocess.run([sys.executable, "-c", SPAWN_PROBE, json.dumps(cmd)],
                         capture_output=True, text=True, check=True)
    result = json.loads(res.stdout)
    size = sum(f.stat().st_size for f in artifact.iterdir() if f.is_file())
    return {**result, "artifact_gb": round(size / 1024**3, 3),
            "peak_rss_vs_artifact": round(result["peak_rss_gb"] * 1024**3 / size, 3),
            "goal": 1.5}


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    for name, default in (("hidden", 512), ("intermediate", 1408), ("layers", 8), ("heads", 8),
                          ("kv-heads", 8), ("vocab", 32000), ("experts", 4), ("groups", 2),
                          ("threads", 2), ("prefill", 128), ("context", 32),
                          ("decode-steps", 24), ("repeat", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--forms", default="gather,select,plugin")
    p.add_argument("--workdir", default=None, help="Keep the models here (default: temp).")
    p.add_argument("--export-memory", action="store_true",
                   help="Only measure export peak RSS on the 0.17B compile-benchmark family.")
    args = p.parse_args()
    if args.export_memory:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            print(json.dumps(export_memory(work), indent=1))
        return

    from chmc import build
    from chmc.compiler.export import export
    from chmc.models.tiny.random_family import make_random_family

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        base, experts = make_random_family(
            work / "family", args.experts, hidden=args.hidden, intermediate=args.intermediate,
            layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)
        artifact = build(base, experts, work / "artifact", groups=args.groups, progress=False,
                         force=True)
        graphs = {"dense": export(base, work / "dense", force=True)}
        for form in args.forms.split(","):
            graphs[form] = export(artifact, work / form, linear=form, force=True)
        results = measure(graphs, args.experts, args)
        dense = results["dense"]
        for name, r in results.items():
            if name == "dense":
                continue
            r["vs_dense"] = {
                "prefill_time": round(r["prefill_ms"] / dense["prefill_ms"], 3),
                "decode_b1_time": round(dense["decode_b1_tokens_per_s"]
                                        / r["decode_b1_tokens_per_s"], 3),
                "decode_b8_time": round(dense["decode_b8_tokens_per_s"]
                                        / r["decode_b8_tokens_per_s"], 3),
                "decode_b8_one_expert_time": round(dense["decode_b8_one_expert_tokens_per_s"]
                                                   / r["decode_b8_one_expert_tokens_per_s"], 3),
                "decode_b8_time_vs_ensemble": round(dense["decode_b8_ensemble_tokens_per_s"]
                                                    / r["decode_b8_tokens_per_s"], 3),
                "rss_vs_ensemble": round(r["session_rss_mb"]
                                         / (args.experts * dense["session_rss_mb"]), 3),
            }
        print(json.dumps({
            "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads",
                                                    "kv_heads", "vocab", "experts", "groups")},
            "dtype": "float32", "threads": args.threads, "prefill_tokens": args.prefill,
            "decode_context": args.context,
            "disk_mb": {name: folder_mb(f) for name, f in graphs.items()},
            "goal": {"decode_time": 1.25, "prefill_time": 1.1,
                     "rss_vs_ensemble": round(args.groups / args.experts + 0.1, 3)},
            "results": results}, indent=1))


if __name__ == "__main__":
    main()
