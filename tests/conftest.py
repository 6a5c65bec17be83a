"""Shared fixtures. Heavy fixtures (trained families, exported graphs) are built once per
session."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# The tests run on shared machines: one thread per library (torch's OpenMP, ONNX Runtime's pool,
# the build's workers, family training), set before torch is imported and inherited by the CLI
# subprocesses, so no thread spins or waits at a barrier for a core another job holds. Values
# already in the environment win.
for _var in ("OMP_NUM_THREADS", "CHMC_ORT_THREADS", "CHMC_THREADS", "CHMC_TRAIN_THREADS"):
    os.environ.setdefault(_var, "1")

# Generated bad inputs are the same on every run (CI must not flake on a new example), with no
# time limit per example (a shared machine), and no example database left in the checkout.
settings.register_profile("chmc", derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("chmc")

BAD_INPUTS: dict[str, set[str]] = defaultdict(set)  # kind -> distinct inputs a test rejected


@pytest.fixture(scope="session")
def rejected() -> Any:
    """rejected(kind, value): count one distinct bad input the suite saw refused (the summary
    at the end of the run lists them by kind)."""
    return lambda kind, value: BAD_INPUTS[kind].add(repr(value))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if BAD_INPUTS:
        counts = ", ".join(f"{kind} {len(v)}" for kind, v in sorted(BAD_INPUTS.items()))
        total = sum(len(v) for v in BAD_INPUTS.values())
        terminalreporter.write_line(f"bad inputs refused with one line: {total} ({counts})")


@pytest.fixture(scope="session")
def ort_session():
    """ort_session(model, options=None) -> an onnxruntime.InferenceSession on the CPU with the
    tests' thread count (CHMC_ORT_THREADS) instead of one spinning thread per core."""
    import onnxruntime as ort

    def make(model: Any, options: Any = None) -> Any:
        options = options or ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ["CHMC_ORT_THREADS"])
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                    providers=["CPUExecutionProvider"])

    return make


@pytest.fixture(scope="session")
def random_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A 4-expert random-delta Llama family in fp32 (base path, {name: path})."""
    from chmc.models.tiny.random_family import make_random_family

    return make_random_family(tmp_path_factory.mktemp("random_family"), n_experts=4, arch="llama")


@pytest.fixture(scope="session")
def onnx_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, Path]]:
    """A 3-expert Llama family with the tiny tokenizer, merged at K=N (exact) and at K=2, each
    exported to ONNX (gather form, fp32). Keys: base, experts, kn, k2, kn_onnx, k2_onnx."""
    from chmc import build
    from chmc.compiler.export import export
    from chmc.models.tiny.random_family import make_random_family
    from chmc.models.tiny.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("onnx_family")
    base, experts = make_random_family(root / "family", n_experts=3, arch="llama")
    save_tokenizer(base)
    out: dict[str, Path | dict[str, Path]] = {"base": base, "experts": experts}
    for key, k in (("kn", 3), ("k2", 2)):
        artifact = build(base, experts, root / key, groups=k, progress=False)
        out[key] = artifact
        out[f"{key}_onnx"] = export(artifact, root / f"{key}_onnx")
    return out


@pytest.fixture(scope="session")
def artifact_manifest():
    """artifact_manifest(expert names) -> a valid ArtifactManifest of an artifact without
    tensors."""
    from chmc.formats.artifact import Accounting, ArtifactManifest, Expert, Source

    def make(experts: list[str]) -> ArtifactManifest:
        return ArtifactManifest(
            architecture="LlamaForCausalLM", base=Source(path="/base", sha256="0" * 64),
            groups=1, clustering="cosine", method="mean", parameters={},
            tie_word_embeddings=False, tensors={}, weight_map={},
            experts=[Expert(name=n, path=f"/{n}", sha256="0" * 64, rel_error=0.0)
                     for n in experts],
            accounting=Accounting(base=0, ensemble=0, artifact=0, index_bytes=0, ratio=0.0))

    return make


@pytest.fixture(scope="session")
def chmc_cli():
    """Run the real CLI in a subprocess: chmc_cli(*args, cwd=Path) -> CompletedProcess (text)."""
    import subprocess
    import sys

    def run(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "chmc", *map(str, args)], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, check=False)

    return run


def _trained_family(name: str):
    from chmc.models.tiny.family import family

    return family(name, progress=False)  # cached under $CHMC_CACHE: minutes once, then instant


@pytest.fixture(scope="session")
def distinct_family():
    """The trained 4-task `distinct` family: .base, .experts {task: path},
    .tasks {task: {split: jsonl}}."""
    return _trained_family("distinct")


@pytest.fixture(scope="session")
def conflict_family():
    """The trained 4-task `conflict` family (one prompt format, experts disagree); like
    distinct_family."""
    return _trained_family("conflict")


@pytest.fixture(scope="session")
def triton_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tritonserver executable and the environment its Python stub needs (tests/tritonserver.py)."""
    from tritonserver import STUB_NUMPY, triton_env_for

    return triton_env_for(tmp_path_factory.mktemp("stub_src"), STUB_NUMPY)
