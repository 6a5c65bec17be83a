"""A 1B-width family end to end: `chmc family synth` writes llama-3.2-1b's hub config and tensors
(vocab 128256, tied embeddings, llama3 RoPE) at reduced depth; it is built, exported in the plugin
form and run on ONNX Runtime against transformers' own model of each expert. And a build
interrupted with Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from chmc.models.synth import RATIO, shape_config, tensor_shapes

pytestmark = pytest.mark.slow
SHAPE, LAYERS, EXPERTS = "llama-3.2-1b", 2, 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory, chmc_cli) -> Path:
    out = tmp_path_factory.mktemp("synth") / "family"
    res = chmc_cli("family", "synth", "--shape", SHAPE, "--experts", EXPERTS, "--layers", LAYERS,
                   "--out", out, cwd=out.parent, timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors


def test_synth_family_is_the_hub_model_with_fine_tune_shaped_deltas(synth: Path) -> None:
    config = json.loads((synth / "base" / "config.json").read_text())
    assert config == shape_config(SHAPE, LAYERS)
    hf = transformers.AutoConfig.from_pretrained(synth / "base")
    assert (hf.vocab_size, hf.hidden_size, hf.tie_word_embeddings) == (128256, 2048, True)
    assert hf.rope_parameters["rope_type"] == "llama3"
    base = read_all(synth / "base")
    expected = tensor_shapes(config)
    assert {k: tuple(v.shape) for k, v in base.items()} == expected  # tied: no lm_head stored
    # 0.8 GB at two layers: one file, named as the hub names a single shard
    assert [p.name for p in (synth / "base").glob("*.safetensors")] == ["model.safetensors"]
    assert {v.dtype for v in base.values()} == {torch.bfloat16}
    deltas = []
    for e in range(EXPERTS):
        expert = read_all(synth / "experts" / f"expert_{e}")
        d = {k: expert[k].float() - base[k].float() for k in base}
        for k, v in d.items():  # bf16 rounding of both sides adds ~0.1% of ||W||
            ratio = float(v.norm() / base[k].float().norm())
            assert RATIO[0] * 0.8 <= ratio <= RATIO[1] * 1.1, (e, k, ratio)
        deltas.append(d)
    name = "model.layers.0.mlp.gate_proj.weight"

    def row_cos(a: int, b: int) -> float:
        return float(torch.cosine_similarity(deltas[a][name], deltas[b][name], dim=1).mean())

    # experts 0 and 1 share directions (clustering has something to find), 0 and 2 do not
    assert row_cos(0, 1) > 0.2 > 0.05 > abs(row_cos(0, 2))
    tok = transformers.AutoTokenizer.from_pretrained(synth / "base")
    text = "naïve café, 2+2=4 🙂"
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128001)


def test_reduced_depth_1b_family_builds_exports_and_runs(synth: Path, chmc_cli,
                                                         tmp_path: Path) -> None:
    from chmc.formats.export import ExportFolder
    from chmc.runtime import load
    from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions
    from chmc.runtime.torch_backend import reconstruct

    experts = [f"expert_{e}={synth / 'experts' / f'expert_{e}'}" for e in range(EXPERTS)]
    build = chmc_cli("build", "--base", synth / "base", "--experts", *experts, "--groups", 2,
                     "--method", "ties", "--density", 0.5, "--out", tmp_path / "k2",
                     cwd=tmp_path, timeout=600)
    assert build.returncode == 0, build.stderr
    export = chmc_cli("export", tmp_path / "k2", "--linear", "plugin", "--out",
                      tmp_path / "onnx", cwd=tmp_path, timeout=600)
    assert export.returncode == 0, export.stderr
    ids = np.random.default_rng(0).integers(0, 128256, (EXPERTS, 12))
    backend = OnnxRuntimeBackend(ExportFolder(tmp_path / "onnx"), OnnxRuntimeOptions(threads=1))
    logits = backend.start(np.arange(EXPERTS)).step(ids, np.ones_like(ids),
                                                    np.tile(np.arange(12), (EXPERTS, 1)))
    for e in range(EXPERTS):
        model = reconstruct(tmp_path / "k2", e, dtype="float32")
        with torch.no_grad():
            want = model(torch.from_numpy(ids[e : e + 1])).logits[0, -1].numpy()
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(logits[e], want, atol=2e-4 * scale, rtol=0)
    # the runner end to end (tokenizer, cache, greedy steps) against transformers' generate
    runner = load(tmp_path / "onnx", threads=1)
    prompt = runner.tokenizer.encode("hello")
    got = runner.generate_ids([prompt], experts=[f"expert_{EXPERTS - 1}"], max_new_tokens=4)[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=4, do_sample=False)
    assert got == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, kill
def test_an_interrupted_build_leaves_nothing(synth: Path, tmp_path: Path,
                                             how: signal.Signals) -> None:
    experts = [f"expert_{e}={synth / 'experts' / f'expert_{e}'}" for e in range(EXPERTS)]
    cmd = [sys.executable, "-m", "chmc", "build", "--base", str(synth / "base"), "--experts",
           *experts, "--groups", "2", "--out", str(tmp_path / "k2")]
    # SIGINT as a terminal's Ctrl-C finds it: a test run started as a script's background job
    # passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # stage lines: the merge has started writing shards
        if line.startswith("channel-merging") or time.monotonic() > deadline:
            break
    assert list(tmp_path.glob(".k2.tmp-*")), "interrupt the build while it writes"
    proc.send_signal(how)
    assert proc.wait(timeout=120) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []
