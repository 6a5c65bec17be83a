"""PEFT adapters as experts: every folded tensor equals peft's merge_and_unload() of the same
adapter (LoRA, rsLoRA, DoRA, rank/alpha patterns, embeddings, LoRA biases, modules_to_save, fused
projections), adapters and full fine-tunes merge together in one build, and an adapter of
another base is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FOLD_ATOL = 1e-5  # float32 tensors, folded here and by peft
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("llama", {"target_modules": LINEARS}),
    "lora (rank and alpha patterns)": ("llama", {
        "target_modules": LINEARS, "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"gate_proj": 3.0}}),
    "rslora": ("llama", {"target_modules": LINEARS, "use_rslora": True}),
    "dora": ("llama", {"target_modules": LINEARS, "use_dora": True}),
    "lora + embeddings + modules_to_save": ("llama", {
        "target_modules": [*LINEARS, "embed_tokens"], "modules_to_save": ["lm_head"]}),
    "dora + embeddings + modules_to_save": ("llama", {
        "target_modules": [*LINEARS, "embed_tokens"], "modules_to_save": ["lm_head"],
        "use_dora": True}),
    "lora bias (qwen2 q/k/v biases)": ("qwen2", {"target_modules": ["q_proj", "v_proj"],
                                                 "lora_bias": True}),
    "dora on fused projections (phi3)": ("phi3", {
        "target_modules": ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"],
        "use_dora": True}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random fp32 base per family, with the tiny tokenizer."""
    from chmc.models.tiny.random_family import make_random_family
    from chmc.models.tiny.tokenizer import save_tokenizer

    out = {}
    for arch in ("llama", "qwen2", "phi3"):
        base, _ = make_random_family(tmp_path_factory.mktemp(arch), n_experts=0, arch=arch)
        save_tokenizer(base)
        out[arch] = base
    return out


def make_adapter(base: Path, out: Path, seed: int = 0, **settings: Any) -> Path:
    """A trained-looking adapter: random A and B (and DoRA magnitudes, and modules_to_save
    copies moved away from the base), saved by peft itself."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)
    tuned = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    tuned.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_folded_tensors_equal_peft_merge_and_unload(case: str, bases: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from chmc.formats.adapter import Adapter
    from chmc.formats.checkpoint import Checkpoint

    arch, settings = ADAPTERS[case]
    adapter = make_adapter(bases[arch], tmp_path / "adapter", **settings)
    folded = Adapter(adapter, Checkpoint(bases[arch]))
    want = peft_merged(bases[arch], adapter)
    assert folded.changed, "the adapter changes nothing"
    base = Checkpoint(bases[arch])
    for name in base.tensors:
        got = folded.tensor(name)
        assert got.dtype == want[name].dtype, name
        torch.testing.assert_close(got, want[name], atol=FOLD_ATOL, rtol=0, msg=name)
        if name in folded.changed:
            assert not torch.equal(got, base.tensor(name)), f"{name} did not change"


@pytest.fixture(scope="module")
def mixed(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A full fine-tune, a LoRA and a DoRA adapter (embeddings, lm_head saved) of one base."""
    root = tmp_path_factory.mktemp("mixed")
    base = bases["llama"]
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():  # a full fine-tune: every tensor moved a little
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(root / "full")
    experts = {
        "full": root / "full",
        "lora": make_adapter(base, root / "lora", seed=1, target_modules=LINEARS),
        "dora": make_adapter(base, root / "dora", seed=2, use_dora=True,
                             target_modules=[*LINEARS, "embed_tokens"],
                             modules_to_save=["lm_head"]),
    }
    return {"root": root, "base": base, "experts": experts}


def test_adapters_and_full_experts_build_and_run_like_peft(mixed: dict[str, Any],
                                                           chmc_cli: Any, ort_session) -> None:
    """`chmc build --experts full=DIR lora=ADAPTER dora=ADAPTER` at K = N, exported: each row's
    logits equal its expert in transformers (the adapters merged by peft) within 1e-4."""
    from graphs import run_with_cache

    root, experts = mixed["root"], mixed["experts"]
    out = root / "kn"
    done = chmc_cli("build", "--base", mixed["base"], "--experts",
                    *[f"{n}={p}" for n, p in experts.items()], "--groups", "3", "--out", out,
                    "--target", "onnx", cwd=root)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "chmc.json").read_text())
    assert [(e["name"], e["kind"]) for e in manifest["experts"]] == [
        ("full", "checkpoint"), ("lora", "adapter"), ("dora", "adapter")]
    session = ort_session(out / "onnx" / "model.onnx")
    ids = np.random.default_rng(0).integers(3, 64, (3, 9))
    got = run_with_cache(session, ids, [0, 1, 2], 5)
    for n, (name, path) in enumerate(experts.items()):
        model = transformers.AutoModelForCausalLM.from_pretrained(mixed["base"])
        if name != "full":
            model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            want = model.eval()(torch.from_numpy(ids[n:n + 1])).logits.numpy()
        np.testing.assert_allclose(got[n:n + 1], want, atol=1e-4, rtol=0, err_msg=name)


def test_adapters_in_merge_yml(mixed: dict[str, Any], chmc_cli: Any) -> None:
    """merge.yml lists adapter folders like any model (or as mergekit's BASE+ADAPTER); the
    artifact equals the CLI's."""
    root, experts = mixed["root"], mixed["experts"]
    config = root / "merge.yml"
    forms = {"full": str(experts["full"]), "lora": str(experts["lora"]),  # a folder alone
             "dora": f"{mixed['base']}+{experts['dora']}"}  # mergekit's BASE+ADAPTER
    config.write_text(f"base_model: {mixed['base']}\nmerge_method: mean\ngroups: 2\nmodels:\n"
                      + "".join(f"  - model: {m}\n    name: {n}\n" for n, m in forms.items()))
    a = chmc_cli("build", "--config", config, "--out", root / "yml", cwd=root)
    b = chmc_cli("build", "--base", mixed["base"], "--experts",
                 *[f"{n}={p}" for n, p in experts.items()], "--groups", "2", "--out",
                 root / "cli", cwd=root)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    from safetensors.numpy import load_file

    for f in sorted((root / "cli").glob("*.safetensors")):
        left, right = load_file(f), load_file(root / "yml" / f.name)
        assert left.keys() == right.keys()
        for k in left:
            np.testing.assert_array_equal(left[k], right[k])


def test_an_adapter_of_another_base_is_refused(mixed: dict[str, Any], chmc_cli: Any,
                                               tmp_path: Path) -> None:
    """Same shapes, other weights: one line naming both bases, nothing written."""
    from chmc.models.tiny.random_family import make_random_family

    other, _ = make_random_family(tmp_path / "other", n_experts=0, arch="llama", seed=5)
    stranger = make_adapter(other, tmp_path / "stranger", target_modules=LINEARS)
    experts = {**mixed["experts"], "stranger": stranger}
    done = chmc_cli("build", "--base", mixed["base"], "--experts",
                    *[f"{n}={p}" for n, p in experts.items()], "--groups", "2",
                    "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"chmc: error: expert 'stranger' ({stranger}) is an adapter of {other}, not of --base "
        f"{mixed['base']}: tensor "), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"layer_replication": [[0, 1]]}, "field 'layer_replication' is not supported"),
    ({"r": "four"}, "field 'r': Input should be a valid integer"),
    ({"r": 0}, "field 'r' must be positive, got 0"),
    ({"rank_pattern": {"v_proj": 3}}, ("module 'model.layers.0.self_attn.v_proj' has rank 4 in "
                                       "adapter_model.safetensors, the config says 3")),
])
def test_bad_adapter_configs_are_named(mixed: dict[str, Any], chmc_cli: Any, tmp_path: Path,
                                       rejected: Any, edit: dict[str, Any], message: str) -> None:
    import shutil

    adapter = shutil.copytree(mixed["experts"]["lora"], tmp_path / "bad")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    done = chmc_cli("build", "--base", mixed["base"], "--experts", f"bad={adapter}",
                    f"full={mixed['experts']['full']}", "--groups", "2", "--out", tmp_path / "o",
                    cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(adapter / "adapter_config.json") in lines[0] \
        and message in lines[0], lines
    assert not (tmp_path / "o").exists()
    rejected("adapter_config.json", edit)


def test_an_adapter_calibrates_as_its_merged_model(mixed: dict[str, Any], tmp_path: Path) -> None:
    """Grams collected from an adapter expert (the base with the adapter folded in) equal those
    of peft's merged model saved as a full checkpoint."""
    from chmc.compiler.calibration import collect_grams
    from chmc.compiler.grams import GramFiles
    from chmc.formats.adapter import Adapter
    from chmc.formats.checkpoint import Checkpoint

    base, adapter = mixed["base"], mixed["experts"]["dora"]
    merged = tmp_path / "merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(merged)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [3, 4, 5, 6, 7, 8]]
    names = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    got = GramFiles([collect_grams(Adapter(adapter, Checkpoint(base)), seqs, tmp_path / "a",
                                   names, progress=False)])
    want = GramFiles([collect_grams(merged, seqs, tmp_path / "m", names, progress=False)])
    plain = GramFiles([collect_grams(base, seqs, tmp_path / "b", names, progress=False)])
    for name in names:
        torch.testing.assert_close(got.grams(name), want.grams(name), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got.grams(name), plain.grams(name), atol=1e-4), name
