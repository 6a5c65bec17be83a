"""The TensorRT engine stage: profiles from the graph's named dims, a clean failure without
TensorRT (nothing written), and, where TensorRT and a GPU exist, an engine that matches ONNX
Runtime.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from chmc.compiler.engine import Ranges, build_engine, find_onnx, profiles
from chmc.errors import ChmcError
from chmc.formats.engine import read_engine_manifest
from chmc.plugins.tensorrt import tensorrt_available

onnx = pytest.importorskip("onnx")


def decoder_graph_io(folder: Path, *, plugin_namespace: str | None = "chmc",
                     extra_dim: str | None = None) -> Path:
    """An ONNX folder whose inputs/outputs are exactly what `chmc export` declares for a tiny
    Llama (io_spec), around one plugin-form node; enough for the engine stage's graph checks."""
    from onnx import helper

    from chmc.compiler.onnx_graph import ONNX_DTYPES, io_spec
    from chmc.formats.export import TensorIO
    from chmc.models.registry import describe
    from chmc.models.tiny.random_family import tiny_config

    _, cfg = describe({**tiny_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"]})
    inputs, _ = io_spec(cfg, "float16", merged=True)
    if extra_dim:
        inputs.append(TensorIO(name="odd", dtype="int64", shape=(extra_dim,)))
    attrs = {} if plugin_namespace is None else {"plugin_namespace": plugin_namespace}
    node = helper.make_node("ChannelGatherMatMul", ["x", "bank", "index", "expert_id"], ["logits"],
                            domain="chmc", name="lm_head", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(e.name, ONNX_DTYPES[e.dtype], list(e.shape))
                      for e in inputs],
        [helper.make_tensor_value_info("logits", ONNX_DTYPES["float16"],
                                       ["batch", "sequence", 64])])
    folder.mkdir()
    onnx.save(helper.make_model(graph), folder / "model.onnx")
    (folder / "config.json").write_text("{}")
    return folder


def test_profiles_follow_the_graph_dims(tmp_path: Path) -> None:
    onnx_path = find_onnx(decoder_graph_io(tmp_path / "onnx"))
    ranges = Ranges(batch=(1, 2, 4), sequence=(1, 64, 512), past=(0, 100, 1000))
    prefill, decode = profiles(onnx_path, ranges)
    assert prefill["input_ids"] == ((1, 1), (2, 64), (4, 512))
    assert prefill["attention_mask"] == ((1, 1), (2, 164), (4, 1512))  # total = past + new
    assert prefill["expert_id"] == ((1,), (2,), (4,))
    kv = prefill["past_key_values.0.key"]  # [batch, kv_heads=2, past, head_dim=8]
    assert kv == ((1, 2, 0, 8), (2, 2, 100, 8), (4, 2, 1000, 8))
    assert decode["input_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode["past_key_values.1.value"] == ((1, 2, 1, 8), (2, 2, 100, 8), (4, 2, 1000, 8))
    assert decode["attention_mask"] == ((1, 2), (2, 101), (4, 1001))
    assert set(prefill) == set(decode) and len(prefill) == 4 + 2 * 2  # every input, 2 layers of kv


@pytest.mark.parametrize("case, message", [
    ("unknown dim", "input 'odd' axis 0 has dynamic dim 'widgets'"),
    ("no namespace", "node 'lm_head' (ChannelGatherMatMul) has plugin_namespace=None"),
    ("bad range", "sequence range min=5 opt=2 max=9"),
])
def test_graph_problems_are_one_line_errors(tmp_path: Path, case: str, message: str) -> None:
    folder = decoder_graph_io(tmp_path / "onnx", plugin_namespace=None if case == "no namespace"
                              else "chmc", extra_dim="widgets" if case == "unknown dim" else None)
    ranges = Ranges(sequence=(5, 2, 9)) if case == "bad range" else Ranges()
    with pytest.raises(ChmcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        profiles(find_onnx(folder), ranges)


def test_find_onnx_and_engine_json_errors(tmp_path: Path) -> None:
    with pytest.raises(ChmcError, match="no such ONNX file or folder"):
        find_onnx(tmp_path / "missing")
    (tmp_path / "two").mkdir()
    for n in ("a.onnx", "b.onnx"):
        (tmp_path / "two" / n).write_bytes(b"")
    with pytest.raises(ChmcError, match="found 2"):
        find_onnx(tmp_path / "two")
    with pytest.raises(ChmcError, match="no engine.json"):
        read_engine_manifest(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ChmcError, match="field 'format' is 'other'"):
        read_engine_manifest(tmp_path)


def test_engine_command_without_tensorrt_fails_cleanly(tmp_path: Path) -> None:
    """One line naming what to install, exit 1, and nothing written next to --out."""
    if tensorrt_available():
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    if importlib.util.find_spec("tensorrt") is not None:  # e.g. tensorrt-stubs' empty namespace
        import tensorrt

        assert not hasattr(tensorrt, "Builder")  # importable, yet correctly seen as absent
    folder = decoder_graph_io(tmp_path / "onnx")
    parent = tmp_path / "outputs"
    parent.mkdir()
    result = subprocess.run([sys.executable, "-m", "chmc", "engine", str(folder),
                             "--out", str(parent / "engine")],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chmc: error: TensorRT is not installed"), lines
    assert "pip install tensorrt" in lines[0]
    assert list(parent.iterdir()) == [], "the failed command left files behind"
    with pytest.raises(ChmcError, match="TensorRT is not installed"):  # the Python API too
        build_engine(folder, parent / "engine")


def test_build_target_trt_without_tensorrt_writes_nothing(
        random_family: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    """`chmc build --target trt` checks for TensorRT before merging: no artifact is left behind."""
    if tensorrt_available():
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    base, experts = random_family
    result = subprocess.run(
        [sys.executable, "-m", "chmc", "build", "--base", str(base), "--experts",
         *[f"{n}={p}" for n, p in experts.items()], "--groups", "2", "--out",
         str(tmp_path / "merged"), "--target", "trt"],
        check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "TensorRT is not installed" in result.stderr and "pip install tensorrt" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_backend_tensorrt_without_tensorrt_fails_cleanly(tmp_path: Path) -> None:
    """`chmc run --backend tensorrt` wants an engine folder, then TensorRT, before any compute."""
    if tensorrt_available():
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    folder = decoder_graph_io(tmp_path / "onnx")

    def run(source: Path) -> list[str]:
        result = subprocess.run([sys.executable, "-m", "chmc", "run", str(source), "hi",
                                 "--backend", "tensorrt"],
                                check=False, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stdout == ""
        return result.stderr.strip().splitlines()

    lines = run(folder)  # an export folder is not an engine folder
    assert len(lines) == 1 and "needs an engine folder with model.plan" in lines[0], lines
    (folder / "model.plan").write_bytes(b"not an engine")
    lines = run(folder)
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0], lines


def _gpu_tensorrt() -> None:
    if not tensorrt_available():
        pytest.skip("TensorRT is not installed (pip install tensorrt on a CUDA machine)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(),
                    reason="TensorRT is not installed (pip install tensorrt on a CUDA machine)")
def test_engine_matches_onnxruntime(onnx_family: dict[str, Any], tmp_path: Path,
                                    ort_session: Any) -> None:
    """Plugin-form export -> engine: prefill logits equal ONNX Runtime's gather form per expert."""
    _gpu_tensorrt()
    import torch

    from chmc.compiler.export import export
    from chmc.formats.engine import EngineFolder
    from chmc.runtime.tensorrt_backend import TensorRTRunner

    plugin_onnx = export(onnx_family["k2"], tmp_path / "plugin", linear="plugin")
    engine_dir = build_engine(plugin_onnx, tmp_path / "engine",
                              ranges=Ranges((1, 2, 4), (1, 8, 32), (0, 8, 32)))
    meta = read_engine_manifest(engine_dir).model_dump()
    assert [p["name"] for p in meta["profiles"]] == ["prefill", "decode"]
    assert {b["name"] for b in meta["bindings"]} >= {"input_ids", "expert_id", "logits"}
    runner = TensorRTRunner(EngineFolder(engine_dir))
    session = ort_session(Path(onnx_family["k2_onnx"]) / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 64, (3, 8))
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids, "attention_mask": np.ones((3, 8), np.int64),
        "position_ids": np.tile(np.arange(8), (3, 1)), "expert_id": np.array([0, 1, 2])}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((3, i.shape[1], 0, i.shape[3]), np.float32)
    want = session.run(["logits"], feeds)[0]
    (got,) = runner.run(["logits"], feeds)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert torch.cuda.is_available()


def test_engine_help_lists_ranges() -> None:
    result = subprocess.run([sys.executable, "-m", "chmc", "engine", "--help"], check=False,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for option in ("--out", "--batch", "--seq", "--past", "--force"):
        assert option in result.stdout
