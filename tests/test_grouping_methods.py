"""The merge semantics against an independent NumPy reference, and the clusterings' guarantees.

The reference below is written from the issue's text (mergekit semantics), not from the torch
code: it reads the checkpoints with safetensors.numpy and works in float64.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from chmc import build
from chmc.compiler.grouping import (
    MAX_ENUMERATED,
    RowBatch,
    _error_heuristic,
    canonical,
    count_partitions,
    group_rows,
    partition_cost,
    set_partitions,
)
from chmc.formats.artifact import Artifact, read_manifest

TOL = 1e-6  # max abs difference between the fp32 artifact and the float64 reference


def load_np(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64)
            for k, v in load_file(str(folder / "model.safetensors")).items()}


def ref_trim(d: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = max(1, int(density * numel)) entries of largest |d| (first index among
    equals)."""
    if density >= 1:
        return d
    flat = d.reshape(-1)
    k = max(1, int(density * flat.size))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(d.shape)


def ref_merge(method: str, deltas: list[np.ndarray], w: list[float], density: float,
              lam: float) -> np.ndarray:
    """One group's merged delta, straight from the semantics in the issue."""
    wd = [wi * d for wi, d in zip(w, deltas)]
    # sum()'s start value 0 widens its type to ndarray | int; `deltas` is never empty
    if method == "mean":
        return cast(np.ndarray, sum(wd)) / sum(w)
    if method == "task_arithmetic":
        return lam * cast(np.ndarray, sum(wd))
    assert method == "ties"
    trimmed = np.stack([wi * ref_trim(d, density) for wi, d in zip(w, deltas)])
    elected = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected
    num = (trimmed * agree).sum(0)
    den = sum(wi * a for wi, a in zip(w, agree))
    den = np.where(den == 0, 1.0, den)
    return lam * num / den


CASES = [
    ("mean", {"weight": {"expert_0": 2.0, "expert_2": 0.5}}),
    ("task_arithmetic", {"weight": 0.7, "lambda": 0.8}),
    ("ties", {"density": 0.4, "weight": {"expert_1": 1.5}, "lambda": 1.2}),
    ("ties", {"density": 1.0}),
]


@pytest.mark.parametrize(("method", "params"), CASES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_k1_matches_numpy_reference(random_family, tmp_path, method, params):
    base_path, experts = random_family
    out = build(base_path, experts, tmp_path / "art", groups=1, method=method, parameters=params,
                progress=False)
    art = Artifact(out)
    base = load_np(base_path)
    ex = {name: load_np(path) for name, path in experts.items()}
    names = list(experts)
    w_param = params.get("weight", 1.0)
    w = [w_param.get(n, 1.0) if isinstance(w_param, dict) else w_param for n in names]
    checked = 0
    for name, entry in art.manifest.tensors.items():
        if entry.kind != "merged":
            for i, n in enumerate(names):  # stacked tensors are stored exactly
                assert np.array_equal(art.stored(f"{name}.experts")[i].numpy(), ex[n][name])
            continue
        deltas = [ex[n][name] - base[name] for n in names]
        ref = base[name] + ref_merge(method, deltas, w, params.get("density", 1.0),
                                     params.get("lambda", 1.0))
        bank = art.stored(f"{name}.bank").double().numpy()  # [1, out, in]
        assert bank.shape == (1, *ref.shape)
        assert np.abs(bank[0] - ref).max() <= TOL, name
        assert (art.stored(f"{name}.index").numpy() == 0).all()
        checked += 1
    assert checked >= 15  # every projection, the embedding and lm_head


def test_k2_banks_are_group_means_and_singletons_exact(random_family, tmp_path):
    """With labels taken from the index, every bank row is base + its group's weighted mean."""
    base_path, experts = random_family
    w = {"expert_0": 1.0, "expert_1": 3.0, "expert_2": 0.5, "expert_3": 2.0}
    art = Artifact(build(base_path, experts, tmp_path / "art", groups=2, clustering="error",
                         parameters={"weight": w}, progress=False))
    base = load_np(base_path)
    ex = {name: load_np(path) for name, path in experts.items()}
    names = list(experts)
    name = "model.layers.1.mlp.down_proj.weight"
    bank = art.stored(f"{name}.bank").double().numpy()  # [2, out, in]
    index = art.stored(f"{name}.index").numpy()  # [N, out]
    singletons = 0
    for c in range(index.shape[1]):
        for g in set(index[:, c]):
            members = [n for i, n in enumerate(names) if index[i, c] == g]
            if len(members) == 1:
                assert np.array_equal(bank[g, c], ex[members[0]][name][c])  # exact, not rounded
                singletons += 1
                continue
            mean = sum(w[n] * (ex[n][name][c] - base[name][c]) for n in members) / sum(
                w[n] for n in members)
            assert np.abs(bank[g, c] - (base[name][c] + mean)).max() <= TOL
        if len(set(index[:, c])) == 1:  # unused slot: a copy of group 0
            assert np.array_equal(bank[1, c], bank[0, c])
    assert singletons > 0


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_error_clustering_never_worse_than_cosine(random_family, tmp_path, groups):
    base_path, experts = random_family
    totals = {}
    for clustering in ("cosine", "error"):
        m = read_manifest(build(base_path, experts, tmp_path / clustering, groups=groups,
                                clustering=clustering, progress=False)).model_dump()
        merged = [e["stats"] for e in m["tensors"].values() if e["kind"] == "merged"]
        for stats in merged:  # per tensor too, not only in total
            totals.setdefault(clustering, []).append(sum(stats["err_sq"].values()))
    for err, cos in zip(totals["error"], totals["cosine"]):
        assert err <= cos * (1 + 1e-5) + 1e-12
    if groups == 2:
        assert sum(totals["error"]) < sum(totals["cosine"])  # and strictly better somewhere


def brute_force_best(d: np.ndarray, k: int) -> float:
    """Min over all labelings of sum ||d_n - mean of its group||^2 for one row; d [N, in]."""
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(d)):
        cost = sum(((d[np.array(labels) == g] - d[np.array(labels) == g].mean(0)) ** 2).sum()
                   for g in set(labels))
        best = min(best, cost)
    return best


def test_error_clustering_is_optimal_for_small_n():
    gen = torch.Generator().manual_seed(3)
    deltas = torch.randn(5, 16, 6, generator=gen, dtype=torch.float64)  # [N, R, in]
    batch = RowBatch(deltas, torch.ones(5, dtype=torch.float64))
    labels = group_rows("error", batch, 2)
    cost = partition_cost(batch.gram, labels, batch.weights).numpy()
    for r in range(16):
        assert cost[r] == pytest.approx(brute_force_best(deltas[:, r].numpy(), 2), rel=1e-9)


def test_heuristic_above_enumeration_limit_never_worse_than_cosine():
    gen = torch.Generator().manual_seed(5)
    n, k = 10, 3  # 9 842 partitions: the heuristic path
    centers = torch.randn(k + 1, 24, 8, generator=gen)
    deltas = centers[torch.randint(0, k + 1, (n,), generator=gen)] + 0.5 * torch.randn(
        n, 24, 8, generator=gen)  # [N, R, in]: noisy clusters
    batch = RowBatch(deltas, torch.ones(n))
    heuristic = canonical(_error_heuristic(batch, k))
    cosine = group_rows("cosine", batch, k)
    h_cost = partition_cost(batch.gram, heuristic, batch.weights)
    c_cost = partition_cost(batch.gram, cosine, batch.weights)
    assert (h_cost <= c_cost * (1 + 1e-6)).all()
    assert count_partitions(n, k) > MAX_ENUMERATED
    assert int(heuristic.max()) < k and bool((group_rows("error", batch, k) == heuristic).all())


def test_cosine_groups_similar_experts_and_labels_are_canonical():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 32, generator=gen)  # two directions, per row
    deltas = torch.stack([a, 2 * b, 3 * a, 0.5 * b + 0.01 * a])  # experts 0,2 vs 1,3
    labels = group_rows("cosine", RowBatch(deltas, torch.ones(4)), 2)
    assert labels.tolist() == [[0, 1, 0, 1]] * 3
    raw = torch.tensor([[2, 2, 0, 1], [1, 0, 1, 0]])
    assert canonical(raw).tolist() == [[0, 0, 1, 2], [0, 1, 0, 1]]


def test_set_partitions_are_complete_and_canonical():
    parts = set_partitions(4, 2)
    assert len(parts) == 8 and len(set(parts)) == 8
    assert all(p[0] == 0 and max(p) < 2 for p in parts)
    assert len(set_partitions(5, 5)) == 52  # Bell(5)


def test_dare_is_seeded(random_family, tmp_path):
    base_path, experts = random_family
    arts = [Artifact(build(base_path, experts, tmp_path / f"s{seed}-{i}", groups=2,
                           method="dare_ties", parameters={"density": 0.5}, seed=seed,
                           progress=False))
            for i, seed in enumerate((7, 7, 8))]
    name = "model.layers.0.self_attn.q_proj.weight.bank"
    assert torch.equal(arts[0].stored(name), arts[1].stored(name))
    assert not torch.equal(arts[0].stored(name), arts[2].stored(name))


def tied_deltas(layout: str) -> torch.Tensor:
    """[4, 300, 70] deltas with many equal |d| (expert 1: none; expert 3: half exact zeros, so
    at density > 0.5 the cut falls among them), stored [N, out, in] or, as the build stores
    them, [out, N, in]."""
    gen = torch.Generator().manual_seed(11)
    deltas = torch.randint(-40, 41, (4, 300, 70), generator=gen).float() / 64  # many ties
    deltas[1] = torch.randn(300, 70, generator=gen)  # no ties
    deltas[3, :, ::2] = 0
    return deltas if layout == "experts" else deltas.transpose(0, 1).contiguous().transpose(0, 1)


BLOCKS = [(a, min(a + 37, 300)) for a in range(0, 300, 37)]  # several blocks


@pytest.mark.parametrize("layout", ["experts", "rows"])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_trim_keeps_exactly_top_k_with_ties(density, layout):
    """Counted top-k (bucket counts + the flat position of the last tie) equals a stable sort,
    even with many equal |d|."""
    from chmc.compiler.deltas import Deltas
    from chmc.compiler.methods import get_method, trim_top_k

    deltas = tied_deltas(layout)
    densities = {"a": density, "b": density, "c": 1.0, "d": density}
    params = get_method("ties").resolve({"density": densities}, list(densities))
    apply = trim_top_k(Deltas.held(deltas), params, [torch.Generator()] * 4, BLOCKS)
    got = torch.cat([apply(deltas[:, a:b], i) for i, (a, b) in enumerate(BLOCKS)], dim=1).numpy()
    for e, d in enumerate(densities.values()):
        want = ref_trim(deltas[e].double().numpy(), d)
        assert np.array_equal(got[e], want), e
        assert np.count_nonzero(got[e]) <= max(1, int(d * deltas[e].numel()))


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("params", [
    {"density": 0.3, "weight": {"a": 1.5, "c": 0.0}, "lambda": 1.2},
    {"density": {"a": 0.5, "b": 1.0, "c": 0.97, "d": 0.5}, "normalize": False},
    {"density": 1.0},
])
def test_fused_ties_equals_trim_then_sign_consensus(groups, params):
    """The compiled one-pass TIES block (trim, sign election, disjoint merge, merge error) against
    the torch reference it replaces: trim_top_k's apply, sign_consensus and block_error."""
    from chmc.compiler.deltas import Deltas
    from chmc.compiler.merge import block_error, shared_rows
    from chmc.compiler.methods import get_method, sign_consensus, ties_fused, trim_top_k

    deltas = tied_deltas("rows")
    names = ["a", "b", "c", "d"]
    p = get_method("ties").resolve(params, names)
    labels = torch.randint(0, groups, (300, 4), generator=torch.Generator().manual_seed(groups))
    shared = shared_rows(labels, groups)
    apply = trim_top_k(Deltas.held(deltas), p, [torch.Generator()] * 4, BLOCKS)
    for i, (a, b) in enumerate(BLOCKS):
        raw = deltas[:, a:b]
        want = sign_consensus(apply(raw, i), labels[a:b], groups, p)
        want_err = block_error(want, raw, labels[a:b], shared[a:b])
        got_err = torch.zeros(4, dtype=torch.float64)
        got = ties_fused(raw, labels[a:b], groups, p, apply, i, got_err)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_err, want_err, rtol=1e-5, atol=1e-9)


def test_k1_ties_equals_mergekit(random_family, tmp_path):
    """Where mergekit is installed (never a dependency: set MERGEKIT_YAML to its mergekit-yaml,
    e.g. from a separate venv), K=1 TIES equals its TIES merge."""
    import os
    import shutil
    import subprocess

    from safetensors.torch import load_file

    exe = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    if not exe:
        pytest.skip("mergekit-yaml not found (set MERGEKIT_YAML)")
    base, experts = random_family
    w = {"expert_0": 1.0, "expert_1": 0.6, "expert_2": 1.3, "expert_3": 0.9}
    models = "".join(f"  - model: {p}\n    parameters: {{weight: {w[n]}, density: 0.4}}\n"
                     for n, p in experts.items())
    (tmp_path / "mk.yml").write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"
                                     "parameters:\n  normalize: true\ndtype: float32\n")
    subprocess.run([exe, str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                   check=True, capture_output=True, timeout=300)
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    art = Artifact(build(base, experts, tmp_path / "ours", groups=1, method="ties",
                         parameters={"weight": w, "density": 0.4}, progress=False))
    for name, entry in art.manifest.tensors.items():
        if entry.kind == "merged":
            diff = (art.expert_tensor(name, 0) - theirs[name]).abs().max().item()
            assert diff <= TOL, name


@pytest.mark.parametrize("slice_rows", [None, 300])  # held whole, or scanned in slices
@pytest.mark.parametrize("rows", [100, 1000])  # the bucket counted, or guessed from a sample
@pytest.mark.parametrize("spread", [3, 1 << 20, 1 << 30, -1])  # heavy ties .. all distinct
def test_kth_largest_equals_a_full_sort(spread: int, rows: int, slice_rows: int | None) -> None:
    """-1: every 16th row, the sample the bucket is guessed from, is 2^24 patterns above the rest,
    so the guess misses and the count over all rows decides. The counts summed over slices, and
    the last kept tie found across them, equal those of the whole tensor."""
    from chmc.compiler import methods
    from chmc.compiler.deltas import Deltas

    rng = np.random.default_rng(abs(spread))
    bits = rng.integers(0, spread if spread > 0 else 1 << 20, 100_000).astype(np.int32)
    bits = bits.reshape(rows, -1)
    bits[::16] += 1 << 24 if spread < 0 else 0
    bits = bits.reshape(-1)
    signs = np.where(rng.random(bits.size) < 0.5, np.int32(-(1 << 31)), np.int32(0))
    delta = torch.from_numpy((bits | signs).view(np.float32).reshape(1, rows, -1))  # |d| = bits
    deltas = Deltas.held(delta, slice_rows)
    ordered = np.sort(bits)[::-1]
    for k in (1, 2, 777, 50_000, 100_000):
        t = ordered[k - 1]
        greater = int((bits > t).sum())
        assert methods._kth_largest(deltas, {0: k}) == {0: (t, greater, int((bits == t).sum()))}
        nth = k - greater  # the last tie kept is the nth entry equal to t in flat order
        flat = int(np.flatnonzero(bits == t)[nth - 1])
        assert methods._last_ties(deltas, {0: (t, nth)}, methods.serial_map) == {
            0: divmod(flat, delta.shape[2])}


def test_bf16_deltas_in_one_pass_equal_convert_then_subtract() -> None:
    """The compiled bf16 read (compiler/fused.py: the bf16 pattern shifted into a float32's upper
    half, minus the base) is bitwise torch's convert-then-subtract, infinities, NaN, subnormals
    and signed zeros included."""
    from chmc.compiler.deltas import difference

    gen = torch.Generator().manual_seed(5)
    expert = torch.randn(300, 70, generator=gen).bfloat16()
    special = [float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, -0.0, 0.0, 3e38]
    expert.view(-1)[: len(special)] = torch.tensor(special).bfloat16()
    base = torch.randn(300, 70, generator=gen).bfloat16().float()
    out = torch.zeros(300, 3, 70)
    difference(expert, base, out, 1)
    want = (expert.float() - base).view(torch.int32)
    assert torch.equal(out[:, 1].view(torch.int32), want)
    assert not out[:, 0].any() and not out[:, 2].any()  # the other experts' rows untouched
