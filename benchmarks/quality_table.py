"""The quality table: does channel merging keep each expert's skill at K/N of the memory?

For each family (built or taken from $CHMC_CACHE), rows are: the unmerged experts, each on its
own task (the ensemble with an oracle router); channel merging at K = 1..N for both clusterings
(within-group method "mean"); output-error grouping with regmean merging (calibrated on each
expert's train-split prompts) at K = 1..N and at budgets of 0.35/0.5/0.75 of the ensemble's
parameters (K per tensor); and the one-model baselines task_arithmetic, ties and dare_ties at
K=1, each swept over a small grid, the best setting chosen on the validation split and reported
on the eval split; and expert 'auto' rows: K=2 and K=N artifacts with a router trained on the
train split prompts, scored on the mixture of every task's eval prompts (params include the
router). Columns: exact match per task (eval split), mean, share of the unmerged mean kept,
stored parameters as % of the ensemble.

Note: at K=1 every 2-D weight is one shared bank; the artifact format still keeps 1-D tensors
(RMSNorm weights, ~0.3% of the parameters here) per expert, so "one model" means one set of
matrices.

    python3 benchmarks/quality_table.py [--families distinct conflict] [--distinct8] [--out DIR]

Prints the tables, then one JSON object; writes quality.json and quality.png under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chmc.demo import Row, add_task_router, print_quality_table, quality_row, routed_row

BASELINES: dict[str, list[dict[str, float]]] = {
    "task_arithmetic": [{"lambda": x} for x in (0.25, 0.5, 0.75, 1.0)],
    "ties": [{"density": d, "lambda": x}
             for d, x in itertools.product((0.2, 0.5, 0.8), (1.0, 2.0))],
    "dare_ties": [{"density": d, "lambda": x}
                  for d, x in itertools.product((0.2, 0.5, 0.8), (1.0, 2.0))],
}


def merged(fam: Any, work: Path, tag: str, **build_args: Any) -> Path:
    from chmc import build

    return build(fam.base, fam.experts, work / tag, force=True, progress=False, **build_args)


def channel_rows(fam: Any, work: Path) -> list[Row]:
    rows = []
    n = len(fam.experts)
    for clustering in ("cosine", "error"):
        for k in range(1, n + 1):
            art = merged(fam, work, f"cm-{clustering}-k{k}", groups=k, clustering=clustering)
            rows.append(quality_row(f"channel merging K={k} ({clustering})", fam, art,
                                    progress=False, method="channel", groups=k,
                                    clustering=clustering))
    return rows


def router_rows(fam: Any, work: Path) -> list[Row]:
    """expert 'auto' on the mixed eval prompts, with a router trained on the tasks' train split
    prompts: K=N (the ensemble itself, so only routing can cost) and the calibrated artifact at
    a 0.5 budget (the paper's setting: about half the ensemble), copied from calibrated_rows."""
    import shutil

    n = len(fam.experts)
    art = merged(fam, work, f"cm-cosine-k{n}-router", groups=n, clustering="cosine")
    sources = [(art, f"channel merging K={n} (cosine)", n)]
    if (work / "oe-regmean-budget0.5").is_dir():
        shutil.copytree(work / "oe-regmean-budget0.5", work / "oe-regmean-budget0.5-router",
                        dirs_exist_ok=True)
        sources.append((work / "oe-regmean-budget0.5-router",
                        "channel merging budget 0.5 (output-error, regmean)", n))
    rows = []
    for art, label, k in sources:
        add_task_router(art, fam)
        rows.append(routed_row(f"{label} + router, expert auto", fam, art, progress=False,
                               method="router", groups=k))
    return rows


BUDGETS = (0.35, 0.5, 0.75)


def calibrated_rows(fam: Any, work: Path) -> list[Row]:
    """Output-error grouping with regmean merging at K = 1..N and under memory budgets, from
    Grams of each expert on its own train-split prompts (disjoint from the eval split)."""
    from chmc.compiler.calibration import collect_grams, read_sequences
    from chmc.formats.checkpoint import Checkpoint

    matrices = {name for name, info in Checkpoint(fam.base).tensors.items() if len(info.shape) == 2}
    start = time.time()
    grams = {task: collect_grams(fam.experts[task],
                                 read_sequences(files["train"], fam.experts[task]),
                                 work / f"grams-{task}", matrices, progress=False)
             for task, files in fam.tasks.items()}
    calib_s = round(time.time() - start, 1)
    n = len(fam.experts)
    rows = []
    for k, budget in [(k, None) for k in range(1, n + 1)] + [(n, b) for b in BUDGETS]:
        tag = f"budget {budget}" if budget else f"K={k}"
        art = merged(fam, work, f"oe-regmean-{tag.replace(' ', '')}", groups=k,
                     clustering="output-error", method="regmean", calibration=grams, budget=budget)
        rows.append(quality_row(f"channel merging {tag} (output-error, regmean)", fam, art,
                                progress=False, method="regmean", groups=k, budget=budget,
                                clustering="output-error", calibration_seconds=calib_s))
    return rows


def baseline_rows(fam: Any, work: Path) -> list[Row]:
    """Best setting of each one-model baseline on validation, then scored on eval."""
    rows = []
    for method, grid in BASELINES.items():
        tried: list[tuple[float, dict[str, float], Path]] = []
        for params in grid:
            art = merged(fam, work, f"{method}-{len(tried)}", groups=1, method=method,
                         parameters=params)
            val = quality_row("", fam, art, split="validation", progress=False)
            tried.append((val["mean"], params, art))
        best_mean, params, art = max(tried, key=lambda t: t[0])
        label = f"{method} K=1 ({', '.join(f'{k}={v}' for k, v in params.items())})"
        rows.append(quality_row(label, fam, art, progress=False, method=method, groups=1,
                                parameters=params, validation_mean=best_mean,
                                sweep=[{"parameters": p, "validation_mean": m}
                                       for m, p, _ in tried]))
    return rows


def family_table(name: str, work: Path) -> dict[str, Any]:
    from chmc.models.tiny.family import family

    start = time.time()
    fam = family(name)
    work = work / name
    work.mkdir(parents=True, exist_ok=True)
    rows = [quality_row("unmerged experts (oracle router)", fam, progress=False, method="unmerged")]
    rows += channel_rows(fam, work) + calibrated_rows(fam, work) + router_rows(fam, work)
    rows += baseline_rows(fam, work)
    print_quality_table(f"{name}: exact match (%) on the eval split, each expert on its own task "
                        "(router rows: expert auto on the mixed prompts)", rows)
    for r in rows:
        if r.get("routing_accuracy", 1.0) < 0.9:
            print(f"note ({name}): {r['label']}: the tasks share one prompt format, so the router "
                  "cannot tell which expert a prompt wants; its accuracy is shown, not hidden.")
    return {"family": name, "path": str(fam.path), "build_seconds": fam.info["build_seconds"],
            "seconds": round(time.time() - start, 1), "rows": rows}


def plot(tables: list[dict[str, Any]], file: Path) -> None:
    from chmc.runtime.evaluate import plot_accuracy

    points = [(f"{t['family']} {r['method']} K={r.get('groups', '-')} {r.get('clustering', '')}",
               r["params_pct"], 100 * r["mean"]) for t in tables for r in t["rows"]]
    plot_accuracy(points, file, title="mean exact match vs stored parameters (% of the ensemble)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["distinct", "conflict"])
    parser.add_argument("--distinct8", action="store_true", help="also the 8-task distinct family")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.families + (["distinct8"] if args.distinct8 else [])
    # merged artifacts: private to this run (concurrent runs never share them), then deleted
    with tempfile.TemporaryDirectory(prefix="chmc-quality-") as work:
        tables = [family_table(name, Path(work)) for name in names]
    for t in tables:  # outputs are bulky; the JSON keeps the numbers
        for r in t["rows"]:
            r.pop("outputs", None)
    (args.out / "quality.json").write_text(json.dumps(tables, indent=1))
    plot(tables, args.out / "quality.png")
    json.dump(tables, sys.stdout)
    print()


if __name__ == "__main__":
    main()
