"""The benchmarks' own plumbing that runs without a GPU: gpu_session.sh's summary of a kernel
run, read back from the files a session writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUTOTUNING = ("Triton autotuning for function _mixed_kernel,\nwith key as (4096, 4096, "
              "'torch.bfloat16'),\nfinished after 2.41s,\nbest config selected: BLOCK_N: 32, "
              "BLOCK_K: 256, num_warps: 4, num_ctas: 1, num_stages: 4, maxnreg: None;\n")


def summary(tmp_path: Path, out: str, err: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "k.json").write_text(out)
    (tmp_path / "k.err").write_text(err)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"),
                           "--summary", str(tmp_path / "k.json"), str(tmp_path / "k.err")],
                          capture_output=True, text=True, timeout=60, check=False)


def test_summary_reads_the_result_between_autotuning_lines(tmp_path: Path) -> None:
    result = {"decode": {"ratio": 1.012, "dense_ms": 4.0}, "prefill": {"ratio": 1.279},
              "mixed": {"ratio": 1.712}}
    partial = json.dumps({"decode": {"ratio": 9.9}})
    done = summary(tmp_path, AUTOTUNING + json.dumps(result, indent=2) + "\n" + AUTOTUNING,
                   partial + "\n" + AUTOTUNING)
    assert done.returncode == 0, done.stderr
    assert "decode {'ratio': 1.012}" in done.stdout and "mixed {'ratio': 1.712}" in done.stdout
    # cut by its timeout: nothing complete on stdout, the last partial line on stderr
    done = summary(tmp_path, AUTOTUNING, json.dumps({"decode": {"ratio": 1.5}}) + "\n"
                   + AUTOTUNING + partial + "\n" + AUTOTUNING)
    assert done.returncode == 0 and "decode {'ratio': 9.9}" in done.stdout, done.stdout
    done = summary(tmp_path, AUTOTUNING, AUTOTUNING)
    assert done.returncode == 1 and "gpu_kernels: no results in" in done.stdout


def test_scale_gpu_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    """benchmarks/scale_gpu.py's whole path at one layer on CPU, so a GPU session does not spend
    its minutes on a broken script: chmc's Inductor-compiled decode at batch 1 and 4 (one
    recompile), prefill, transformers' dense side, the ratios and goals, and --combine of the
    JSON lines giving back the run's own comparison."""
    out = tmp_path / "run.jsonl"
    with out.open("w") as f:
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "scale_gpu.py"), "--device", "cpu",
             "--layers", "1", "--no-compile", "--shapes", "tinyllama-1.1b", "--batches", "1,4",
             "--steps", "2", "--prefill", "64", "--calibration", "0"],
            stdout=f, stderr=subprocess.PIPE, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = {s["section"]: s for s in map(json.loads, out.read_text().splitlines())}
    run = sections["tinyllama-1.1b done"]
    assert run["chmc"]["compile"] == "inductor" and run["layers"] == 1
    assert run["chmc"]["decode_attention"] == "sdpa"  # the kernel is CUDA's
    for batch in ("b1", "b4"):
        chmc, dense = run["chmc"][batch], run["dense"][batch]
        assert chmc["step_ms"] > 0 and dense["step_ms"] > 0
        assert chmc["vs_dense"] == round(chmc["step_ms"] / dense["step_ms"], 3)
    assert 0.45 < run["chmc"]["weights_vs_ensemble"] < 0.55  # K/N = 0.5, plus the index tables
    assert set(run["goals"]) == {"decode_b1_vs_dense", "weights_vs_ensemble", "prefill_vs_dense"}
    combined = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale_gpu.py"), "--combine", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert combined.returncode == 0, combined.stderr[-2000:]
    assert json.loads(combined.stdout)["tinyllama-1.1b"]["goals"] == run["goals"]


def test_ort_kernel_benchmark_runs_every_kernel_set(tmp_path: Path) -> None:
    """benchmarks/ort_kernel.py at two layers and one round: every kernel set gives the same
    outputs in every case (the script asserts it in its warm-up round) and the JSON has a time
    and a ratio for each."""
    out = tmp_path / "k.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ort_kernel.py"), "--layers", "2",
         "--rounds", "1", "--prefill", "70", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = {"decode b1", "decode b8, one expert", "decode b8, 4 experts mixed", "prefill 70"}
    assert set(result["ms"]) == set(result["vs_dense"]) == cases
    for case in cases:
        assert set(result["vs_dense"][case]) == {"chmc best", "chmc avx2", "chmc c"}
        assert all(t > 0 for t in result["ms"][case].values())
