"""Build speed and peak memory of `chmc build` on a Llama-shaped 0.17B fp16 model with 4 experts.

Prints one JSON object. Each build runs as its own subprocess; its wall time is measured around
it and its peak RSS comes from os.wait4's rusage of that child alone. The model (hidden 1024,
intermediate 2816, 8 layers, 16 heads, vocab 32000, untied lm_head) and 4 experts (base plus
distinct random deltas) are written once with torch into $CHMC_CACHE/bench (default
~/.cache/chmc/bench) and reused.

Anchor: mergekit 0.1.5 TIES (density 0.5) on exactly this setup: 125.7 s wall, 2.60 GB peak RSS.
Goal: chmc at K=2 at least 5x faster, peak RSS no higher. Where a `mergekit-yaml` executable is
found ($MERGEKIT_YAML, or /tmp/mkvenv/bin/mergekit-yaml), it is run side by side.

With --calibration S, the calibrated build is measured phase by phase: each expert's calibration
(S random-token sequences of 128 tokens through the model, its Grams written: what `chmc build
--calibration NAME=prompts.jsonl` runs per expert) as its own process, then the merges from those
Gram folders (output-error grouping, regmean merging) at K=2 and at --budget 0.5. A calibrated
build from prompt files costs the sum of its experts' calibrations plus its merge. The load
average (os.getloadavg, as `uptime` shows it) is recorded around each phase; CHMC_THREADS applies.
--calibration-only skips the TIES and mergekit runs; --end-to-end replaces the phases by one K=2
build from the prompt files, calibration included (it should cost about their sum).
Measured at 256 sequences (2-core machine shared with other jobs, load 1.8-2.4, CHMC_THREADS=1):
calibration 107-119 s and 1.55-1.62 GB per expert, K=2 merge 123 s / 1.88 GB, budget-0.5 merge
184 s / 1.93 GB; one K=2 build from the prompt files 542 s / 2.19 GB (uncalibrated TIES K=2: 16 s).

  python3 benchmarks/compile_benchmark.py [--skip-mergekit] [--calibration 256 [--calibration-only]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chmc.cache import cache_root

SHAPE: dict[str, Any] = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000}
N_EXPERTS = 4
MERGEKIT_ANCHOR = {"version": "0.1.5", "method": "ties", "density": 0.5, "wall_s": 125.7,
                   "peak_rss_gb": 2.60}


def make_family(root: Path) -> tuple[Path, dict[str, Path]]:
    """Base and experts as safetensors written directly (fast), cached between runs."""
    import torch
    import transformers
    from safetensors.torch import save_file

    base_dir = root / "base"
    experts = {f"expert_{i}": root / f"expert_{i}" for i in range(N_EXPERTS)}
    done = root / "done"
    if done.is_file() and done.read_text() == "v2":
        return base_dir, experts
    shutil.rmtree(root, ignore_errors=True)
    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, dtype="float16")
    config.architectures = ["LlamaForCausalLM"]  # mergekit reads the architecture from here
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def rand(shape: torch.Size, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(torch.float16)

    base = {k: (torch.ones(s, dtype=torch.float16) if len(s) == 1 else rand(s, 0.02))
            for k, s in shapes.items()}
    for folder, tensors in [(base_dir, base)] + [
        (path, {k: v + rand(v.shape, 0.002) for k, v in base.items()}) for path in experts.values()
    ]:
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    done.write_text("v2")
    return base_dir, experts


def _param_count() -> int:
    h, i, v, layers = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                          "num_hidden_layers"))
    return 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h  # untied, q/k/v/o heads = 16


def measure(cmd: list[str], required: bool = True,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run cmd as a child; wall time and that child's own peak RSS (os.wait4)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        if not required:
            return {"failed": f"exit status {status}: {err.strip().splitlines()[-1:]}"}
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3),
            "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}  # before, after


def chmc_build(base: Path, experts: dict[str, Path], out: Path, groups: int) -> list[str]:
    return [sys.executable, "-m", "chmc", "build", "--base", str(base), "--experts",
            *(f"{n}={p}" for n, p in experts.items()), "--groups", str(groups), "--method", "ties",
            "--density", "0.5", "--out", str(out), "--force"]


def calibrated_builds(base: Path, experts: dict[str, Path], work: Path, seqs: int,
                      result: dict[str, object], end_to_end: bool = False) -> None:
    """Per expert calibration from random-token prompts, then K=2 and budget 0.5 merges with
    output-error grouping and regmean from the Gram folders, each phase its own process; with
    end_to_end, instead one K=2 `chmc build` from the prompt files (calibration included)."""
    import random

    rng = random.Random(0)
    prompts = {}
    for name in experts:
        rows = [json.dumps({"input_ids": [rng.randrange(SHAPE["vocab_size"]) for _ in range(128)]})
                for _ in range(seqs)]
        prompts[name] = work / f"{name}.jsonl"
        prompts[name].write_text("\n".join(rows) + "\n")
    size = {"sequences": seqs, "tokens": seqs * 128}
    if end_to_end:
        result["build_k2_output_error_regmean_from_prompts"] = {
            **calibrated_build(base, experts, prompts, ["--groups", "2"], work / "k2"), **size}
        return
    grams = {name: work / f"grams_{name}" for name in experts}
    for name, path in experts.items():
        cmd = [sys.executable, __file__, "--collect-grams", str(path), str(prompts[name]),
               str(grams[name])]
        result[f"calibrate_{name}"] = {**measure(cmd), **size}
    for tag, extra in (("k2", ["--groups", "2"]), ("budget0.5", ["--budget", "0.5"])):
        result[f"merge_{tag}_output_error_regmean"] = calibrated_build(
            base, experts, grams, extra, work / tag)


def calibrated_build(base: Path, experts: dict[str, Path], calibration: dict[str, Path],
                     extra: list[str], out: Path) -> dict[str, Any]:
    """One output-error/regmean `chmc build` (calibration: prompt files or Gram folders)."""
    cmd = [sys.executable, "-m", "chmc", "build", "--base", str(base), "--experts",
           *(f"{n}={p}" for n, p in experts.items()), *extra, "--clustering", "output-error",
           "--method", "regmean", "--out", str(out), "--force"]
    for name, source in calibration.items():
        cmd += ["--calibration", f"{name}={source}"]
    measured = measure(cmd)
    measured["ratio"] = round(json.loads((out / "chmc.json").read_text())["accounting"]["ratio"], 4)
    shutil.rmtree(out)
    return measured


def collect_one(expert: str, prompts: str, out: str) -> None:
    """One expert's calibration as `chmc build` runs it: its prompts, Grams of every merged
    tensor, on the build's threads."""
    import torch

    from chmc.compiler.calibration import collect_grams, read_sequences
    from chmc.compiler.merge import build_threads
    from chmc.compiler.plan import plan_tasks
    from chmc.formats.checkpoint import Checkpoint

    torch.set_num_threads(build_threads())
    merged = {t.name for t in plan_tasks(Checkpoint(expert), 2, None) if t.kind == "merged"}
    collect_grams(expert, read_sequences(Path(prompts), Path(expert)), out, merged, progress=False)


def mergekit_command(base: Path, experts: dict[str, Path], work: Path,
                     dtype: str = "float16") -> list[str] | None:
    exe = (os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
           or "/tmp/mkvenv/bin/mergekit-yaml")
    if not Path(exe).is_file():
        return None
    models = "".join(f"  - model: {p}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                     for p in experts.values())
    cfg = work / "mergekit.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"
                   f"parameters:\n  normalize: true\ndtype: {dtype}\n")
    return [exe, str(cfg), str(work / "mergekit_out"), "--lazy-unpickle", "--no-copy-tokenizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path,
                        default=cache_root() / "bench" / "compile_llama_0.17b")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--calibration", type=int, default=0, metavar="S",
                        help="also calibrated builds, S sequences of 128 tokens per expert")
    parser.add_argument("--calibration-only", action="store_true")
    parser.add_argument("--end-to-end", action="store_true",
                        help="with --calibration: one K=2 build from the prompt files instead of "
                             "the per-phase runs")
    parser.add_argument("--collect-grams", nargs=3, metavar=("EXPERT", "PROMPTS", "OUT"),
                        help=argparse.SUPPRESS)  # one calibration phase, run as a child
    args = parser.parse_args()
    if args.collect_grams:
        collect_one(*args.collect_grams)
        return
    t0 = time.perf_counter()
    base, experts = make_family(args.cache)
    result: dict[str, object] = {
        "setup": {**SHAPE, "dtype": "float16", "experts": N_EXPERTS, "params": _param_count(),
                  "family_ready_s": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count(),
                  "chmc_threads": os.environ.get("CHMC_THREADS", "default (every core)")},
    }
    with tempfile.TemporaryDirectory(prefix="chmc-bench-") as tmp:
        work = Path(tmp)
        if args.calibration:
            calibrated_builds(base, experts, work, args.calibration, result, args.end_to_end)
        if args.calibration_only:
            print(json.dumps(result, indent=1))
            return
        result["chmc_k2_ties"] = measure(chmc_build(base, experts, work / "k2", 2))
        shutil.rmtree(work / "k2")
        result["chmc_k1_ties"] = measure(chmc_build(base, experts, work / "k1", 1))
        shutil.rmtree(work / "k1")
        cmd = None if args.skip_mergekit else mergekit_command(base, experts, work)
        if cmd is not None:
            result["mergekit_ties"] = measure(cmd, required=False)
        result["mergekit_anchor"] = MERGEKIT_ANCHOR
    measured = result.get("mergekit_ties")
    ref = measured if isinstance(measured, dict) and "wall_s" in measured else MERGEKIT_ANCHOR
    k2 = result["chmc_k2_ties"]
    assert isinstance(ref, dict) and isinstance(k2, dict)
    speedup = round(ref["wall_s"] / k2["wall_s"], 2)
    rss_ratio = round(k2["peak_rss_gb"] / ref["peak_rss_gb"], 3)
    result.update(speedup_k2_vs_mergekit=speedup, rss_k2_vs_mergekit=rss_ratio,
                  goal_met=speedup >= 5 and rss_ratio <= 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
