"""`chmc build` end to end: exact reconstruction at K=N, extraction to transformers, tied
embeddings, mergekit YAML configs, and the manifest/inspect output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chmc import build
from chmc.compiler.extract import extract
from chmc.formats.artifact import Artifact, read_manifest
from chmc.formats.checkpoint import Checkpoint

METHODS = ["mean", "task_arithmetic", "ties", "dare_ties", "dare_linear"]
TINY = {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 32, "vocab": 40}


@pytest.fixture(scope="module")
def half_families(tmp_path_factory):
    """fp16 and bf16 families of 3 experts; the bf16 one has tied embeddings."""
    from chmc.models.tiny.random_family import make_random_family

    root = tmp_path_factory.mktemp("half_families")
    return {
        "float16": make_random_family(root / "f16", 3, dtype="float16", seed=1, **TINY),
        "bfloat16": make_random_family(root / "bf16", 3, dtype="bfloat16", seed=2,
                                       tie_word_embeddings=True, **TINY),
    }


def assert_exact(art: Artifact, experts: dict[str, Path]) -> None:
    """Every expert's every tensor comes back bitwise equal, in its source dtype."""
    for name, path in experts.items():
        ckpt = Checkpoint(path)
        rebuilt = dict(art.expert_state_dict(name))
        assert set(rebuilt) == set(ckpt.tensors)
        for tname, tensor in rebuilt.items():
            original = ckpt.tensor(tname)
            assert tensor.dtype == original.dtype, tname
            assert torch.equal(tensor, original), f"{name}: {tname}"


@pytest.mark.parametrize("method", METHODS)
def test_k_equals_n_is_exact_fp32(random_family, tmp_path, method):
    base, experts = random_family
    art = Artifact(build(base, experts, tmp_path / "art", groups=len(experts), method=method,
                         parameters=({"density": 0.3}
                                     if method != "mean" and method != "task_arithmetic"
                                     else None), progress=False))
    assert_exact(art, experts)
    assert all(e.rel_error == 0 for e in art.manifest.experts)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_k_equals_n_is_exact_half(half_families, tmp_path, dtype, method):
    base, experts = half_families[dtype]
    params = {"weight": 0.3, "lambda": 2.0} if method == "task_arithmetic" else None
    art = Artifact(build(base, experts, tmp_path / "art", groups=3, method=method,
                         clustering="error", parameters=params, progress=False))
    assert_exact(art, experts)


def test_manifest_layout_and_accounting(random_family, tmp_path):
    base, experts = random_family
    art = Artifact(build(base, experts, tmp_path / "art", groups=2, method="ties",
                         parameters={"density": 0.5}, progress=False))
    m = art.manifest.model_dump()
    n, k = len(experts), 2
    assert [e["name"] for e in m["experts"]] == list(experts)
    assert all(len(e["sha256"]) == 64 for e in m["experts"])
    assert (m["groups"], m["clustering"], m["method"]) == (k, "cosine", "ties")
    assert m["parameters"]["density"] == dict.fromkeys(experts, 0.5)
    base_params = sum(i.numel for i in Checkpoint(base).tensors.values())
    merged = stacked = 0
    for name, entry in m["tensors"].items():
        shape = tuple(entry["shape"])
        if entry["kind"] == "merged":
            assert tuple(art.stored(f"{name}.bank").shape) == (k, *shape)
            assert art.stored(f"{name}.index").dtype == torch.uint8
            assert tuple(art.stored(f"{name}.index").shape) == (n, shape[0])
            merged += k * shape[0] * shape[1]
        else:
            assert tuple(art.stored(f"{name}.experts").shape) == (n, *shape)
            stacked += n * torch.Size(shape).numel()
    acc = m["accounting"]
    assert acc == {**acc, "base": base_params, "ensemble": n * base_params,
                   "artifact": merged + stacked}
    assert acc["ratio"] == pytest.approx((merged + stacked) / (n * base_params))
    assert 0.45 < acc["ratio"] < 0.6  # K/N = 0.5 plus the per-expert norms
    for path in ("config.json", "generation_config.json"):
        assert (art.path / path).read_text() == (base / path).read_text()
    assert not list(tmp_path.glob(".art*"))  # no staging folder left


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["fp32", "bf16-tied"])
def test_extract_loads_in_transformers(random_family, half_families, tmp_path, family):
    import transformers

    base, experts = random_family if family == "fp32" else half_families["bfloat16"]
    art_path = build(base, experts, tmp_path / "art", groups=2, method="ties",
                     parameters={"density": 0.7}, progress=False)
    name = list(experts)[1]
    out = extract(art_path, name, tmp_path / "extracted")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # the base model, loaded the same way, with the reconstructed tensors copied in directly
    config = transformers.AutoConfig.from_pretrained(art_path)
    direct = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    missing, unexpected = direct.load_state_dict(dict(Artifact(art_path).expert_state_dict(name)),
                                                 strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    direct.tie_weights()
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(loaded, ids), logits_of(direct, ids))
    if family == "bf16-tied":
        assert "lm_head.weight" not in Artifact(art_path).manifest.tensors
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # and at K = N the extracted expert gives exactly the original expert's logits
    exact = extract(build(base, experts, tmp_path / "artN", groups=len(experts), progress=False),
                    name, tmp_path / "exactN")
    original = transformers.AutoModelForCausalLM.from_pretrained(experts[name]).eval()
    again = transformers.AutoModelForCausalLM.from_pretrained(exact).eval()
    assert torch.equal(logits_of(again, ids), logits_of(original, ids))


def test_mergekit_yaml_equals_python_api(random_family, tmp_path, chmc_cli):
    base, experts = random_family
    names = list(experts)
    models = "\n".join(f"  - model: {experts[n]}\n"
                       f"    parameters: {{weight: {0.5 + i}, density: 0.6}}"
                       for i, n in enumerate(names))
    (tmp_path / "merge.yml").write_text(
        f"base_model: {base}\nmodels:\n  - model: {base}\n{models}\nmerge_method: ties\n"
        "parameters:\n  lambda: 0.9\n  int8_mask: true\ndtype: float32\ngroups: 2\n"
        "clustering: error\n")
    r = chmc_cli("build", "--config", "merge.yml", "--out", "from_yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    params = {"weight": {n: 0.5 + i for i, n in enumerate(names)}, "density": 0.6, "lambda": 0.9}
    api = Artifact(build(base, experts, tmp_path / "from_api", groups=2, clustering="error",
                         method="ties", parameters=params, progress=False))
    cli = Artifact(tmp_path / "from_yaml")
    assert cli.experts == names  # named after each model path's last component
    assert cli.manifest.parameters == api.manifest.parameters
    for stored in api.manifest.weight_map:
        assert torch.equal(cli.stored(stored), api.stored(stored)), stored


def test_cli_build_inspect_and_force(random_family, tmp_path, chmc_cli):
    base, experts = random_family
    pairs = [f"{n.replace('expert_', 'e')}={p}" for n, p in experts.items()]
    args = ["build", "--base", base, "--experts", *pairs[:3], "--experts", pairs[3],
            "--groups", "2", "--method", "linear", "--weight", "e0=2", "--out", "art"]
    r = chmc_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "art").model_dump()
    assert [e["name"] for e in m["experts"]] == ["e0", "e1", "e2", "e3"]
    assert m["method"] == "mean" and m["parameters"]["weight"]["e0"] == 2.0
    r = chmc_cli(*args, cwd=tmp_path)
    assert r.returncode == 1 and "exists" in r.stderr
    r = chmc_cli(*args[:-4], "--groups", "3", "--out", "art", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "art").model_dump()["groups"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    r = chmc_cli("inspect", "art", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ratio = json.loads((tmp_path / "art" / "chmc.json").read_text())["accounting"]["ratio"]
    assert f"{ratio:.3f}" in r.stdout and all(f"e{i}" in r.stdout for i in range(4))
    errors = [e["rel_error"] for e in read_manifest(tmp_path / "art").model_dump()["experts"]]
    assert all(f"{e:.4f}" in r.stdout for e in errors) and all(0 < e < 1 for e in errors)


def test_pytorch_bin_expert_merges_like_safetensors(random_family, tmp_path):
    """An expert saved as pytorch_model.bin (read with weights_only=True) gives the same banks."""
    import shutil

    from safetensors.torch import load_file

    base, experts = random_family
    binned = Path(shutil.copytree(experts["expert_1"], tmp_path / "bin_expert"))
    torch.save(load_file(str(binned / "model.safetensors")), binned / "pytorch_model.bin")
    (binned / "model.safetensors").unlink()
    params = {"density": 0.5}
    a = Artifact(build(base, {**experts, "expert_1": binned}, tmp_path / "a", groups=2,
                       method="ties", parameters=params, progress=False))
    b = Artifact(build(base, experts, tmp_path / "b", groups=2, method="ties", parameters=params,
                       progress=False))
    assert a.manifest.weight_map == b.manifest.weight_map
    for stored in b.manifest.weight_map:
        assert torch.equal(a.stored(stored), b.stored(stored)), stored


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_threads_row_blocks_and_slices_do_not_change_the_artifact(tmp_path, monkeypatch,
                                                                  method):
    """Worker threads, row blocks and slices only schedule the work: the fp16 artifact is bitwise
    the same with 1 thread and whole tensors as with 2 threads, 5-row blocks and tensors read in
    slices of 7 rows (so blocks end at slice ends too). Deltas of a few fp16 steps make many |d|
    equal, so TIES' last kept tie falls inside a block, and slice, with others after it."""
    from chmc.compiler import deltas
    from chmc.models.tiny.random_family import make_random_family

    base, experts = make_random_family(tmp_path / "family", 3, dtype="float16", seed=1,
                                       delta_scale=0.001, **TINY)
    arts = []
    rows = 3 * TINY["hidden"]  # a [*, hidden] tensor's values per row of 3 experts
    for threads, chunk, piece in (("1", 1 << 30, 1 << 40), ("2", 5 * rows, 7 * rows)):
        monkeypatch.setenv("CHMC_THREADS", threads)
        monkeypatch.setattr(deltas, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(deltas, "SLICE_ELEMENTS", piece)
        arts.append(Artifact(build(base, experts, tmp_path / threads, groups=2, method=method,
                                   parameters={"density": 0.3}, progress=False)))
    assert arts[0].manifest.weight_map.keys() == arts[1].manifest.weight_map.keys()
    for stored in arts[0].manifest.weight_map:
        assert torch.equal(arts[0].stored(stored), arts[1].stored(stored)), stored
