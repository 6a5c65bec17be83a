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
