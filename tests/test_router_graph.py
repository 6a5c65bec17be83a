"""expert 'auto': the router compiled into the ONNX graph, the runtimes that use it, and (slow)
the routed quality on the trained tiny families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from chmc.compiler.router import RouterConfig, add_router
from chmc.errors import ChmcError
from chmc.models.router import Router
from chmc.models.tiny.tasks import DISTINCT_TASKS, make_splits, write_jsonl
from chmc.models.tiny.tokenizer import encode

# expert_i of the random onnx_family is trained to claim the prompts of task TASKS[i]
TASKS = {"expert_0": "add", "expert_1": "rev", "expert_2": "sort"}


@pytest.fixture(scope="module")
def routed(onnx_family: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The K=2 artifact of onnx_family with a router added, and its ONNX export."""
    from chmc.compiler.export import export

    root = tmp_path_factory.mktemp("routed")
    artifact = root / "artifact"
    shutil.copytree(onnx_family["k2"], artifact)
    data = {}
    for expert, task in TASKS.items():
        data[expert] = root / f"{task}.jsonl"
        write_jsonl(make_splits(DISTINCT_TASKS[task], seed=3, sizes={"train": 200})["train"],
                    data[expert])
    add_router(artifact, data, RouterConfig(epochs=5))
    return {"artifact": artifact, "onnx": export(artifact, root / "onnx")}


def _prompts(n_per_task: int, seed: int = 11) -> tuple[list[str], list[int]]:
    """Fresh prompts of each routed task, interleaved, with the expert id they belong to."""
    per_task = [make_splits(DISTINCT_TASKS[t], seed=seed, sizes={"eval": n_per_task})["eval"]
                for t in TASKS.values()]
    rows = [(r["prompt"], label) for group in zip(*per_task) for label, r in enumerate(group)]
    return [p for p, _ in rows], [label for _, label in rows]


def _left_padded(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from chmc.runtime.generation import left_pad

    return left_pad([encode(p) for p in prompts], pad_id=0)


def _feed(export_dir: Path, ids: np.ndarray, mask: np.ndarray, expert_id: np.ndarray,
          past: int = 0) -> dict[str, np.ndarray]:
    import json

    e = json.loads((export_dir / "chmc.json").read_text())["export"]
    feed = {"input_ids": ids, "attention_mask": mask, "expert_id": expert_id,
            "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)[:, -ids.shape[1]:]}
    kv = np.zeros((len(ids), e["num_kv_heads"], past, e["head_dim"]), np.float32)
    for i in range(e["num_layers"]):
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = kv
    return feed


def test_graph_routes_like_the_numpy_reference(routed: dict[str, Path], ort_session) -> None:
    session = ort_session(routed["onnx"] / "model.onnx")
    prompts, labels = _prompts(8)
    ids, mask = _left_padded(prompts)  # rows of different lengths: left padding
    assert (mask == 0).any()
    reference = Router.of_artifact(routed["artifact"]).route(ids, mask)
    assert (reference == labels).mean() >= 0.9  # the router is real, not constant
    auto = np.full(len(ids), -1, np.int64)
    (used,) = session.run(["expert_id_used"], _feed(routed["onnx"], ids, mask, auto))
    np.testing.assert_array_equal(used, reference)
    # explicit ids pass through unchanged, row by row, beside routed rows
    mixed = np.where(np.arange(len(ids)) % 2 == 0, -1, 2)
    (used,) = session.run(["expert_id_used"], _feed(routed["onnx"], ids, mask, mixed))
    np.testing.assert_array_equal(used, np.where(mixed < 0, reference, mixed))
    # with a past, the router reads only the mask columns of the current tokens
    past = 3
    wide = np.concatenate([np.ones((len(ids), past), np.int64), mask], axis=1)
    (used,) = session.run(["expert_id_used"], _feed(routed["onnx"], ids, wide, auto, past))
    np.testing.assert_array_equal(used, reference)


def test_mixed_auto_batch_equals_single_rows(routed: dict[str, Path]) -> None:
    from chmc import load

    runner = load(routed["onnx"])
    prompts, _ = _prompts(2)
    experts: list[str | int] = ["auto", "expert_1", "auto", 0, "auto", "auto"]
    batch = runner.generate_ids([encode(p) for p in prompts], experts, max_new_tokens=6)
    ids, mask = _left_padded(prompts)
    chosen = Router.of_artifact(routed["artifact"]).route(ids, mask)
    for row, (p, e) in enumerate(zip(prompts, experts)):
        alone = runner.generate_ids([encode(p)], [e], max_new_tokens=6)
        assert batch[row] == alone[0], row
        if e == "auto":  # an auto row runs exactly as its routed expert named explicitly
            assert alone == runner.generate_ids([encode(p)], [int(chosen[row])], max_new_tokens=6)
    # the torch backend routes with compiler.router.route and gives the same tokens
    torch_runner = load(routed["artifact"], backend="torch")
    assert torch_runner.generate_ids([encode(p) for p in prompts], experts,
                                     max_new_tokens=6) == batch


@pytest.mark.parametrize("linear", ["select", "plugin"])
def test_every_linear_form_routes_alike(routed: dict[str, Path], linear: str,
                                        tmp_path: Path) -> None:
    """The plugin form (chmc::ChannelGatherMatMul, TensorRT's graph) reads the resolved id too."""
    from chmc import load
    from chmc.compiler.export import export

    prompts, _ = _prompts(2)
    experts: list[str | int] = ["auto", 2, "auto", "expert_0", "auto", "auto"]
    encoded = [encode(p) for p in prompts]
    reference = load(routed["onnx"]).generate_ids(encoded, experts, max_new_tokens=5)
    other = load(export(routed["artifact"], tmp_path / linear, linear=linear))
    assert other.generate_ids(encoded, experts, max_new_tokens=5) == reference


def test_auto_without_a_router_says_how_to_add_one(onnx_family: dict, chmc_cli,
                                                   tmp_path: Path) -> None:
    from chmc import load

    runner = load(onnx_family["k2_onnx"])
    with pytest.raises(ChmcError, match="needs a router.*chmc router ARTIFACT --data"):
        runner.generate(["1+2="], experts=["auto"])
    # graphs without a router still report the id they ran with (an identity)
    exported = json.loads((onnx_family["k2_onnx"] / "chmc.json").read_text())
    assert exported["export"]["outputs"][-1]["name"] == "expert_id_used"
    result = chmc_cli("run", onnx_family["k2_onnx"], "1+2=", "--expert", "auto", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "needs a router" in result.stderr
    with pytest.raises(ChmcError, match="needs a router"):
        load(onnx_family["k2"], backend="torch").generate(["1+2="], experts=["auto"])


def test_router_cli_adds_a_router_to_an_artifact(onnx_family: dict, chmc_cli,
                                                  tmp_path: Path) -> None:
    import json

    artifact = tmp_path / "artifact"
    shutil.copytree(onnx_family["k2"], artifact)
    args = []
    for expert, task in TASKS.items():
        file = tmp_path / f"{task}.jsonl"
        write_jsonl(make_splits(DISTINCT_TASKS[task], seed=5, sizes={"train": 60})["train"], file)
        args += ["--data", f"{expert}={file}"]
    bad = chmc_cli("router", artifact, "--data", f"nobody={tmp_path / 'add.jsonl'}", cwd=tmp_path)
    assert bad.returncode == 1 and "names expert 'nobody'" in bad.stderr
    assert "router" not in json.loads((artifact / "chmc.json").read_text())
    ok = chmc_cli("router", artifact, *args, "--epochs", "3", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    section = json.loads((artifact / "chmc.json").read_text())["router"]
    assert section["heldout_examples"] == 3 * 12 and (artifact / section["file"]).is_file()
    assert "held-out accuracy" in ok.stdout


def test_eval_auto_scores_each_prompt_with_its_routed_expert(routed: dict[str, Path], chmc_cli,
                                                             tmp_path: Path) -> None:
    import json

    from chmc.runtime.evaluate import evaluate

    files, prompts = {}, {}
    for task in TASKS.values():
        rows = make_splits(DISTINCT_TASKS[task], seed=21, sizes={"eval": 6})["eval"]
        files[task] = tmp_path / f"{task}.jsonl"
        write_jsonl(rows, files[task])
        prompts[task] = [r["prompt"] for r in rows]
    out = tmp_path / "auto.json"
    result = chmc_cli("eval", routed["artifact"], *files.values(), "--expert", "auto",
                      "--json", out, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    auto = {r["task"]: r for r in json.loads(out.read_text())["results"]}
    explicit = evaluate(routed["artifact"], files, progress=False)["results"]
    by_expert = {(r["expert"], r["task"]): r["outputs"] for r in explicit}
    names = list(TASKS)
    for task, task_prompts in prompts.items():
        chosen = Router.of_artifact(routed["artifact"]).route(*_left_padded(task_prompts))
        assert auto[task]["routed"] == {n: int((chosen == i).sum()) for i, n in enumerate(names)}
        # every prompt's output is what its routed expert, named explicitly, answers
        expected = [by_expert[(names[e], task)][i] for i, e in enumerate(chosen)]
        assert auto[task]["outputs"] == expected


@pytest.mark.slow
def test_distinct_family_auto_keeps_the_oracle_accuracy(distinct_family, tmp_path: Path) -> None:
    """Router on the train split prompts; expert auto on the mixed eval prompts of every task
    reaches >= 98% of the oracle ensemble (each prompt sent to its own unmerged expert).

    At K=N the artifact reconstructs every expert exactly, so this measures what routing costs;
    what merging costs at K < N is the quality table's subject (on these fully fine-tuned tiny
    experts K=2 keeps little, routed or not)."""
    from chmc import build
    from chmc.demo import add_task_router, quality_row, routed_row

    n = len(distinct_family.experts)
    art = build(distinct_family.base, distinct_family.experts, tmp_path / "kn", groups=n,
                progress=False)
    assert add_task_router(art, distinct_family).heldout_accuracy >= 0.99
    oracle = quality_row("oracle", distinct_family, progress=False)
    auto = routed_row("auto", distinct_family, art, progress=False)
    assert auto["routing_accuracy"] >= 0.99
    assert auto["mean"] >= 0.98 * oracle["mean"], (auto["accuracy"], oracle["accuracy"])


def test_build_with_router_data_serves_auto(onnx_family: dict, chmc_cli, tmp_path: Path) -> None:
    experts = [f"{n}={p}" for n, p in onnx_family["experts"].items()]
    data = []
    for expert, task in TASKS.items():
        file = tmp_path / f"{task}.jsonl"
        write_jsonl(make_splits(DISTINCT_TASKS[task], seed=8, sizes={"train": 60})["train"], file)
        data += ["--router-data", f"{expert}={file}"]  # repeated: bare NAME=PATH are experts
    common = ["build", "--base", onnx_family["base"], "--experts", *experts, "--groups", "2"]
    bad = chmc_cli(*common, "--router-data", f"expert_9={tmp_path / 'add.jsonl'}",
                   "--out", tmp_path / "bad", cwd=tmp_path)
    assert bad.returncode == 1 and "'expert_9' is not an expert" in bad.stderr
    assert not (tmp_path / "bad").exists()  # checked before any merging
    ok = chmc_cli(*common, *data, "--target", "onnx", "--out", tmp_path / "m",
                  cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    run = chmc_cli("run", tmp_path / "m" / "onnx", "12+34=", "--expert", "auto", "-n", "4",
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    from chmc import load

    runner = load(tmp_path / "m" / "onnx")
    chosen = int(Router.of_artifact(tmp_path / "m").route(*_left_padded(["12+34="]))[0])
    assert runner.generate(["12+34="], [chosen], max_new_tokens=4)[0] == run.stdout.rstrip("\n")
