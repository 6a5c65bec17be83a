"""The plugin form: one chmc::ChannelGatherMatMul node per merged Linear, equal to the gather form."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")


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


def test_plugin_form_equals_gather_form(plugin_export, onnx_family):
    """Prefill with a mixed-expert, left-padded batch, then decode steps with the cache: 1e-5."""
    import json

    from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend

    runs = []
    for folder in (onnx_family["k2_onnx"], plugin_export):
        export = json.loads((folder / "chmc.json").read_text())["export"]
        state = OnnxRuntimeBackend(folder, export).start(np.array([2, 0, 1], np.int64))
        ids = np.random.default_rng(5).integers(0, 46, (3, 6))
        mask = np.ones((3, 6), np.int64)
        mask[1, :2] = 0
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits = [state.step(ids, mask, pos)]
        for t in range(3):
            mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits.append(state.step(ids[:, t:t + 1], mask, pos))
        runs.append(np.stack(logits))
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-5, rtol=0)


def test_plugin_form_generates_through_the_runtime(plugin_export, onnx_family):
    from chmc.runtime import load

    prompts, experts = ["1+2=", "ab"], ["expert_1", "expert_2"]
    assert load(plugin_export).generate(prompts, experts, max_new_tokens=6) == \
        load(onnx_family["k2_onnx"]).generate(prompts, experts, max_new_tokens=6)
