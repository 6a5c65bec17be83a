"""Activation-aware merging (calibration Grams, output-error clustering, regmean) and K per tensor
under a memory budget, checked against independent NumPy/transformers computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 64  # the random family's vocabulary


@pytest.fixture(scope="module")
def calibration(random_family, tmp_path_factory) -> dict[str, Path]:
    """Per expert, 24 random-token prompts (JSONL input_ids), different for every expert."""
    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    files = {}
    for name in random_family[1]:
        rows = [{"input_ids": rng.integers(0, VOCAB, int(rng.integers(5, 12))).tolist()}
                for _ in range(24)]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


@pytest.fixture(scope="module")
def budget_artifact(random_family, calibration, tmp_path_factory) -> Path:
    from chmc import build

    base, experts = random_family
    return build(base, experts, tmp_path_factory.mktemp("budget") / "art", groups=4,
                 clustering="output-error", method="regmean", calibration=calibration,
                 budget=0.5, progress=False)


def test_grams_equal_the_layer_inputs_computed_directly(random_family, calibration, tmp_path):
    """C = X^T X / tokens of q_proj's input (= k_proj's, stored once as an alias)."""
    from chmc.compiler.calibration import collect_grams, read_sequences
    from chmc.compiler.grams import GramFiles

    path = random_family[1]["expert_0"]
    seqs = read_sequences(calibration["expert_0"], path)
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.1.mlp.down_proj.weight"}
    file = collect_grams(path, seqs, tmp_path / "g", names, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    xs = []
    with torch.no_grad():
        for s in seqs:
            h = model.model.embed_tokens(torch.tensor([s]))
            xs.append(model.model.layers[0].input_layernorm(h)[0].double())
    x = torch.cat(xs)  # [tokens, hidden]
    want = (x.T @ x / len(x)).float()
    grams = GramFiles([file])
    for name in ("model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight"):
        got = grams.grams(name)
        assert got is not None
        torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-6)
    assert grams.index[0]["model.layers.0.self_attn.k_proj.weight"] == \
        grams.index[0]["model.layers.0.self_attn.q_proj.weight"]  # one Gram, stored once
    assert grams.grams("model.embed_tokens.weight") is None  # no Linear input: identity


def test_layerwise_grams_equal_full_forward_hooks(random_family, calibration, tmp_path):
    """Every Linear's Gram (layer-by-layer collection) equals forward hooks on the whole model."""
    from chmc.compiler.calibration import collect_grams, read_sequences
    from chmc.compiler.grams import GramFiles

    path = random_family[1]["expert_2"]
    seqs = read_sequences(calibration["expert_2"], path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
            for name, m in linears.items()}

    def hook(name):
        def add(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.T @ x
        return add

    for name, m in linears.items():
        m.register_forward_hook(hook(name))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    tokens = sum(len(s) for s in seqs)
    grams = GramFiles([collect_grams(path, seqs, tmp_path / "g", set(linears), progress=False)])
    assert len(linears) == 15  # 2 layers x 7 + lm_head
    for name in linears:
        got = grams.grams(name)
        assert got is not None, name
        torch.testing.assert_close(got[0], (sums[name] / tokens).float(), rtol=1e-4, atol=1e-6)


def _set_partitions(items: list[int]):
    """All set partitions, independently of chmc.compiler.grouping."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def test_output_error_grouping_is_optimal_and_regmean_solves_each_group():
    """Per row: chosen partition's output error equals the brute-force minimum over <= K groups,
    and each merged row is np.linalg.solve(sum C, sum C d)."""
    from chmc.compiler.grouping import RowBatch, group_rows
    from chmc.compiler.methods import get_method
    from chmc.compiler.regmean import GramSolver

    rng = np.random.default_rng(1)
    n, rows, width, k, damp = 4, 6, 5, 2, 0.01
    deltas = rng.normal(size=(n, rows, width)).astype(np.float32)
    x = rng.normal(size=(n, 40, width)) * rng.uniform(0.2, 3, size=(n, 1, width))
    grams = np.einsum("nti,ntj->nij", x, x) / 40
    damped = grams + damp * np.einsum("nii->n", grams)[:, None, None] / width * np.eye(width)
    solver = GramSolver(torch.tensor(grams, dtype=torch.float32), n, damp)
    batch = RowBatch(torch.tensor(deltas), torch.ones(n), calib=solver)
    labels = group_rows("output-error", batch, k).numpy()
    method = get_method("regmean")
    merged = method.combine(batch.deltas, torch.tensor(labels), k, method.resolve({}, list("abcd")),
                            calib=solver).numpy()

    def merge(group, r):
        return np.linalg.solve(damped[group].sum(0), sum(damped[m] @ deltas[m, r] for m in group))

    def cost(partition, r):
        return sum((merge(g, r) - deltas[m, r]) @ damped[m] @ (merge(g, r) - deltas[m, r])
                   for g in partition for m in g)

    for r in range(rows):
        best = min(cost(p, r) for p in _set_partitions(list(range(n))) if len(p) <= k)
        chosen = [[m for m in range(n) if labels[r, m] == g] for g in set(labels[r])]
        assert len(chosen) <= k
        assert cost(chosen, r) == pytest.approx(best, rel=1e-4)
        for members in chosen:
            np.testing.assert_allclose(merged[labels[r, members[0]], r], merge(members, r),
                                       rtol=1e-3, atol=1e-4)


def test_k1_regmean_with_identical_statistics_is_the_mean(random_family, calibration, tmp_path):
    """Same Gram file for every expert: (N C)^-1 C sum d = mean d, for every tensor."""
    from chmc import build
    from chmc.compiler.calibration import collect_grams, read_sequences
    from chmc.formats.artifact import Artifact
    from chmc.formats.checkpoint import Checkpoint

    base, experts = random_family
    names = {n for n, i in Checkpoint(base).tensors.items() if len(i.shape) == 2}
    grams = collect_grams(experts["expert_0"], read_sequences(calibration["expert_0"], base),
                          tmp_path / "same", names, progress=False)
    # the identity, at a damping whose condition number the fp32 solves meet within 2e-6
    reg = Artifact(build(base, experts, tmp_path / "reg", groups=1, method="regmean",
                         calibration=dict.fromkeys(experts, grams), progress=False,
                         parameters={"damping": 0.01}))
    mean = Artifact(build(base, experts, tmp_path / "mean", groups=1, method="mean",
                          progress=False))
    banks = [n for n, e in reg.manifest.tensors.items() if e.kind == "merged"]
    assert len(banks) == 16  # 2 layers x 7 Linears, the embedding (identity: the mean), lm_head
    for name in banks:
        torch.testing.assert_close(reg.stored(f"{name}.bank"), mean.stored(f"{name}.bank"),
                                   rtol=1e-4, atol=2e-6)


def test_kn_calibrated_build_reconstructs_every_expert_exactly(random_family, calibration,
                                                               tmp_path):
    from chmc import build
    from chmc.formats.artifact import Artifact

    base, experts = random_family
    art = Artifact(build(base, experts, tmp_path / "kn", groups=4, clustering="output-error",
                         method="regmean", calibration=calibration, progress=False))
    for name, path in experts.items():
        want = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
        for tname, tensor in art.expert_state_dict(name):
            assert torch.equal(tensor, want[tname]), (name, tname)


@pytest.mark.parametrize("clustering", ["cosine", "error"])
def test_weight_space_clusterings_with_regmean(random_family, calibration, tmp_path, clustering):
    """regmean has no merge weights; the weight-space clusterings then weigh experts alike."""
    from chmc import build
    from chmc.formats.artifact import read_manifest

    base, experts = random_family
    art = build(base, experts, tmp_path / "a", groups=2, clustering=clustering, method="regmean",
                calibration=calibration, progress=False)
    assert read_manifest(art).method == "regmean"


def test_output_error_beats_weight_space_grouping_on_calibration_outputs(random_family,
                                                                         calibration, tmp_path):
    """What the issue asks the merge to preserve: each expert's Linear outputs on its own inputs."""
    from chmc import build
    from chmc.compiler.grams import GramFiles
    from chmc.formats.artifact import Artifact

    base, experts = random_family
    a = Artifact(build(base, experts, tmp_path / "oe", groups=2, clustering="output-error",
                       method="regmean", calibration=calibration, progress=False))
    w = Artifact(build(base, experts, tmp_path / "w", groups=2, clustering="error", progress=False))
    folder = tmp_path / "grams"
    folder.mkdir()
    from chmc.compiler.calibration import collect_grams, read_sequences

    files = [collect_grams(experts[n], read_sequences(calibration[n], experts[n]),
                           folder / n, set(a.manifest.tensors), progress=False)
             for n in experts]
    grams = GramFiles(files)
    errs = {"oe": 0.0, "w": 0.0}
    for i, (name, path) in enumerate(experts.items()):
        true = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
        for tag, art in (("oe", a), ("w", w)):
            for tname, tensor in art.expert_state_dict(name):
                g = grams.grams(tname)
                if g is None or tensor.dim() != 2:
                    continue
                d = (tensor - true[tname]).double()
                errs[tag] += float(torch.einsum("ri,ij,rj->", d, g[i].double(), d))
    assert errs["oe"] < 0.9 * errs["w"], errs


def test_choose_groups_greedy_by_error_per_parameter():
    from chmc.compiler.budget import choose_groups

    curves = {"a": [1.0, 0.1, 0.05], "b": [1.0, 0.9, 0.0], "c": [0.5, 0.5, 0.5]}
    sizes = {"a": 10, "b": 10, "c": 5}
    # fixed 100 + K=1 everywhere 25 = 125. Limit 145: a 1->2 (0.09 per param) beats b's jump to 3
    # (0.05); with 10 left, b 1->2 (0.01) beats a 2->3 (0.005). Limit 165: after a 1->2, b's jump
    # to 3 (0.05) fits and wins, then a 2->3. c never gains, so it stays at 1.
    assert choose_groups(curves, sizes, 100, 145, 3) == {"a": 2, "b": 2, "c": 1}
    assert choose_groups(curves, sizes, 100, 165, 3) == {"a": 3, "b": 3, "c": 1}


def test_budget_gives_each_tensor_its_own_k_within_the_budget(budget_artifact):
    from chmc.formats.artifact import Artifact, read_manifest

    manifest = read_manifest(budget_artifact)
    ks = {n: e.groups for n, e in manifest.tensors.items() if e.kind == "merged"}
    assert manifest.accounting.ratio <= 0.5
    assert len(set(ks.values())) > 1, ks  # not one K for all
    assert manifest.groups == max(ks.values()) and manifest.budget.fraction == 0.5
    art = Artifact(budget_artifact)
    for name, k in ks.items():
        assert art.stored(f"{name}.bank").shape[0] == k
        assert int(art.stored(f"{name}.index").max()) < k
    # greedy leaves no room for any further step: the cheapest one would overflow the budget
    ens = manifest.accounting.ensemble
    cheapest = min(e.shape[0] * e.shape[1] for n, e in manifest.tensors.items()
                   if e.kind == "merged" and ks[n] < 4)
    assert (manifest.accounting.artifact + cheapest) / ens > 0.5


def _parameters_on_disk(folder: Path, skip_index: bool = False) -> int:
    """Elements of every tensor in a folder's safetensors files, from their headers alone."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "np") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()  # noqa: SIM118
                         if not (skip_index and k.endswith(".index")))
    return total


@pytest.mark.parametrize("fraction", [0.3, 0.375, 0.5])
def test_budget_never_exceeds_its_fraction_counted_from_the_files(random_family, calibration,
                                                                  tmp_path, fraction):
    """Weight-space and calibrated budget artifacts: the parameters stored in the files written
    (every tensor but the uint8 index tables, which are counted in bytes apart) are at most the
    fraction of N copies of the base's, as the base's own files count them."""
    from chmc import build
    from chmc.formats.artifact import read_manifest

    base, experts = random_family
    ensemble = len(experts) * _parameters_on_disk(base)
    for tag, args in (("weights", {}), ("calibrated", {
            "clustering": "output-error", "method": "regmean", "calibration": calibration})):
        art = build(base, experts, tmp_path / tag, groups=len(experts), budget=fraction,
                    progress=False, **args)
        stored = _parameters_on_disk(art, skip_index=True)
        assert stored <= fraction * ensemble, (tag, stored / ensemble)
        assert stored / ensemble > fraction - 0.1, (tag, stored / ensemble)  # the budget was used
        manifest = read_manifest(art)
        assert (manifest.accounting.artifact, manifest.accounting.ensemble) == (stored, ensemble)


@pytest.mark.parametrize("linear", ["gather", "select"])
def test_budget_artifact_exports_to_onnx_matching_reconstructed_experts(budget_artifact, tmp_path,
                                                                        linear, ort_session):
    """Per-tensor K flows through the export: ORT logits == transformers rebuilt expert, fp32."""
    pytest.importorskip("onnxruntime")
    from chmc.compiler.export import export
    from chmc.runtime.torch_backend import reconstruct

    folder = export(budget_artifact, tmp_path / "onnx", linear=linear)
    session = ort_session(folder / "model.onnx")
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 7))
    for n in range(4):
        with torch.no_grad():
            ref = reconstruct(budget_artifact, n)(torch.from_numpy(ids)).logits.numpy()
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(7)[None], "expert_id": np.array([n])}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        got = session.run(["logits"], feed)[0]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("args,message", [
    (["--method", "regmean", "-k", "1"], "method 'regmean' needs calibration prompts"),
    (["--clustering", "output-error", "-k", "1"], "clustering 'output-error' needs calibration"),
    (["--calibration", "nobody=x.jsonl", "-k", "1"], "--calibration names unknown expert 'nobody'"),
    (["--calibration", "expert_0=missing.jsonl", "--calibration", "expert_1=missing.jsonl",
      "-k", "1"], "expected an existing .jsonl prompt file"),
    (["--budget", "0.2"], "--budget 0.2 is below the smallest artifact"),
    (["--budget", "1.5"], "--budget must be a fraction of the ensemble in (0, 1], got 1.5"),
])
def test_bad_calibration_and_budget_input(random_family, chmc_cli, tmp_path, args, message):
    base, experts = random_family
    two = [f"{n}={experts[n]}" for n in ("expert_0", "expert_1")]
    result = chmc_cli("build", "--base", base, "--experts", *two, *args, "--out", tmp_path / "o",
                      cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_triton_repository_configs_do_not_depend_on_k(random_family, budget_artifact, tmp_path):
    """A budget artifact (K per tensor) and a uniform K=2 one give identical Triton configs."""
    pytest.importorskip("onnxruntime")
    from chmc import build
    from chmc.compiler.export import export
    from chmc.compiler.triton_repo import write_triton_repo

    base, experts = random_family
    uniform = build(base, experts, tmp_path / "k2", groups=2, progress=False)
    configs = []
    for tag, art in (("budget", budget_artifact), ("k2", uniform)):
        repo = write_triton_repo(export(art, tmp_path / f"{tag}_onnx"), tmp_path / f"{tag}_repo")
        configs.append({p.relative_to(repo).as_posix(): p.read_text()
                        for p in sorted(Path(repo).rglob("config.pbtxt"))})
    assert len(configs[0]) == 2 and configs[0] == configs[1]


def test_output_error_heuristic_above_the_exhaustive_limit():
    """N = 9 > MAX_SUBSET_EXPERTS: valid partitions into <= K groups, the same labels on every
    run, and per row an output error no worse than the cosine grouping's (rel 1e-5: fp32 sums)."""
    from chmc.compiler.grouping import RowBatch, group_rows
    from chmc.compiler.regmean import MAX_SUBSET_EXPERTS, GramSolver

    rng = np.random.default_rng(7)
    n, rows, width, k = MAX_SUBSET_EXPERTS + 1, 24, 6, 3
    centers = rng.normal(size=(k + 1, rows, width))
    deltas = centers[rng.integers(0, k + 1, n)] + 0.5 * rng.normal(size=(n, rows, width))
    x = rng.normal(size=(n, 50, width)) * rng.uniform(0.2, 3, size=(n, 1, width))
    grams = torch.tensor(np.einsum("nti,ntj->nij", x, x) / 50, dtype=torch.float32)

    def batch() -> RowBatch:  # a fresh solver each time: no cache shared between the runs
        return RowBatch(torch.tensor(deltas, dtype=torch.float32), torch.ones(n),
                        calib=GramSolver(grams, n, 0.01))

    labels = group_rows("output-error", batch(), k)
    assert labels.shape == (rows, n) and int(labels.min()) == 0 and int(labels.max()) < k
    assert bool((labels[:, 0] == 0).all())  # canonical
    assert torch.equal(group_rows("output-error", batch(), k), labels)
    cosine = group_rows("cosine", batch(), k)
    b = batch()
    assert b.calib is not None
    heuristic_err = b.calib.partition_error(b, labels).double()
    cosine_err = b.calib.partition_error(b, cosine).double()
    assert (heuristic_err <= cosine_err * (1 + 1e-5)).all()
    assert float(heuristic_err.sum()) < 0.95 * float(cosine_err.sum())  # it does improve
    g = grams.double().numpy()
    damped = g + 0.01 * np.einsum("nii->n", g)[:, None, None] / width * np.eye(width)
    for r in range(rows):  # partition_error itself, against NumPy solves of each group
        want = 0.0
        for grp in set(labels[r].tolist()):
            m = np.flatnonzero(labels[r].numpy() == grp)
            merged = np.linalg.solve(damped[m].sum(0), sum(damped[i] @ deltas[i, r] for i in m))
            want += sum((merged - deltas[i, r]) @ damped[i] @ (merged - deltas[i, r]) for i in m)
        assert float(heuristic_err[r]) == pytest.approx(want, rel=1e-4)


def test_budget_above_the_exhaustive_limit(tmp_path):
    """Nine experts (past the 8 whose partitions are enumerated): the budget scores each K with
    the output-error heuristic, stays within the budget and reconstructs experts from banks."""
    from chmc import build
    from chmc.compiler.regmean import MAX_SUBSET_EXPERTS
    from chmc.formats.artifact import Artifact, read_manifest
    from chmc.models.tiny.random_family import make_random_family

    base, experts = make_random_family(tmp_path / "family", n_experts=MAX_SUBSET_EXPERTS + 1,
                                       layers=1, hidden=16, intermediate=32, seed=3)
    path = build(base, experts, tmp_path / "art", groups=len(experts), budget=0.4, progress=False)
    manifest = read_manifest(path)
    ks = {n: e.groups for n, e in manifest.tensors.items() if e.kind == "merged"}
    assert manifest.accounting.ratio <= 0.4
    assert 1 < max(ks.values()) <= len(experts), ks  # the budget bought more than K=1 somewhere
    curves = manifest.budget.curves
    assert all(len(c) == len(experts) and c[-1] <= 1e-6 for c in curves.values())  # K=N exact
    art = Artifact(path)
    for name, k in ks.items():
        assert int(art.stored(f"{name}.index").max()) < k == art.stored(f"{name}.bank").shape[0]
