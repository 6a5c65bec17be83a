"""The plugin form: one chmc::ChannelGatherMatMul node per merged Linear, equal to the gather
form."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def brute_force(x, bank, index, expert_id):
    """The op's definition, one output element at a time."""
    batch, seq, _ = x.shape
    out = bank.shape[1]
    y = np.zeros((batch, seq, out), dtype=np.float64)
    for b in range(batch):
        for c in range(out):
            w = bank[index[expert_id[b], c], c].astype(np.float64)
            y[b, :, c] = x[b].astype(np.float64) @ w
    return y


def test_references_match_the_definition():
    import torch

    from chmc.plugins.channel_gather_matmul.reference import (
        channel_gather_matmul,
        channel_gather_matmul_torch,
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 16)).astype(np.float32)
    bank = rng.standard_normal((2, 24, 16)).astype(np.float32)
    index = rng.integers(0, 2, (5, 24)).astype(np.int32)
    expert_id = np.array([4, 0, 4], np.int64)
    ref = brute_force(x, bank, index, expert_id)
    np.testing.assert_allclose(channel_gather_matmul(x, bank, index, expert_id), ref, atol=1e-5)
    got = channel_gather_matmul_torch(*(torch.from_numpy(a) for a in (x, bank, index, expert_id)))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"expert_id \[5\] out of range \[0, 5\)"):
        channel_gather_matmul(x[:1], bank, index, np.array([5]))


def run_native_op(x, bank, index, expert_id, kernels="best"):
    """One chmc::ChannelGatherMatMul node in ONNX Runtime with the native kernel; bank and
    index are initializers, as in an exported graph."""
    from onnx import TensorProto, helper, numpy_helper

    from chmc.plugins.channel_gather_matmul.onnxruntime_op import register

    node = helper.make_node("ChannelGatherMatMul", ["x", "bank", "index", "expert_id"], ["y"],
                            domain="chmc", plugin_namespace="chmc")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", x.shape[2]]),
         helper.make_tensor_value_info("expert_id", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(bank, "bank"), numpy_helper.from_array(index, "index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("chmc", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    register(opts, kernels)
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "expert_id": expert_id})[0]


@pytest.mark.parametrize("kernels", ["best", "avx2", "c"])
@pytest.mark.parametrize("batch,seq,inp,out,groups,experts", [
    (1, 1, 512, 256, 2, 4),    # batch-1 decode
    (1, 1, 20, 30, 2, 3),      # batch-1 decode, in below the 4-vector step
    (8, 1, 67, 100, 2, 4),     # mixed decode, odd in/out
    (16, 1, 40, 33, 3, 5),     # the largest batch the per-channel path takes
    (8, 1, 64, 50, 2, 1),      # eight rows of one expert: one multi-row dot per channel
    (3, 5, 7, 45, 1, 2),       # 15 rows over 2 experts; in below one vector
    (1, 130, 96, 80, 2, 4),    # prefill: tiles of 6 channels x 64 rows, tails on both
    (3, 25, 130, 64, 2, 4),    # prefill with mixed experts, in not a multiple of 16
    (2, 17, 33, 31, 4, 4),     # K = N, out below one tile
])
def test_native_op_matches_the_definition(batch, seq, inp, out, groups, experts, kernels):
    """Both paths (per-channel for <= 16 rows, per-expert GEMM above), every tail, with each
    kernel set this CPU can run (AVX-512, AVX2 + FMA, plain C; a build limited to a set the CPU
    lacks takes the next narrower one): 1e-5 of max."""
    rng = np.random.default_rng(batch * 1000 + seq)
    x = rng.standard_normal((batch, seq, inp)).astype(np.float32)
    bank = rng.standard_normal((groups, out, inp)).astype(np.float32)
    index = rng.integers(0, groups, (experts, out)).astype(np.int32)
    expert_id = rng.integers(0, experts, batch).astype(np.int64)
    ref = brute_force(x, bank, index, expert_id)
    got = run_native_op(x, bank, index, expert_id, kernels)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_native_op_rejects_an_expert_out_of_range():
    x = np.ones((2, 1, 8), np.float32)
    bank = np.ones((2, 4, 8), np.float32)
    index = np.zeros((3, 4), np.int32)
    with pytest.raises(Exception, match=r"ChannelGatherMatMul: expert_id 3 out of range \[0, 3\)"):
        run_native_op(x, bank, index, np.array([0, 3], np.int64))


def test_native_op_compile_failure_is_one_clear_error(tmp_path, monkeypatch):
    """A compiler that fails leaves no library behind and names the source and the compiler."""
    from chmc.errors import ChmcError
    from chmc.plugins.channel_gather_matmul.onnxruntime_op import library_path

    monkeypatch.setenv("CHMC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(ChmcError, match=r"ort_kernel\.c: false failed to compile"):
        library_path()
    assert not list(tmp_path.rglob("*.so*"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(ChmcError, match=r"ort_kernel\.c: cannot compile .*no-such-cc"):
        library_path()
    monkeypatch.delenv("CC")
    assert library_path().stat().st_size > 0  # the machine's compiler builds it


@pytest.fixture(scope="module")
def plugin_export(onnx_family, tmp_path_factory):
    from chmc.compiler.export import export

    return export(onnx_family["k2"], tmp_path_factory.mktemp("plugin") / "onnx", linear="plugin")


def test_plugin_graph_is_what_tensorrt_consumes(plugin_export, onnx_family):
    onnx.checker.check_model(str(plugin_export / "model.onnx"), full_check=True)
    model = onnx.load(str(plugin_export / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "ChannelGatherMatMul"]
    assert len(nodes) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert all(n.domain == "chmc" for n in nodes)
    allowed = {onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING}
    for n in nodes:
        assert all(a.type in allowed for a in n.attribute)
        _, bank, index, expert_id = n.input
        assert expert_id == "expert_id"
        assert inits[index].data_type == onnx.TensorProto.INT32
        assert len(inits[bank].dims) == 3 and inits[bank].dims[0] == 2  # [K, out, in]
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def prefill_and_decode(folder, session=None):
    """Logits of a mixed-expert, left-padded prefill then 3 decode steps with the cache."""
    from chmc.formats.export import ExportFolder
    from chmc.runtime.graph_state import GraphState
    from chmc.runtime.onnxruntime_backend import session_for

    export = ExportFolder(folder)
    run = (session or session_for(export)).run
    state = GraphState(run, export.section, False, folder, np.array([2, 0, 1], np.int64),
                       np.float32)
    ids = np.random.default_rng(5).integers(0, 46, (3, 6))
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = [state.step(ids, mask, pos)]
    for t in range(3):
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits.append(state.step(ids[:, t:t + 1], mask, pos))
    return np.stack(logits)


def test_plugin_form_equals_gather_form(plugin_export, onnx_family):
    np.testing.assert_allclose(prefill_and_decode(plugin_export),
                               prefill_and_decode(onnx_family["k2_onnx"]), atol=1e-5, rtol=0)


def test_triton_repository_of_a_plugin_graph_carries_its_kernel(plugin_export, onnx_family,
                                                                tmp_path):
    """Triton's ONNX Runtime backend registers `model_operations` libraries on the session; do
    that with the repository's config and library, and the graph runs like the gather form."""
    from chmc.compiler.triton_repo import parse_model_config, write_triton_repo

    pytest.importorskip("tritonclient.grpc")
    repo = write_triton_repo(plugin_export, tmp_path / "repo")
    config = parse_model_config((repo / "chmc_engine" / "config.pbtxt").read_text())
    (ops,) = config.model_operations.op_library_filename
    assert ops == str((repo / "chmc_engine" / "1" / "chmc_ort_kernel.so").resolve())
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(ops)
    session = ort.InferenceSession(str(repo / "chmc_engine" / "1" / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(prefill_and_decode(plugin_export, session),
                               prefill_and_decode(onnx_family["k2_onnx"]), atol=1e-5, rtol=0)
    gather = parse_model_config((write_triton_repo(onnx_family["k2_onnx"], tmp_path / "g")
                                 / "chmc_engine" / "config.pbtxt").read_text())
    assert not gather.model_operations.op_library_filename  # standard ops need no library


def test_plugin_form_generates_through_the_runtime(plugin_export, onnx_family):
    from chmc import load

    prompts, experts = ["1+2=", "ab"], ["expert_1", "expert_2"]
    assert load(plugin_export).generate(prompts, experts, max_new_tokens=6) == \
        load(onnx_family["k2_onnx"]).generate(prompts, experts, max_new_tokens=6)


def test_half_precision_plugin_graph_on_onnxruntime_is_a_clear_error(onnx_family, chmc_cli,
                                                                     tmp_path):
    """The CPU kernel is float32: a float16 plugin graph (TensorRT's input) is refused by name."""
    from chmc.compiler.export import export

    folder = export(onnx_family["k2"], tmp_path / "fp16", linear="plugin", dtype="float16")
    res = chmc_cli("run", str(folder), "--expert", "expert_0", "1+2=", cwd=tmp_path)
    assert res.returncode != 0
    assert "not supported: a float16 plugin-form graph on ONNX Runtime" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = chmc_cli("triton", str(folder), "--out", str(tmp_path / "repo"), cwd=tmp_path)
    assert res.returncode != 0 and not (tmp_path / "repo").exists()
    assert "float16 plugin-form graph cannot be served by Triton's ONNX Runtime" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
