"""The task router: training, held-out scores, storage in an artifact, and its reference routing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from chmc.compiler.router import RouterConfig, add_router, train_router
from chmc.errors import ChmcError
from chmc.formats.artifact import write_manifest
from chmc.models.router import Router, route
from chmc.models.tiny.tasks import CONFLICT_TASKS, DISTINCT_TASKS, make_splits, write_jsonl
from chmc.models.tiny.tokenizer import build_tokenizer, encode

TASKS = ("add", "rev", "sort", "shift")


def _prompt_files(folder: Path, tasks: dict, names: tuple[str, ...] = TASKS) -> dict[str, Path]:
    files = {}
    for name in names:
        rows = make_splits(tasks[name], seed=7, sizes={"train": 150})["train"]
        files[name] = folder / f"{name}.jsonl"
        write_jsonl(rows, files[name])
    return files


@pytest.fixture()
def tokenizer_file(tmp_path: Path) -> Path:
    file = tmp_path / "tokenizer.json"
    build_tokenizer().save(str(file))
    return file


def test_router_separates_distinct_prompt_formats(tmp_path: Path, tokenizer_file: Path) -> None:
    data = _prompt_files(tmp_path, DISTINCT_TASKS)
    weights, report = train_router(tokenizer_file, data, list(TASKS))
    assert report.heldout_examples == 4 * 30
    assert report.heldout_accuracy >= 0.99
    confusion = np.array(report.confusion)
    assert confusion.sum() == report.heldout_examples
    assert np.trace(confusion) == round(report.heldout_accuracy * confusion.sum())
    # the NumPy reference routes fresh prompts of each format to their own expert
    for label, name in enumerate(TASKS):
        fresh = make_splits(DISTINCT_TASKS[name], seed=99, sizes={"eval": 20})["eval"]
        rows = [encode(r["prompt"]) for r in fresh]
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding, as the runtime pads
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        routed = route(weights, ids, mask, report.vocab, report.config.buckets)
        assert (routed == label).mean() >= 0.95, name


def test_router_is_deterministic(tmp_path: Path, tokenizer_file: Path) -> None:
    data = _prompt_files(tmp_path, DISTINCT_TASKS)
    config = RouterConfig(epochs=3)
    w1, r1 = train_router(tokenizer_file, data, list(TASKS), config)
    w2, r2 = train_router(tokenizer_file, data, list(TASKS), config)
    assert r1 == r2
    for name in w1:
        np.testing.assert_array_equal(w1[name], w2[name])


def test_router_on_identical_formats_is_near_chance(tmp_path: Path, tokenizer_file: Path) -> None:
    """Conflict tasks share one prompt format: routing cannot know the intended expert."""
    names = ("rev", "sort", "shift", "rot")
    data = _prompt_files(tmp_path, CONFLICT_TASKS, names)
    _, report = train_router(tokenizer_file, data, list(names), RouterConfig(epochs=5))
    assert report.heldout_accuracy < 0.5


def test_router_data_errors_name_the_expert(tmp_path: Path, tokenizer_file: Path) -> None:
    data = _prompt_files(tmp_path, DISTINCT_TASKS)
    with pytest.raises(ChmcError, match="no prompts for expert 'shift'"):
        train_router(tokenizer_file, {k: v for k, v in data.items() if k != "shift"}, list(TASKS))
    with pytest.raises(ChmcError, match="names expert 'chat'"):
        train_router(tokenizer_file, {**data, "chat": data["add"]}, list(TASKS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\nnot json\n')
    with pytest.raises(ChmcError, match=r"bad.jsonl:2: expected a JSON object"):
        train_router(tokenizer_file, {**data, "add": bad}, list(TASKS))


def test_add_router_stores_it_in_the_artifact(tmp_path: Path, tokenizer_file: Path,
                                             artifact_manifest) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    write_manifest(artifact, artifact_manifest(list(TASKS)))  # no tensors: the router needs none
    shutil.copy(tokenizer_file, artifact / "tokenizer.json")
    with pytest.raises(ChmcError, match="has none: add one with `chmc router"):
        Router.of_artifact(artifact)
    report = add_router(artifact, _prompt_files(tmp_path, DISTINCT_TASKS), RouterConfig(epochs=5))
    stored = Router.of_artifact(artifact)
    assert stored.section.heldout_accuracy == report.heldout_accuracy
    assert stored.weights["router.weight"].shape == (4, stored.section.config.dim)
    assert sorted(p.name for p in artifact.iterdir()) == ["chmc.json", "router.safetensors",
                                                          "tokenizer.json"]

