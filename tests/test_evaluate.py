"""chmc eval: exact match on a hand-built model whose answers are known, NLL against a direct
unbatched computation, artifact experts == their source checkpoints, JSON fields, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from chmc.models.tiny.tokenizer import EOS_ID, VOCAB, save_tokenizer
from chmc.runtime.evaluate import evaluate

# The successor model's next token depends only on the last one: ">" -> a -> b -> c -> <eos>.
SUCCESSOR = {">": "a", "a": "b", "b": "c"}


def write_jsonl(file: Path, rows: list[tuple[str, str]]) -> Path:
    file.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return file


@pytest.fixture(scope="module")
def successor_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Llama folder whose attention and MLP outputs are zero, so the residual stream is
    the token's one-hot embedding and lm_head maps it to SUCCESSOR[token] (else <eos>)."""
    import transformers

    from chmc.models.tiny.random_family import tiny_config

    config = tiny_config("llama", hidden=64, layers=1, vocab=len(VOCAB), eos_token_id=EOS_ID)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(VOCAB), 64))
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(len(VOCAB), 64)
        for tok, i in VOCAB.items():
            head[VOCAB[SUCCESSOR[tok]] if tok in SUCCESSOR else EOS_ID, i] = 1.0
        model.lm_head.weight.copy_(head)
    out = tmp_path_factory.mktemp("successor")
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def test_exact_match_on_hand_checkable_cases(successor_model: Path, tmp_path: Path) -> None:
    # continuations: "zz>" -> "abc"; "qb" -> "c"; "c" -> "" (stops at once); "x>" -> "abc"
    rows = [("zz>", "abc"), ("qb", "c"), ("c", ""), ("x>", "abd"), ("zz>", "ab")]
    report = evaluate(successor_model, {"succ": write_jsonl(tmp_path / "succ.jsonl", rows)},
                      progress=False)
    r = report["results"][0]
    assert r["outputs"] == ["abc", "c", "", "abc", "abc"]
    assert (r["n"], r["correct"]) == (5, 3)
    assert r["exact_match"] == pytest.approx(0.6)


def direct_nll(model_dir: Path, rows: list[tuple[str, str]]) -> float:
    """Unbatched: -log p(answer + <eos> | prompt) per example, summed, over the token count."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = dict(VOCAB)
    total, count = 0.0, 0
    for prompt, answer in rows:
        p, a = [enc[c] for c in prompt], [enc[c] for c in answer] + [EOS_ID]
        with torch.no_grad():
            logp = model(torch.tensor([p + a])).logits[0].log_softmax(-1)  # [S, V]
        for j, tok in enumerate(a):
            total -= float(logp[len(p) + j - 1, tok])
        count += len(a)
    return total / count


@pytest.fixture(scope="module")
def random_model(random_family: tuple[Path, dict[str, Path]], tmp_path_factory) -> Path:
    base, _ = random_family
    save_tokenizer(base)  # vocab 64 > the tokenizer's ids, so any character prompt fits
    return base


def test_nll_matches_direct_computation_across_padding(random_model: Path, tmp_path: Path) -> None:
    # lengths differ a lot so the batch is left-padded: a padding bug would change the numbers
    rows = [("1+2=", "3"), ("rev:abcdefg>", "gfedcba"), ("x", "yz"), ("sort:dcba>", "abcd")]
    report = evaluate(random_model, {"t": write_jsonl(tmp_path / "t.jsonl", rows)}, progress=False)
    r = report["results"][0]
    assert r["answer_tokens"] == sum(len(a) + 1 for _, a in rows)
    assert r["nll"] == pytest.approx(direct_nll(random_model, rows), rel=1e-5, abs=1e-5)
    assert math.isfinite(r["nll"]) and r["nll"] > 0


def test_artifact_expert_scores_equal_its_checkpoint(random_family, random_model,
                                                     tmp_path: Path) -> None:
    from chmc import build

    base, experts = random_family
    for path in experts.values():
        save_tokenizer(path)
    art = build(base, experts, tmp_path / "kn", groups=len(experts), progress=False)  # K=N: exact
    file = write_jsonl(tmp_path / "t.jsonl", [("ab>", "ba"), ("12+3=", "15"), ("q", "r")])
    merged = evaluate(art, {"t": file}, experts=["expert_2"], progress=False)
    direct = evaluate(experts["expert_2"], {"t": file}, progress=False)
    assert merged["results"][0]["expert"] == "expert_2"
    assert merged["results"][0]["nll"] == pytest.approx(direct["results"][0]["nll"], abs=1e-5)
    assert merged["results"][0]["outputs"] == direct["results"][0]["outputs"]
    assert merged["ratio_to_ensemble"] == pytest.approx(1.0, abs=0.01)


def test_cli_writes_json_and_plot(successor_model: Path, tmp_path: Path, chmc_cli) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [("zz>", "abc"), ("qb", "c")])
    b = write_jsonl(tmp_path / "b.jsonl", [("c", "x")])
    res = chmc_cli("eval", successor_model, f"first={a}", b, "--json", tmp_path / "r.json",
                   "--plot", tmp_path / "r.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(successor_model / "model.safetensors")
    assert report["stored_parameters"] == sum(t.numel() for t in weights.values())
    by_task = {r["task"]: r for r in report["results"]}
    assert set(by_task) == {"first", "b"}
    assert (by_task["first"]["exact_match"], by_task["b"]["exact_match"]) == (1.0, 0.0)
    assert set(by_task["b"]) >= {"expert", "task", "file", "n", "correct", "exact_match", "nll"}
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "first" in res.stdout and "100.0%" in res.stdout


def test_cli_bad_task_file_is_one_line(successor_model: Path, tmp_path: Path, chmc_cli) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    res = chmc_cli("eval", successor_model, bad, "--json", tmp_path / "r.json", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and f"{bad}:2" in res.stderr
    assert not (tmp_path / "r.json").exists()
    res = chmc_cli("eval", successor_model, tmp_path / "nope.jsonl", "--expert", "x", cwd=tmp_path)
    assert res.returncode == 1 and "nope.jsonl" in res.stderr


@pytest.mark.slow
def test_demo_prints_the_quality_table(distinct_family, tmp_path: Path, chmc_cli) -> None:
    res = chmc_cli("demo", "--out", tmp_path, cwd=tmp_path, timeout=1800)
    assert res.returncode == 0, res.stderr
    assert "unmerged experts" in res.stdout and "base alone" in res.stdout
    assert "channel merging K=2" in res.stdout and "The hard case, distinct" in res.stdout
    manifest = json.loads((tmp_path / "distinct-ft-k2" / "chmc.json").read_text())
    assert manifest["groups"] == 2 and manifest["accounting"]["ratio"] < 0.6
    assert f"{100 * manifest['accounting']['ratio']:.1f}%" in res.stdout
    calibrated = json.loads((tmp_path / "distinct-ft-budget0.375" / "chmc.json").read_text())
    assert calibrated["accounting"]["ratio"] <= 0.375  # the calibrated row stays within its budget
    assert f"{100 * calibrated['accounting']['ratio']:.1f}%" in res.stdout
    assert calibrated["router"]["heldout_accuracy"] >= 0.99  # the demo's expert auto row
    graph = json.loads((tmp_path / "distinct-ft-budget0.375-onnx" / "chmc.json").read_text())
    assert f"one ONNX graph ({graph['export']['linear']} form)" in res.stdout
