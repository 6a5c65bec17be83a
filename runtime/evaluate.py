"""`chmc eval`: greedy exact match and answer NLL of a checkpoint (or an artifact's experts) on
JSONL tasks.

This is the quality yardstick, not the serving path, so it uses torch + transformers. A task file
is JSONL with {"prompt", "answer"} per line. For each example the model sees the prompt's token
ids (as the tokenizer encodes it) and must continue with the answer's ids and then EOS:
  exact match: the greedy continuation, cut at the first EOS, decodes to exactly `answer`;
  nll: -log p(answer ids + EOS | prompt), summed over the tokens of a task, divided by their count
       (mean per answer token, EOS included).
Decoding is batched with left padding, an attention mask and position ids counted from the
first real token, so a batch gives the same answers as one example at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from rich.console import Console
from rich.table import Table

from chmc.errors import ChmcError
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import Checkpoint, GenerationIds
from chmc.formats.folders import open_folder
from chmc.jsonl import read_jsonl
from chmc.models.inputs import left_pad
from chmc.models.reference import answer_nll, greedy
from chmc.models.router import AUTO, Router
from chmc.progress import Stages

BATCH = 256


@dataclass
class Scores:
    """Per-task outcome for one model: counts kept so results can be re-aggregated exactly."""

    task: str
    n: int
    correct: int
    nll_sum: float
    n_tokens: int
    outputs: list[str] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def nll(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else 0.0


def read_examples(file: str | Path) -> list[dict[str, str]]:
    """Read a JSONL task file; a malformed line is a ChmcError naming the file and line."""
    rows: list[dict[str, str]] = []
    for i, row in read_jsonl(file, "task file"):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            raise ChmcError(f"{file}:{i}: expected {{\"prompt\": str, \"answer\": str}}, "
                            f"got {json.dumps(row)[:80]}")
        rows.append({"prompt": row["prompt"], "answer": row["answer"]})
    if not rows:
        raise ChmcError(f"{file}: task file has no examples")
    return rows


class Encoder:
    """Prompt/answer ids and decoding for a model folder: its tokenizer, EOS and pad ids (the
    tokenizer's where it names them: answers end with its EOS token)."""

    def __init__(self, folder: Path):
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001  transformers raises many types for bad tokenizers
            raise ChmcError(f"{folder}: cannot load the tokenizer ({e})") from None
        ids = GenerationIds.of(folder)
        eos = (self.tok.eos_token_id if self.tok.eos_token_id is not None
               else (ids.eos or (None,))[0])
        if eos is None:
            raise ChmcError(f"{folder}: no eos_token_id in the tokenizer or config.json")
        self.eos_id = int(eos)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else ids.pad)

    def prompt(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def answer(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def score_task(model: Any, enc: Encoder, name: str, rows: list[dict[str, str]],
               advance: Any = None) -> Scores:
    """Exact match and answer NLL of `model` on one task's examples, in batches of BATCH."""
    s = Scores(name, 0, 0, 0.0, 0)
    for b in range(0, len(rows), BATCH):
        chunk = rows[b:b + BATCH]
        prompts = [enc.prompt(r["prompt"]) for r in chunk]
        answers = [enc.answer(r["answer"]) for r in chunk]
        max_new = max(len(a) for a in answers) + 2  # room to show it would not stop in time
        for r, ids in zip(chunk, greedy(model, prompts, max_new, enc.eos_id, enc.pad_id)):
            text = enc.decode(ids)
            s.outputs.append(text)
            s.correct += text == r["answer"]
        s.nll_sum += float(answer_nll(model, prompts, answers, enc.pad_id).sum())
        s.n_tokens += sum(len(a) for a in answers)
        s.n += len(chunk)
        if advance is not None:
            advance(len(chunk))
    return s


def task_name(file: Path) -> str:
    """tasks/add/eval.jsonl -> "add"; add.jsonl -> "add"."""
    return file.parent.name if file.stem in ("train", "validation", "eval") else file.stem


def parse_task_args(specs: list[str]) -> dict[str, Path]:
    """CLI task arguments, NAME=FILE or FILE, to {name: file}; duplicate names are an error."""
    tasks: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        path = Path(file) if sep else Path(spec)
        name = name if sep else task_name(path)
        if name in tasks:
            raise ChmcError(f"task '{name}' given twice ({tasks[name]} and {path}); name them "
                            "NAME=FILE")
        tasks[name] = path
    return tasks


def stored_parameters(folder: Artifact | Checkpoint) -> tuple[int, float | None]:
    """Parameters stored on disk, and the ratio to the ensemble for an artifact (else None)."""
    if isinstance(folder, Artifact):
        acc = folder.manifest.accounting
        return acc.artifact, acc.ratio
    return sum(t.numel for t in folder.tensors.values()), None


def load_model(folder: Artifact | Checkpoint, expert: str | None = None) -> tuple[Any, Encoder]:
    """A transformers causal LM from a model folder, or an artifact expert's reconstructed
    weights."""
    transformers.utils.logging.disable_progress_bar()  # our own bar counts examples
    path = folder.path
    if expert is not None and not isinstance(folder, Artifact):
        raise ChmcError(f"{path}: --expert '{expert}' needs a chmc artifact (no chmc.json here)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  missing or unreadable config.json
        raise ChmcError(f"{path}: cannot read config.json ({e})") from None
    if not isinstance(folder, Artifact):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.eval(), Encoder(path)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    state = {name: t.float() for name, t in folder.expert_state_dict(expert if expert else 0)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        bad = sorted(set(missing) - tied) or sorted(unexpected)
        raise ChmcError(f"{path}: artifact tensors do not fit {config.architectures}: '{bad[0]}'")
    if tied:
        model.tie_weights()
    return model.eval(), Encoder(path)


def score_routed(art: Artifact, router: Router, data: dict[str, list[dict[str, str]]],
                 advance: Any = None) -> list[dict[str, Any]]:
    """expert 'auto': route every prompt with the artifact's router (`models.router.route` on
    its token ids), then score it with the routed expert; one expert's model loaded at a time."""
    names = art.experts
    enc = Encoder(art.path)
    routes = {}
    for task, rows in data.items():
        ids, mask = left_pad([enc.prompt(r["prompt"]) or [enc.pad_id] for r in rows], enc.pad_id)
        routes[task] = router.route(ids, mask)  # [n] expert id per prompt
    totals = {task: Scores(task, 0, 0, 0.0, 0, [""] * len(rows)) for task, rows in data.items()}
    for e in sorted({int(x) for r in routes.values() for x in r}):
        model, _ = load_model(art, names[e])
        for task, rows in data.items():
            idx = np.flatnonzero(routes[task] == e)
            if not len(idx):
                continue
            s, t = score_task(model, enc, task, [rows[i] for i in idx], advance), totals[task]
            t.n, t.correct, t.nll_sum, t.n_tokens = (t.n + s.n, t.correct + s.correct,
                                                     t.nll_sum + s.nll_sum, t.n_tokens + s.n_tokens)
            for i, text in zip(idx, s.outputs):
                t.outputs[i] = text
    return [{"expert": AUTO, "task": task, "n": t.n, "correct": t.correct,
             "exact_match": t.accuracy, "nll": t.nll, "answer_tokens": t.n_tokens,
             "outputs": t.outputs,
             "routed": {n: int((routes[task] == i).sum()) for i, n in enumerate(names)}}
            for task, t in totals.items()]


def evaluate(path: str | Path, tasks: dict[str, Path], *, experts: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score a model folder (or each listed artifact expert; all by default) on every task file."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = Path(path)
    if not path.is_dir():
        raise ChmcError(f"{path}: no such model folder or artifact")
    data = {name: read_examples(file) for name, file in tasks.items()}
    folder = open_folder(path, expect=("artifact", "checkpoint"))
    assert isinstance(folder, (Artifact, Checkpoint))
    router = None
    if isinstance(folder, Artifact):  # unknown experts and a missing router fail before any work
        router = Router(path, folder.manifest.router) if AUTO in (experts or []) else None
        for e in experts or []:
            if e != AUTO:
                folder.manifest.expert_index(e)
        runs: list[str | None] = list(experts or folder.experts)
    elif experts:
        raise ChmcError(f"{path}: --expert needs a chmc artifact (no chmc.json here)")
    else:
        runs = [None]
    params, ratio = stored_parameters(folder)
    results = []
    start = time.time()
    total = len(runs) * sum(len(rows) for rows in data.values())
    with Stages(progress).bar(f"evaluating {path.name}", total) as advance:
        for expert in runs:
            label = expert or path.name

            def examples(n: int, label: str = label) -> None:
                advance(label, n)

            if expert == AUTO:  # every task's prompts routed, each scored by its routed expert
                assert isinstance(folder, Artifact) and router is not None
                results += [{**r, "file": str(tasks[r["task"]])}
                            for r in score_routed(folder, router, data, examples)]
                continue
            model, enc = load_model(folder, expert)
            for name, rows in data.items():
                s = score_task(model, enc, name, rows, examples)
                results.append({"expert": expert, "task": name, "file": str(tasks[name]), "n": s.n,
                                "correct": s.correct, "exact_match": s.accuracy, "nll": s.nll,
                                "answer_tokens": s.n_tokens, "outputs": s.outputs})
    return {"model": str(path), "stored_parameters": params, "ratio_to_ensemble": ratio,
            "seconds": round(time.time() - start, 2), "results": results}


def print_report(report: dict[str, Any]) -> None:
    """Exact match and NLL as a rich table, one row per (expert, task)."""
    ratio = report["ratio_to_ensemble"]
    title = f"{report['model']}: {report['stored_parameters']:,} stored parameters"
    title += f" ({100 * ratio:.1f}% of the ensemble)" if ratio is not None else ""
    table = Table(title=title)
    for col in ("expert", "task", "n", "exact match", "nll / token"):
        table.add_column(col, justify="left" if col in ("expert", "task") else "right")
    for r in report["results"]:
        table.add_row(r["expert"] or "-", r["task"], str(r["n"]), f"{100 * r['exact_match']:.1f}%",
                      f"{r['nll']:.4f}")
    Console().print(table)


def plot_accuracy(points: list[tuple[str, float, float]], file: str | Path,
                  title: str = "") -> None:
    """Scatter of mean accuracy (%) against stored parameters (% of the ensemble or count)."""
    import matplotlib  # plotting only: kept off every other path

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("stored parameters")
    ax.set_ylabel("mean exact match (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
