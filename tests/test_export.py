"""ONNX export: the graph with `expert_id` reproduces every expert's transformers logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from graphs import feeds, run_with_cache

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32 logits, ONNX Runtime vs transformers eager


def hf_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_kn_export_matches_each_original_expert_prefill_and_decode(onnx_family, ort_session):
    """K = N: the graph is exact, so each expert's logits equal its original checkpoint's."""
    session = ort_session(onnx_family["kn_onnx"] / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 64, (2, 9))
    for n, path in enumerate(onnx_family["experts"].values()):
        ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), ids)
        got = run_with_cache(session, ids, [n, n], prefill=5)  # 5 prefill + 4 decode steps
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_k2_export_matches_reconstructed_experts(onnx_family, ort_session):
    """K < N: each expert's graph output equals the transformers model rebuilt from the artifact."""
    from chmc.runtime.torch_backend import reconstruct

    session = ort_session(onnx_family["k2_onnx"] / "model.onnx")
    ids = np.random.default_rng(1).integers(0, 64, (1, 7))
    outs = []
    for n in range(3):
        ref = hf_logits(reconstruct(onnx_family["k2"], n), ids)
        got = run_with_cache(session, ids, [n], prefill=4)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the experts really differ through expert_id


def test_export_folder_layout_and_named_external_initializers(onnx_family):
    folder = onnx_family["k2_onnx"]
    for name in ("model.onnx", "model.onnx.data", "chmc.json", "config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    bank = inits["model.layers.0.mlp.up_proj.weight.bank"]
    assert bank.data_location == onnx.TensorProto.EXTERNAL
    assert list(bank.dims) == [2 * 64, 32]  # [K*out, in], K read from the artifact's bank
    assert "model.layers.1.input_layernorm.weight.experts" in inits
    assert [i.name for i in model.graph.input][:4] == [
        "input_ids", "attention_mask", "position_ids", "expert_id"]
    import json

    export = json.loads((folder / "chmc.json").read_text())["export"]
    assert (export["linear"], export["num_layers"], export["num_kv_heads"], export["head_dim"]) \
        == ("gather", 2, 2, 8)


@pytest.mark.parametrize("arch,kwargs", [("mistral", {}), ("qwen2", {}),
                                         ("qwen2", {"tie_word_embeddings": True}),
                                         ("llama", {"tie_word_embeddings": True,
                                                    "attention_bias": True})])
def test_families_and_tied_embeddings(tmp_path, arch, kwargs, ort_session):
    """Mistral, Qwen2 (q/k/v biases), tied embeddings: merged and dense exports match
    transformers."""
    from chmc import build
    from chmc.compiler.export import export
    from chmc.models.tiny.random_family import make_random_family

    base, experts = make_random_family(tmp_path / "fam", n_experts=2, arch=arch, **kwargs)
    artifact = build(base, experts, tmp_path / "art", groups=2, progress=False)
    merged = ort_session(export(artifact, tmp_path / "onnx") / "model.onnx")
    dense = ort_session(export(base, tmp_path / "dense") / "model.onnx")
    assert "expert_id" not in {i.name for i in dense.get_inputs()}
    ids = np.random.default_rng(2).integers(0, 64, (1, 6))
    for n, path in enumerate(experts.values()):
        ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), ids)
        np.testing.assert_allclose(run_with_cache(merged, ids, [n], 4), ref, atol=ATOL, rtol=0)
    ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    np.testing.assert_allclose(run_with_cache(dense, ids, None, 4), ref, atol=ATOL, rtol=0)


def test_float16_export_checks_and_tracks_float32(onnx_family, tmp_path, ort_session):
    from chmc.compiler.export import export

    folder = export(onnx_family["k2"], tmp_path / "fp16", dtype="float16")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ids = np.random.default_rng(3).integers(0, 64, (1, 5))
    s16 = ort_session(folder / "model.onnx")
    s32 = ort_session(onnx_family["k2_onnx"] / "model.onnx")
    f = feeds(s32, ids, None, [1], 5)
    f16 = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in f.items()}
    got, ref = s16.run(["logits"], f16)[0], s32.run(["logits"], f)[0]
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-2, rtol=0)


def chmc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chmc", *args], check=False, capture_output=True,
                          text=True, timeout=300)


def test_unsupported_architecture_is_one_line_error(tmp_path):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    res = chmc("export", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        ("chmc: error: not supported: GPT2LMHeadModel (ONNX export handles "
         "['Gemma2ForCausalLM', 'Gemma3ForCausalLM', 'LlamaForCausalLM', 'MistralForCausalLM', "
         "'Phi3ForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'])")]
    assert not (tmp_path / "out").exists()


def test_cli_export_bad_options_and_existing_output(onnx_family, tmp_path):
    res = chmc("export", str(onnx_family["k2"]), "--out", str(tmp_path / "o"), "--linear", "fused")
    assert res.returncode == 1 and "--linear 'fused'" in res.stderr
    res = chmc("export", str(onnx_family["k2"]), "--out", str(tmp_path / "o"), "--dtype", "int8")
    assert res.returncode == 1 and "--dtype 'int8'" in res.stderr
    res = chmc("export", str(onnx_family["k2"]), "--out", str(onnx_family["k2_onnx"]))
    assert res.returncode == 1 and "output path exists" in res.stderr
    assert list(Path(tmp_path).iterdir()) == []


def test_unsupported_rope_scaling_is_named(onnx_family, tmp_path):
    import json
    import shutil

    from chmc.compiler.export import export
    from chmc.errors import NotSupportedError

    src = tmp_path / "scaled"
    shutil.copytree(onnx_family["base"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 2]}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotSupportedError, match="rope type 'mrope'"):
        export(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_select_form_equals_gather_form(onnx_family, tmp_path, ort_session):
    """`--linear select` (all K banks, then each row's channel) == the gather form, mixed batch."""
    from chmc.compiler.export import export

    select = ort_session(export(onnx_family["k2"], tmp_path / "sel", linear="select")
                         / "model.onnx")
    gather = ort_session(onnx_family["k2_onnx"] / "model.onnx")
    ids = np.random.default_rng(4).integers(0, 64, (3, 7))
    np.testing.assert_allclose(run_with_cache(select, ids, [2, 0, 1], 4),
                               run_with_cache(gather, ids, [2, 0, 1], 4), atol=1e-5, rtol=0)


def test_cli_build_target_onnx_then_run(onnx_family, tmp_path):
    """`chmc build --target onnx` writes the artifact and OUT/onnx; `chmc run` serves it."""
    experts = [f"{n}={p}" for n, p in onnx_family["experts"].items()]
    out = tmp_path / "merged"
    res = chmc("build", "--base", str(onnx_family["base"]), "--experts", *experts, "--groups", "2",
               "--out", str(out), "--target", "onnx")
    assert res.returncode == 0, res.stderr
    assert (out / "chmc.json").is_file() and (out / "onnx" / "model.onnx").is_file()
    res = chmc("run", str(out / "onnx"), "1+2=", "--expert", "expert_2", "-n", "5")
    assert res.returncode == 0, res.stderr
    from chmc import load

    assert res.stdout == load(onnx_family["k2_onnx"]).generate(
        ["1+2="], ["expert_2"], max_new_tokens=5)[0] + "\n"
