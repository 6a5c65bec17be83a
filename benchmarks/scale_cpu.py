"""chmc at a real size on this CPU machine: a llama-3.2-1b-shaped family of 4 experts (chmc family
synth), built, calibrated, exported and served, against mergekit and the dense model. Prints JSON
and merges it into --json (default benchmarks/results/scale_cpu.json), one key per part:

  builds      `chmc build` K=2 TIES against `mergekit-yaml` TIES (density 0.5), each its own
              process, paired A B A B (--rounds): wall and the child's own peak RSS.
              Goal: chmc >= 10x faster, peak RSS <= mergekit's.
  export      `chmc export --linear plugin --dtype float32` of the K=2 artifact (and the base,
              dense): peak RSS against the artifact on disk. Goal: <= 1.5x.
  onnxruntime the plugin graph against the dense base on ONNX Runtime, 2 threads, side by side
              per round: prefill 512 tokens (goal <= 1.05x), decode batch 1 (<= 1.15x), batch 8
              with the 4 experts mixed (<= 1.6x); session memory <= K/N of the ensemble + 10%.
  calibrated  `chmc build --calibration` (256 x 128 random tokens per expert, output-error
              grouping, regmean) at --budget 0.5, in phases: one expert's calibration, and the
              merge from Gram folders; the build's wall is N calibrations plus the merge.

    python3 benchmarks/scale_cpu.py [--parts builds,export,onnxruntime,calibrated] [--rounds 2]

The family and the artifact are kept under $CHMC_CACHE/bench (about 13 GB, plus 16 GB of ONNX).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from chmc.cache import cache_root

SHAPE, EXPERTS, GROUPS = "llama-3.2-1b", 4, 2
GOALS = {"build_speedup_vs_mergekit": 10.0, "build_rss_vs_mergekit": 1.0,
         "export_rss_vs_artifact": 1.5, "prefill_time": 1.05, "decode_b1_time": 1.15,
         "decode_b8_mixed_time": 1.6, "rss_vs_ensemble": GROUPS / EXPERTS + 0.1}


def sibling(name: str) -> ModuleType:
    """Another benchmark script of this folder, as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compile_benchmark, onnx_decode = sibling("compile_benchmark"), sibling("onnx_decode")
ort_kernel = sibling("ort_kernel")


def spawn(cmd: list[str]) -> dict[str, Any]:
    """Wall and peak RSS of cmd, started from a small helper process: Linux carries a parent's
    peak RSS into a forked child's ru_maxrss, and this process may hold sessions."""
    res = subprocess.run([sys.executable, "-c", onnx_decode.SPAWN_PROBE, json.dumps(cmd)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return dict(json.loads(res.stdout))


def family(root: Path) -> tuple[Path, dict[str, Path]]:
    folder = root / f"{SHAPE}-x{EXPERTS}"
    if not (folder / "family.json").is_file():
        subprocess.run([sys.executable, "-m", "chmc", "family", "synth", "--shape", SHAPE,
                        "--experts", str(EXPERTS), "--out", str(folder)], check=True)
    return folder / "base", {f"expert_{i}": folder / "experts" / f"expert_{i}"
                             for i in range(EXPERTS)}


def folder_gb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1024**3, 3)


def builds(base: Path, experts: dict[str, Path], work: Path, rounds: int) -> dict[str, Any]:
    """A B A B: chmc, then mergekit, per round; the ratio per pair and over the medians. Each
    chmc run starts from an empty $CHMC_CACHE, so it hashes its inputs as a first build does;
    one rebuild after the rounds finds their hashes remembered."""
    chmc_runs, mk_runs = [], []
    mk = compile_benchmark.mergekit_command(base, experts, work, dtype="bfloat16")
    cmd = compile_benchmark.chmc_build(base, experts, work / "k2", GROUPS)
    env = {**os.environ, "CHMC_CACHE": str(work / "build_cache")}
    for _ in range(rounds):
        shutil.rmtree(work / "build_cache", ignore_errors=True)
        chmc_runs.append(compile_benchmark.measure(cmd, env=env))
        if mk is not None:
            mk_runs.append(compile_benchmark.measure(mk))
            shutil.rmtree(work / "mergekit_out", ignore_errors=True)
    out: dict[str, Any] = {"chmc_k2_ties": chmc_runs,
                           "chmc_k2_ties_rebuild": compile_benchmark.measure(cmd, env=env),
                           "artifact_gb": folder_gb(work / "k2")}
    if not mk_runs:
        return {**out, "mergekit_ties": "not found (set MERGEKIT_YAML)"}
    wall = [m["wall_s"] / c["wall_s"] for c, m in zip(chmc_runs, mk_runs)]
    rss = [c["peak_rss_gb"] / m["peak_rss_gb"] for c, m in zip(chmc_runs, mk_runs)]
    speedup, rss_ratio = round(statistics.median(wall), 2), round(statistics.median(rss), 3)
    return {**out, "mergekit_ties": mk_runs, "mergekit_version": mergekit_version(mk[0]),
            "speedup_per_pair": [round(w, 2) for w in wall],
            "speedup_vs_mergekit": speedup, "rss_vs_mergekit": rss_ratio,
            "goal_speedup": met(speedup, GOALS["build_speedup_vs_mergekit"], higher=True),
            "goal_rss": met(rss_ratio, GOALS["build_rss_vs_mergekit"])}


def mergekit_version(exe: str) -> str:
    pip = Path(exe).with_name("pip")
    res = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True)
    return next((line.split()[1] for line in res.stdout.splitlines()
                 if line.startswith("Version:")), "unknown")


def met(value: float, goal: float, higher: bool = False) -> str:
    ok = value >= goal if higher else value <= goal
    return f"{'met' if ok else 'NOT met'} ({value} {'>=' if higher else '<='} {goal})"


def export(base: Path, experts: dict[str, Path], work: Path) -> dict[str, Any]:
    artifact = work / "k2"
    if not (artifact / "chmc.json").is_file():  # no builds part ran on this machine yet
        subprocess.run(compile_benchmark.chmc_build(base, experts, artifact, GROUPS), check=True)
    out: dict[str, Any] = {"artifact_gb": folder_gb(artifact)}
    for name, source in (("plugin", artifact), ("dense", base)):
        form = ["--linear", "plugin"] if name == "plugin" else []
        cmd = [sys.executable, "-m", "chmc", "export", str(source), "--out", str(work / name),
               "--dtype", "float32", "--force", *form]
        out[name] = {**spawn(cmd), "onnx_gb": folder_gb(work / name)}
    ratio = round(out["plugin"]["peak_rss_gb"] / out["artifact_gb"], 3)
    return {**out, "plugin_rss_vs_artifact": ratio,
            "goal": met(ratio, GOALS["export_rss_vs_artifact"])}


def onnxruntime(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Session memory first (each in a fresh process, before this one holds any session, every
    expert served once), then the timings side by side (onnx_decode.measure)."""
    graphs = {"dense": work / "dense", "plugin": work / "plugin"}
    rss = {}
    for name, folder in graphs.items():
        served = str(EXPERTS if name == "plugin" else 1)
        res = subprocess.run([sys.executable, "-c", onnx_decode.RSS_PROBE, str(folder),
                              str(args.threads), served], capture_output=True, text=True,
                             check=True)
        rss[name] = round(json.loads(res.stdout) / 2**30, 3)
    timed = onnx_decode.measure(graphs, EXPERTS, args, probe_memory=False)
    dense, plugin = timed["dense"], timed["plugin"]
    ratios = {
        "prefill_time": round(plugin["prefill_ms"] / dense["prefill_ms"], 3),
        "decode_b1_time": round(dense["decode_b1_tokens_per_s"]
                                / plugin["decode_b1_tokens_per_s"], 3),
        "decode_b8_mixed_time": round(dense["decode_b8_tokens_per_s"]
                                      / plugin["decode_b8_tokens_per_s"], 3),
        "decode_b8_mixed_vs_ensemble_time": round(dense["decode_b8_ensemble_tokens_per_s"]
                                                  / plugin["decode_b8_tokens_per_s"], 3),
        "rss_vs_ensemble": round(rss["plugin"] / (EXPERTS * rss["dense"]), 3)}
    return {"threads": args.threads, "prefill_tokens": args.prefill,
            "decode_context": args.context, "decode_steps": args.decode_steps,
            "rounds": args.repeat, "session_rss_gb": rss, "results": timed, "vs_dense": ratios,
            "goals": {k: met(v, GOALS[k]) for k, v in ratios.items() if k in GOALS}}


def calibrated(base: Path, experts: dict[str, Path], work: Path,
               sequences: int) -> dict[str, Any]:
    """In phases, each its own process (compile_benchmark's): one expert's calibration (its
    random-token prompts through the model, its Grams written), then the budget-0.5 merge from
    Gram folders. That merge reads expert_0's Grams for every expert: its cost does not depend
    on their values, and the four calibrations (11 min each here) would not fit a session. A
    build from prompt files costs N calibrations plus the merge."""
    import random

    rng = random.Random(0)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    name, path = next(iter(experts.items()))
    prompts, grams = work / f"{name}.jsonl", work / f"grams_{name}"
    prompts.write_text("".join(json.dumps({"input_ids": [rng.randrange(vocab)
                                                         for _ in range(128)]}) + "\n"
                               for _ in range(sequences)))
    shutil.rmtree(grams, ignore_errors=True)
    calibration = spawn([sys.executable, str(Path(compile_benchmark.__file__ or "")),
                         "--collect-grams", str(path),
                         str(prompts), str(grams)])
    cmd = [sys.executable, "-m", "chmc", "build", "--base", str(base), "--experts",
           *(f"{n}={p}" for n, p in experts.items()), "--budget", "0.5", "--clustering",
           "output-error", "--method", "regmean", "--out", str(work / "calibrated"), "--force",
           *(a for n in experts for a in ("--calibration", f"{n}={grams}"))]
    merge = spawn(cmd)
    ratio = json.loads((work / "calibrated" / "chmc.json").read_text())["accounting"]["ratio"]
    shutil.rmtree(work / "calibrated")
    n = len(experts)
    return {"sequences": sequences, "tokens_per_expert": sequences * 128, "budget": 0.5,
            "calibration_per_expert": calibration, "merge_from_grams": merge,
            "ratio": round(ratio, 4),
            "build_from_prompts_wall_s": round(n * calibration["wall_s"] + merge["wall_s"], 1),
            "build_from_prompts_peak_rss_gb": max(calibration["peak_rss_gb"],
                                                  merge["peak_rss_gb"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="builds,export,onnxruntime,calibrated")
    p.add_argument("--rounds", type=int, default=2, help="A B pairs of builds")
    p.add_argument("--json", type=Path,
                   default=Path(__file__).parent / "results" / "scale_cpu.json")
    for name, default in (("threads", 2), ("prefill", 512), ("context", 128),
                          ("decode-steps", 12), ("repeat", 3), ("sequences", 256)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    args.vocab = 128256
    root = cache_root() / "bench"
    work = root / f"{SHAPE}-x{EXPERTS}-work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, experts = family(root)
    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    result["setup"] = {"shape": SHAPE, "experts": EXPERTS, "groups": GROUPS, "dtype": "bfloat16",
                       "family_gb": folder_gb(base.parent), "cpus": os.cpu_count(),
                       "family_ready_s": round(time.perf_counter() - t0, 1),
                       "cpu": ort_kernel.cpu()}
    parts = args.parts.split(",")
    for part in parts:
        started = time.strftime("%Y-%m-%d %H:%M")
        if part == "builds":
            value = builds(base, experts, work, args.rounds)
        elif part == "export":
            value = export(base, experts, work)
        elif part == "onnxruntime":
            value = onnxruntime(work, args)
        elif part == "calibrated":
            value = calibrated(base, experts, work, args.sequences)
        else:
            raise SystemExit(f"--parts: unknown part {part!r}")
        result[part] = {**value, "measured": started, "load_1min_after": os.getloadavg()[0]}
        args.json.write_text(json.dumps(result, indent=1) + "\n")  # each part as it finishes
    print(json.dumps({k: result[k] for k in ["setup", *parts]}, indent=1))


if __name__ == "__main__":
    main()
