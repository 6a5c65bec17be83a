"""`chmc eval`: greedy exact match and answer NLL of a checkpoint (or an artifact's experts) on JSONL tasks.

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
from typing import TYPE_CHECKING, Any

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch

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
    from chmc.jsonl import read_jsonl

    rows: list[dict[str, str]] = []
    for i, row in read_jsonl(file, "task file"):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            raise ChmcError(f"{file}:{i}: expected {{\"prompt\": str, \"answer\": str}}, "
                            f"got {json.dumps(row)[:80]}")
        rows.append({"prompt": row["prompt"], "answer": row["answer"]})
    if not rows:
        raise ChmcError(f"{file}: task file has no examples")
    return rows


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids [B, S] for left-padded sequences (the runtime's own
    padding, as torch tensors)."""
    import torch
    from chmc.runtime.generation import left_pad, positions

    ids, mask = left_pad(seqs, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(positions(mask))


def greedy(model: Any, prompts: list[list[int]], max_new: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations (without the EOS) of a batch of prompts; full recompute per step."""
    import torch

    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.no_grad():
        for _ in range(max_new):
            ids, mask, pos = _left_pad(seqs, pad_id)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == eos_id:
                    done[i] = True
                else:
                    out[i].append(t)
                seqs[i].append(t)
            if all(done):
                break
    return out


def answer_nll(model: Any, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """-log p of every answer token given the prompt, summed per example: [B]."""
    import torch

    ids, mask, pos = _left_pad([p + a for p, a in zip(prompts, answers)], pad_id)
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().log_softmax(-1)
    width = ids.shape[1]
    sums = torch.zeros(len(prompts))
    for i, a in enumerate(answers):
        start = width - len(a)  # answer token j sits at start + j, predicted at start + j - 1
        targets = ids[i, start:]
        sums[i] = -logp[i, start - 1:width - 1].gather(-1, targets[:, None]).sum()
    return sums


class Encoder:
    """Prompt/answer ids and decoding for a model folder: its tokenizer, EOS and pad ids."""

    def __init__(self, folder: Path, config: Any):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001  transformers raises many types for bad tokenizers
            raise ChmcError(f"{folder}: cannot load the tokenizer ({e})") from None
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise ChmcError(f"{folder}: no eos_token_id in the tokenizer or config.json")
        self.eos_id = int(eos)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else config.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)

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
            raise ChmcError(f"task '{name}' given twice ({tasks[name]} and {path}); name them NAME=FILE")
        tasks[name] = path
    return tasks


def stored_parameters(path: Path) -> tuple[int, float | None]:
    """Parameters stored on disk, and the ratio to the ensemble for an artifact (else None)."""
    if (path / "chmc.json").is_file():
        from chmc.compiler.artifact import read_manifest

        acc = read_manifest(path)["accounting"]
        return int(acc["artifact"]), float(acc["ratio"])
    from chmc.compiler.checkpoints import Checkpoint

    return sum(t.numel for t in Checkpoint(path).tensors.values()), None


def load_model(path: Path, expert: str | None = None) -> tuple[Any, Encoder]:
    """A transformers causal LM from a model folder, or an artifact expert's reconstructed weights."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bar counts examples
    is_artifact = (path / "chmc.json").is_file()
    if expert is not None and not is_artifact:
        raise ChmcError(f"{path}: --expert '{expert}' needs a chmc artifact (no chmc.json here)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  missing or unreadable config.json
        raise ChmcError(f"{path}: cannot read config.json ({e})") from None
    if not is_artifact:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.eval(), Encoder(path, config)
    from chmc.compiler.artifact import Artifact

    art = Artifact(path)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    state = {name: t.float() for name, t in art.expert_state_dict(expert if expert is not None else 0)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        bad = sorted(set(missing) - tied) or sorted(unexpected)
        raise ChmcError(f"{path}: artifact tensors do not fit {config.architectures}: '{bad[0]}'")
    if tied:
        model.tie_weights()
    return model.eval(), Encoder(path, config)


def score_routed(path: Path, data: dict[str, list[dict[str, str]]], advance: Any = None) -> list[dict[str, Any]]:
    """expert 'auto': route every prompt with the artifact's router (`compiler.router.route` on its
    token ids), then score it with the routed expert; one expert's model loaded at a time."""
    import numpy as np
    import transformers
    from chmc.compiler.artifact import expert_names, read_manifest
    from chmc.compiler.router import route_prompts
    from chmc.runtime.generation import left_pad

    names = expert_names(read_manifest(path))
    enc = Encoder(path, transformers.AutoConfig.from_pretrained(str(path)))
    routes = {}
    for task, rows in data.items():
        ids, mask = left_pad([enc.prompt(r["prompt"]) or [enc.pad_id] for r in rows], enc.pad_id)
        routes[task] = route_prompts(path, ids, mask)  # [n] expert id per prompt
    totals = {task: Scores(task, 0, 0, 0.0, 0, [""] * len(rows)) for task, rows in data.items()}
    for e in sorted({int(x) for r in routes.values() for x in r}):
        model, _ = load_model(path, names[e])
        for task, rows in data.items():
            idx = np.flatnonzero(routes[task] == e)
            if not len(idx):
                continue
            s, t = score_task(model, enc, task, [rows[i] for i in idx], advance), totals[task]
            t.n, t.correct, t.nll_sum, t.n_tokens = (t.n + s.n, t.correct + s.correct,
                                                     t.nll_sum + s.nll_sum, t.n_tokens + s.n_tokens)
            for i, text in zip(idx, s.outputs):
                t.outputs[i] = text
    return [{"expert": "auto", "task": task, "n": t.n, "correct": t.correct, "exact_match": t.accuracy,
             "nll": t.nll, "answer_tokens": t.n_tokens, "outputs": t.outputs,
             "routed": {n: int((routes[task] == i).sum()) for i, n in enumerate(names)}}
            for task, t in totals.items()]


def evaluate(path: str | Path, tasks: dict[str, Path], *, experts: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score a model folder (or each listed artifact expert; all by default) on every task file."""
    import torch
    from rich.progress import Progress

    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = Path(path)
    if not path.is_dir():
        raise ChmcError(f"{path}: no such model folder or artifact")
    data = {name: read_examples(file) for name, file in tasks.items()}
    if (path / "chmc.json").is_file():
        from chmc.compiler.artifact import expert_index, expert_names, read_manifest

        manifest = read_manifest(path)
        for e in experts or []:
            if e == "auto" and "router" not in manifest:
                from chmc.compiler.router import no_router

                raise no_router(path)
            if e != "auto":
                expert_index(manifest, e)  # unknown names fail before any work
        runs: list[str | None] = list(experts or expert_names(manifest))
    elif experts:
        raise ChmcError(f"{path}: --expert needs a chmc artifact (no chmc.json here)")
    else:
        runs = [None]
    params, ratio = stored_parameters(path)
    results = []
    start = time.time()
    total = len(runs) * sum(len(rows) for rows in data.values())
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task(f"evaluating {path.name}", total=total)
        for expert in runs:
            if expert == "auto":  # every task's prompts routed, each scored by its routed expert
                results += [{**r, "file": str(tasks[r["task"]])} for r in
                            score_routed(path, data, advance=lambda n: bar.advance(job, n))]
                continue
            model, enc = load_model(path, expert)
            for name, rows in data.items():
                s = score_task(model, enc, name, rows, advance=lambda n: bar.advance(job, n))
                results.append({"expert": expert, "task": name, "file": str(tasks[name]), "n": s.n,
                                "correct": s.correct, "exact_match": s.accuracy, "nll": s.nll,
                                "answer_tokens": s.n_tokens, "outputs": s.outputs})
    return {"model": str(path), "stored_parameters": params, "ratio_to_ensemble": ratio,
            "seconds": round(time.time() - start, 2), "results": results}


def print_report(report: dict[str, Any]) -> None:
    """Exact match and NLL as a rich table, one row per (expert, task)."""
    from rich.console import Console
    from rich.table import Table

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


def plot_accuracy(points: list[tuple[str, float, float]], file: str | Path, title: str = "") -> None:
    """Scatter of mean accuracy (%) against stored parameters (% of the ensemble or count)."""
    import matplotlib

    matplotlib.use("Agg")
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
