"""The tiny trained families: deterministic recipes and data, loadable HF folders, the cache, and
(slow, once per session through the conftest fixtures) the accuracy evidence that they are real."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from chmc.errors import ChmcError
from chmc.models.tiny.family import RECIPES, Recipe, family, write_tasks

# A recipe small enough to train in seconds: plumbing only, no accuracy claims.
SMALL = Recipe("small", "distinct", ("add", "rev"), hidden=32, layers=1, heads=2, intermediate=64,
               base_steps=8, expert_steps=8, batch=8, n_train=64, n_validation=16, n_eval=16,
               check_every=4)


def test_recipe_hash_is_stable_and_sensitive() -> None:
    assert (Recipe(**dataclasses.asdict(RECIPES["distinct"])).digest()
            == RECIPES["distinct"].digest())
    assert dataclasses.replace(RECIPES["distinct"], seed=1).digest() != RECIPES["distinct"].digest()
    assert len({r.digest() for r in RECIPES.values()}) == len(RECIPES)
    assert len(RECIPES["distinct8"].tasks) == 8


def test_task_data_is_deterministic_and_held_out(tmp_path: Path) -> None:
    recipe = RECIPES["conflict"]
    write_tasks(recipe, tmp_path / "a")
    write_tasks(recipe, tmp_path / "b")
    for task in recipe.tasks:
        for split in ("train", "validation", "eval"):
            a = (tmp_path / "a" / "tasks" / task / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / "tasks" / task / f"{split}.jsonl").read_bytes()
        rows = {s: [json.loads(x) for x in (tmp_path / "a" / "tasks" / task / f"{s}.jsonl")
                    .read_text().splitlines()] for s in ("train", "validation", "eval")}
        prompts = {s: {r["prompt"] for r in rs} for s, rs in rows.items()}
        assert len(rows["eval"]) >= 200 and len(prompts["eval"]) == len(rows["eval"])
        assert (not prompts["eval"] & prompts["train"]
                and not prompts["validation"] & prompts["train"])
        assert not prompts["eval"] & prompts["validation"]
    # conflict: one prompt format, different answers for the same prompt
    first = {t: json.loads((tmp_path / "a/tasks" / t / "eval.jsonl").read_text().splitlines()[0])
             for t in recipe.tasks}
    assert {r["prompt"][-1] for r in first.values()} == {">"}


def test_small_family_builds_loads_and_is_cached(tmp_path: Path, monkeypatch) -> None:
    import tokenizers
    import transformers

    monkeypatch.setenv("CHMC_CACHE", str(tmp_path / "cache"))
    fam = family(SMALL, progress=False)
    assert fam.path == tmp_path / "cache" / "families" / f"small-{SMALL.digest()}"
    assert set(fam.experts) == {"add", "rev"} and fam.tasks["rev"]["eval"].is_file()
    for folder in [fam.base, *fam.experts.values()]:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert (folder / "model.safetensors").is_file()
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        for line in (fam.tasks["add"]["eval"].read_text().splitlines()[:5]
                     + ['{"prompt": "rev:a z>"}']):
            prompt = json.loads(line)["prompt"]
            assert raw.encode(prompt).ids == auto(prompt).input_ids
            assert len(raw.encode(prompt).ids) == len(prompt)  # one token per character
        assert model.generation_config.eos_token_id == auto.eos_token_id is not None
    stamp = (fam.base / "model.safetensors").stat().st_mtime_ns
    again = family(SMALL, progress=False)  # from the cache: nothing retrained or rewritten
    assert again.info == fam.info and (again.base / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ChmcError, match="holds family recipe"):
        family(dataclasses.replace(SMALL, seed=3), fam.path, progress=False)


def own_task_matrix(fam) -> dict[str, dict[str, float]]:
    """Exact match of every expert (rows) on every task's eval split (columns)."""
    from chmc.runtime.evaluate import evaluate

    tasks = {t: files["eval"] for t, files in fam.tasks.items()}
    return {e: {r["task"]: r["exact_match"] for r in evaluate(p, tasks, progress=False)["results"]}
            for e, p in fam.experts.items()}


def test_trust_region_bounds_every_matrix() -> None:
    """Recipe.max_delta: at a rate that moves the small model's matrices far (the same seed
    without an anchor goes past 3x the bound), each 2-D tensor ends within max_delta of the
    base's norm, projected onto that sphere rather than reset."""
    import torch

    from chmc.models.tiny.family import delta_stats, new_model, train
    from chmc.models.tiny.tasks import ALL_TASKS, make_splits

    torch.manual_seed(0)
    bound = 0.05
    recipe = dataclasses.replace(SMALL, max_delta=bound, lr=5e-2)
    rows = make_splits(ALL_TASKS["distinct"]["add"], 0, {"train": 64})["train"]
    model = new_model(recipe)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    moved = []
    for anchor in (base, None):
        model.load_state_dict(base)
        train(model, rows, recipe, 12, seed=1, desc="t", progress=False, anchor=anchor)
        moved.append(delta_stats(base, model.state_dict()))
    bounded, free = moved
    assert free["max"] > 3 * bound, free  # the rate alone would leave the region
    assert bounded["max"] <= bound * (1 + 1e-5), bounded
    assert bounded["median"] >= 0.9 * bound  # projected onto the sphere, not zeroed


@pytest.mark.slow
def test_distinct_experts_master_their_task(distinct_family) -> None:
    matrix = own_task_matrix(distinct_family)
    for expert, row in matrix.items():
        assert row[expert] >= 0.95, (expert, row)


@pytest.mark.slow
def test_conflict_experts_master_their_task_and_fail_the_others(conflict_family) -> None:
    matrix = own_task_matrix(conflict_family)
    for expert, row in matrix.items():
        assert row[expert] >= 0.95, (expert, row)
        for task, acc in row.items():
            if task != expert:
                assert acc <= 0.40, (expert, task, row)


@pytest.mark.slow
def test_finetune_regime_experts_stay_near_their_base_and_master_their_task() -> None:
    """distinct-ft: every 2-D tensor of every expert, read from the files written, is within
    10% of the base's norm (median at least 1%), each expert masters its own task, and the base
    alone is clearly worse on them (else merging would have nothing to keep)."""
    from safetensors.torch import load_file

    from chmc.models.tiny.family import delta_stats, family

    fam = family("distinct-ft", progress=False)  # cached under $CHMC_CACHE: minutes once
    base = load_file(fam.base / "model.safetensors")
    for task, folder in fam.experts.items():
        stats = delta_stats(base, load_file(folder / "model.safetensors"))
        assert stats["max"] <= 0.10 and stats["median"] >= 0.01, (task, stats)
        assert len(stats["per_tensor"]) == 2 + 7 * fam.recipe.layers  # embed, lm_head, layers
    matrix = own_task_matrix(fam)
    for expert, row in matrix.items():
        assert row[expert] >= 0.95, (expert, row)
    from chmc.runtime.evaluate import evaluate

    tasks = {t: files["eval"] for t, files in fam.tasks.items()}
    results = evaluate(fam.base, tasks, progress=False)["results"]
    base = {r["task"]: r["exact_match"] for r in results}
    experts_mean = sum(matrix[t][t] for t in tasks) / len(tasks)
    assert sum(base.values()) / len(base) <= experts_mean - 0.1, (base, experts_mean)
