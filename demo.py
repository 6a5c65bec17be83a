"""`chmc demo` and the quality table: each expert on its own task, unmerged vs channel-merged.

The demo is a short sequence of stage calls (family -> build -> evaluate -> table), so later
stages (export, engine, router) add one line each. `quality_row` and `print_quality_table` are
shared with benchmarks/quality_table.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from chmc.api import build, load
from chmc.cache import cache_root
from chmc.compiler.export import export
from chmc.compiler.router import add_router
from chmc.formats.artifact import RouterConfig, RouterSection, read_manifest
from chmc.models.tiny import family as tiny
from chmc.models.tiny.family import Family
from chmc.runtime.evaluate import evaluate, read_examples
from chmc.runtime.onnxruntime_backend import preferred_linear

# A row: {"label", "params_pct", "accuracy": {task: exact match}, "nll": {task: nll}, ...}
Row = dict[str, Any]


def console() -> Console:
    """Rich's console; 160 columns where output is not a terminal (rich's 80 wraps the tables'
    labels into unreadable stacks in logs)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def quality_row(label: str, family: Family, source: Path | None = None, split: str = "eval",
                progress: bool = True, **extra: Any) -> Row:
    """Each expert on its own task: the unmerged experts (source None) or an artifact's experts."""
    accuracy, nll = {}, {}
    for task, files in family.tasks.items():
        path = family.experts[task] if source is None else source
        report = evaluate(path, {task: files[split]}, experts=None if source is None else [task],
                          progress=progress)
        accuracy[task] = report["results"][0]["exact_match"]
        nll[task] = report["results"][0]["nll"]
    pct = 100.0 if source is None else 100 * read_manifest(source).accounting.ratio
    mean = sum(accuracy.values()) / len(accuracy)
    return {"label": label, "params_pct": pct, "accuracy": accuracy, "mean": mean, "nll": nll,
            **extra}


def base_row(family: Family, split: str = "eval", progress: bool = False) -> Row:
    """The base alone on every task: what the experts added (one model: 1/N of the ensemble)."""
    tasks = {task: files[split] for task, files in family.tasks.items()}
    results = evaluate(family.base, tasks, progress=progress)["results"]
    accuracy = {r["task"]: r["exact_match"] for r in results}
    return {"label": "base alone", "params_pct": 100 / len(tasks), "accuracy": accuracy,
            "mean": sum(accuracy.values()) / len(accuracy),
            "nll": {r["task"]: r["nll"] for r in results}, "series": "base"}


def shares(row: Row, reference: Row) -> tuple[float, float]:
    """(share of the reference's mean kept, the worst task's share of its own reference score)."""
    mean = row["mean"] / (reference["mean"] or 1.0)
    worst = min(row["accuracy"][t] / a if a else 1.0 for t, a in reference["accuracy"].items())
    return mean, worst


def add_task_router(artifact: Path, family: Family) -> RouterSection:
    """Train the artifact's router (expert 'auto') on the train split prompts of every task.

    A 16-dim router with 512 bigram buckets: the default (32, 4096) is negligible beside a real
    model but ~10% of these tiny experts; this one is ~0.6% and as accurate on their prompts."""
    return add_router(artifact, {task: files["train"] for task, files in family.tasks.items()},
                      RouterConfig(dim=16, buckets=512))


def routed_row(label: str, family: Family, artifact: Path, split: str = "eval",
               progress: bool = True, **extra: Any) -> Row:
    """expert 'auto' on the mixture of every task's prompts: the artifact's router picks each
    prompt's expert. Parameters count the router too; `routing` is the share routed to the expert
    of the prompt's own task."""
    tasks = {task: files[split] for task, files in family.tasks.items()}
    results = evaluate(artifact, tasks, experts=["auto"], progress=progress)["results"]
    manifest = read_manifest(artifact)
    acc, router = manifest.accounting, manifest.router
    assert router is not None
    routing = sum(r["routed"].get(r["task"], 0) for r in results) / sum(r["n"] for r in results)
    accuracy = {r["task"]: r["exact_match"] for r in results}
    return {"label": f"{label} (routed right {100 * routing:.1f}%)",
            "params_pct": 100 * (acc.artifact + router.parameters) / acc.ensemble,
            "accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy),
            "nll": {r["task"]: r["nll"] for r in results}, "routing_accuracy": routing,
            "router_heldout_accuracy": router.heldout_accuracy,
            "router_parameters": router.parameters, **extra}


def print_quality_table(title: str, rows: list[Row]) -> None:
    """Accuracy per task, mean, the share of the unmerged mean kept, the worst task's share of its
    own unmerged score, and stored params (% of the ensemble). rows[0]: the unmerged experts."""
    tasks = list(rows[0]["accuracy"])
    table = Table(title=title)
    table.add_column("model")
    for col in [*tasks, "mean", "kept", "worst", "params"]:
        table.add_column(col, justify="right")
    for r in rows:
        kept, worst = shares(r, rows[0])
        cells = [f"{100 * r['accuracy'][t]:.1f}" for t in tasks]
        table.add_row(r["label"], *cells, f"{100 * r['mean']:.1f}", f"{100 * kept:.1f}%",
                      f"{100 * worst:.1f}%", f"{r['params_pct']:.1f}%")
    console().print(table)


def run_demo(out: str | Path | None = None) -> list[Row]:
    """The fine-tune regime first (distinct-ft: experts a few percent from their base): the
    paper's rule (K=2, cosine, mean), the calibrated merge within 0.375 of the ensemble, its router
    row, then one ONNX graph answering every expert in one batch; then one line on the hard case
    (distinct: experts trained from scratch)."""
    work = Path(out) if out else cache_root() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    fam = tiny.family("distinct-ft")
    paper = build(fam.base, fam.experts, work / "distinct-ft-k2", groups=2, force=True)
    # Outputs-aware merging: calibration on each expert's train-split prompts (disjoint from
    # eval), K chosen per tensor within 0.375 of the ensemble.
    calibrated = build(fam.base, fam.experts, work / "distinct-ft-budget0.375",
                       groups=len(fam.experts), clustering="output-error", method="regmean",
                       budget=0.375, force=True,
                       calibration={task: files["train"] for task, files in fam.tasks.items()})
    add_task_router(calibrated, fam)  # seconds: a bag of n-grams classifier
    rows = [quality_row("unmerged experts (oracle router)", fam), base_row(fam),
            quality_row("channel merging K=2 (cosine, mean)", fam, paper),
            quality_row("channel merging budget 0.375 (output-error, regmean)", fam, calibrated),
            routed_row("budget 0.375 + router, expert auto", fam, calibrated)]
    print_quality_table(f"distinct-ft (experts fine-tuned from their base), eval split "
                        f"({fam.path})", rows)
    onnx_agreement(calibrated, fam, work / "distinct-ft-budget0.375-onnx")
    hard = tiny.family("distinct")
    hard_k2 = build(hard.base, hard.experts, work / "distinct-k2", groups=2, force=True)
    hard_rows = [quality_row("", hard), quality_row("", hard, hard_k2)]
    # family.json's deltas, measured from the files (absent from families cached before them)
    moved = [e["delta"] for e in hard.info["experts"].values() if "delta" in e]
    spread = (f", moving {100 * min(d['min'] for d in moved):.0f}-"
              f"{100 * max(d['max'] for d in moved):.0f}% of the base's norm" if moved else "")
    print(f"The hard case, distinct (experts trained from scratch{spread}): "
          f"K=2 (cosine, mean) keeps {100 * shares(hard_rows[1], hard_rows[0])[0]:.1f}% of the "
          f"unmerged mean there; benchmarks/quality_table.py has both regimes.")
    return rows + hard_rows


def onnx_agreement(artifact: Path, family: Family, out: Path, per_task: int = 16) -> dict[str, Any]:
    """Export the artifact to one ONNX graph and answer `per_task` eval prompts of every task in
    one ONNX Runtime call (each row names its expert); compare with the PyTorch reconstruction."""
    rows = [(task, ex) for task, files in family.tasks.items()
            for ex in read_examples(files["eval"])[:per_task]]
    prompts, experts = [ex["prompt"] for _, ex in rows], [task for task, _ in rows]
    new = max(len(ex["answer"]) for _, ex in rows) + 1
    linear = preferred_linear("float32")  # the native kernel's form where it builds
    start = time.perf_counter()
    graph = export(artifact, out, linear=linear, force=True)
    onnx = load(graph).generate(prompts, experts, max_new_tokens=new)
    seconds = time.perf_counter() - start
    torch = load(artifact, backend="torch").generate(prompts, experts, max_new_tokens=new)
    result = {"rows": len(rows), "identical_to_torch": sum(a == b for a, b in zip(onnx, torch)),
              "exact_match": sum(a == ex["answer"] for a, (_, ex) in zip(onnx, rows)),
              "export_and_generate_s": round(seconds, 2)}
    table = Table(title=f"one ONNX graph ({linear} form), {len(family.tasks)} experts in one "
                  f"batch ({out})")
    for col in result:
        table.add_column(col, justify="right")
    table.add_row(*(str(v) for v in result.values()))
    console().print(table)
    return result
