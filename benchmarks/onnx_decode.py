"""Merged ONNX graph vs the same model exported dense, side by side on ONNX Runtime (CPU). Prints JSON.

    python3 benchmarks/onnx_decode.py [--hidden 512 --intermediate 1408 --layers 8 --vocab 32000]

Builds a random-delta family (N experts), channel-merges it at K groups, exports the merged
artifact in each --forms and the base dense, then measures per graph: prefill time (batch 1,
--prefill tokens), decode tokens/s at batch 1 and batch 8 (rows of mixed experts), and the
resident memory one session adds (in a fresh process). The ensemble is N dense sessions.
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

RSS_PROBE = """
import json, sys, numpy as np
from chmc.runtime import read_export_manifest
from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
folder = __import__("pathlib").Path(sys.argv[1])
before = rss()
b = OnnxRuntimeBackend(folder, read_export_manifest(folder)["export"], threads=int(sys.argv[2]))
ids = np.ones((1, 16), np.int64)
b.start(np.zeros(1, np.int64)).step(ids, np.ones_like(ids), np.arange(16)[None])
print(json.dumps(rss() - before))
"""


def timed(fn: Any, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(folder: Path, n_experts: int, args: argparse.Namespace) -> dict[str, Any]:
    from chmc.runtime import read_export_manifest
    from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(folder, read_export_manifest(folder)["export"],
                                 threads=args.threads)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}

    def prefill() -> None:
        ids = rng.integers(0, args.vocab, (1, args.prefill))
        backend.start(np.zeros(1, np.int64)).step(ids, np.ones_like(ids),
                                                  np.arange(args.prefill)[None])

    out["prefill_ms"] = round(timed(prefill, args.repeat) * 1e3, 2)
    for batch in (1, 8):
        experts = np.arange(batch) % n_experts
        state = backend.start(experts)
        ids = rng.integers(0, args.vocab, (batch, args.context))
        mask = np.ones_like(ids)
        state.step(ids, mask, np.tile(np.arange(args.context), (batch, 1)))
        steps = []
        for t in range(args.decode_steps):
            mask = np.ones((batch, args.context + t + 1), np.int64)
            pos = np.full((batch, 1), args.context + t)
            start = time.perf_counter()
            state.step(rng.integers(0, args.vocab, (batch, 1)), mask, pos)
            steps.append(time.perf_counter() - start)
        out[f"decode_b{batch}_tokens_per_s"] = round(batch / statistics.median(steps), 2)
    res = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder), str(args.threads)],
                         capture_output=True, text=True, check=True)
    out["session_rss_mb"] = round(json.loads(res.stdout) / 2**20, 1)
    return out


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 512), ("intermediate", 1408), ("layers", 8), ("heads", 8),
                          ("kv-heads", 8), ("vocab", 32000), ("experts", 4), ("groups", 2),
                          ("threads", 2), ("prefill", 128), ("context", 32),
                          ("decode-steps", 24), ("repeat", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--forms", default="gather,select")
    p.add_argument("--workdir", default=None, help="Keep the models here (default: temp).")
    args = p.parse_args()

    from chmc.compiler.export import export
    from chmc.compiler.merge import build
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
        results = {name: measure(folder, args.experts, args) for name, folder in graphs.items()}
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
