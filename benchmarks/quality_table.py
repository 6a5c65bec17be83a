"""The quality table: does channel merging keep each expert's skill at K/N of the memory?

Per family (built or taken from $CHMC_CACHE), each expert on its own task, eval split:
  - the unmerged experts (the ensemble with an oracle router) and the base alone;
  - channel merging at K = 1..N: weight-space grouping (cosine / error clustering, mean / TIES
    inside a group) and the calibrated merge (output-error grouping, RegMean inside a group, on
    Grams of each expert over its own train-split prompts, disjoint from eval);
  - the same two under memory budgets of 0.25, 0.3, 0.375 and 0.5 of the ensemble's parameters
    (K per tensor; a budget below the smallest artifact is reported as infeasible), and at each
    goal's budget the calibrated merge with RegMean's damping at 1e-2 ... 1e-5;
  - the one-model baselines task_arithmetic, ties and dare_ties (K=1), each swept over a small grid,
    the setting chosen on the validation split;
  - expert 'auto' rows: the ensemble (K=N) and the goal's artifact with a router trained on the
    train-split prompts, scored on the mixture of every task's eval prompts.
Columns: exact match per task, mean, the share of the unmerged mean kept, the worst expert's share
of its own unmerged score, stored parameters as % of the ensemble. Families with more than 4
experts skip the cosine/TIES and error clusterings (error clustering is exhaustive over
partitions; the two kept configurations are the paper's rule and the calibrated merge).

The goals (issue 20): at <= 0.375 of the ensemble, >= 98% of the unmerged mean on distinct-ft,
>= 95% on conflict-ft, the worst expert >= 95% of its own; at <= 0.25 on distinct8-ft, >= 95%.
Each is judged on the budget artifact (weight-space, or calibrated at any of the dampings) with the
best validation mean, so nothing is chosen on the eval split.

    python3 benchmarks/quality_table.py [--families distinct-ft conflict-ft ...] [--out DIR]
    python3 benchmarks/quality_table.py --plot-only --out DIR

Each family's rows go to DIR/quality-<family>.json as soon as it is done (families can run in
parallel, one process each); then DIR/quality.png is drawn from every such file in DIR (quality
against stored parameters, the Pareto front of each method). Prints the tables and the goals.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from chmc.demo import (
    Row,
    add_task_router,
    base_row,
    print_quality_table,
    quality_row,
    routed_row,
    shares,
)
from chmc.errors import ChmcError

WEIGHT_SPACE = (("cosine", "mean"), ("cosine", "ties"), ("error", "mean"))
CALIBRATED = ("output-error", "regmean")
BUDGETS = (0.25, 0.3, 0.375, 0.5)
DAMPINGS = (1e-2, 1e-3, 1e-4, 1e-5)  # RegMean's, tried at each goal's budget (default: 1e-3)
BASELINES: dict[str, list[dict[str, float]]] = {
    "task_arithmetic": [{"lambda": x} for x in (0.25, 0.5, 0.75, 1.0)],
    "ties": [{"density": d, "lambda": x}
             for d, x in itertools.product((0.2, 0.5, 0.8), (1.0, 2.0))],
    "dare_ties": [{"density": d, "lambda": x}
                  for d, x in itertools.product((0.2, 0.5, 0.8), (1.0, 2.0))],
}
# family -> (budget, least share of the unmerged mean, least share of the worst expert's own)
GOALS: dict[str, tuple[float, float, float | None]] = {
    "distinct-ft": (0.375, 0.98, 0.95), "conflict-ft": (0.375, 0.95, 0.95),
    "distinct8-ft": (0.25, 0.95, None)}


class Table:
    """One family's rows, artifacts and Grams in a private work folder."""

    def __init__(self, name: str, work: Path):
        from chmc.models.tiny.family import family

        self.fam = family(name)
        self.name, self.work, self.n = name, work / name, len(self.fam.experts)
        self.work.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.infeasible: list[dict[str, Any]] = []
        self.grams: dict[str, Path] = {}
        self.calibration_seconds = 0.0

    def build(self, tag: str, **args: Any) -> Path:
        from chmc import build

        if args.get("method") == "regmean":
            args["calibration"] = self.grams
        return build(self.fam.base, self.fam.experts, self.work / tag, force=True,
                     progress=False, **args)

    def row(self, label: str, series: str, tag: str, split: str = "eval", **args: Any) -> Row:
        art = self.build(tag, **args)
        return quality_row(label, self.fam, art, split=split, progress=False, series=series,
                           tag=tag, **{k: v for k, v in args.items() if k != "calibration"})

    def calibrate(self) -> None:
        from chmc.compiler.calibration import collect_grams, read_sequences
        from chmc.formats.checkpoint import Checkpoint

        matrices = {n for n, info in Checkpoint(self.fam.base).tensors.items()
                    if len(info.shape) == 2}
        start = time.time()
        for task, files in self.fam.tasks.items():
            expert = self.fam.experts[task]
            self.grams[task] = collect_grams(expert, read_sequences(files["train"], expert),
                                             self.work / f"grams-{task}", matrices, progress=False)
        self.calibration_seconds = round(time.time() - start, 1)

    def configurations(self) -> list[tuple[str, str]]:
        return [*(WEIGHT_SPACE if self.n <= 4 else WEIGHT_SPACE[:1]), CALIBRATED]

    def per_k(self) -> None:
        for clustering, method in self.configurations():
            for k in range(1, self.n + 1):
                self.rows.append(self.row(f"channel merging K={k} ({clustering}, {method})",
                                          f"{clustering}, {method}", f"{clustering}-{method}-k{k}",
                                          groups=k, clustering=clustering, method=method))

    def budgets(self) -> None:
        for clustering, method in (WEIGHT_SPACE[0], CALIBRATED):
            for budget in BUDGETS:
                label = f"channel merging budget {budget} ({clustering}, {method})"
                try:
                    self.rows.append(self.row(label, f"budget ({clustering}, {method})",
                                              f"{clustering}-{method}-budget{budget}",
                                              groups=self.n, clustering=clustering,
                                              method=method, budget=budget))
                except ChmcError as e:  # below the smallest artifact: said, not hidden
                    self.infeasible.append({"label": label, "budget": budget, "error": str(e)})

    def dampings(self) -> None:
        """The calibrated budget merge at the goal's budget with RegMean's other dampings: more
        candidates for the goal, each chosen (or not) on validation like every other."""
        from chmc.compiler.regmean import DAMPING

        if self.name not in GOALS:
            return
        budget = GOALS[self.name][0]
        clustering, method = CALIBRATED
        for damping in (d for d in DAMPINGS if d != DAMPING):
            self.rows.append(self.row(
                f"channel merging budget {budget} ({clustering}, {method}, damping={damping:g})",
                f"budget ({clustering}, {method})", f"{clustering}-{method}-budget{budget}-"
                f"damping{damping:g}", groups=self.n, clustering=clustering, method=method,
                budget=budget, parameters={"damping": damping}))

    def baselines(self) -> None:
        """Best setting of each one-model baseline on validation, then scored on eval."""
        for method, grid in BASELINES.items():
            tried = []
            for i, params in enumerate(grid):
                art = self.build(f"{method}-{i}", groups=1, method=method, parameters=params)
                tried.append((quality_row("", self.fam, art, split="validation",
                                          progress=False)["mean"], params, art))
            best_mean, params, art = max(tried, key=lambda t: t[0])
            label = f"{method} K=1 ({', '.join(f'{k}={v}' for k, v in params.items())})"
            self.rows.append(quality_row(
                label, self.fam, art, progress=False, series=method, method=method, groups=1,
                parameters=params, validation_mean=best_mean,
                sweep=[{"parameters": p, "validation_mean": m} for m, p, _ in tried]))

    def goal(self) -> dict[str, Any] | None:
        """The goal's budget artifact with the better validation mean, scored on eval."""
        if self.name not in GOALS:
            return None
        budget, least_mean, least_worst = GOALS[self.name]
        candidates = [r for r in self.rows if r.get("budget") == budget]
        if not candidates:
            return {"budget": budget, "met": False, "why": "no feasible budget artifact"}
        val = {r["tag"]: quality_row("", self.fam, self.work / r["tag"],
                                          split="validation", progress=False)["mean"]
               for r in candidates}
        chosen = max(candidates, key=lambda r: val[r["tag"]])
        kept, worst = shares(chosen, self.rows[0])
        met = (chosen["params_pct"] <= 100 * budget and kept >= least_mean
               and (least_worst is None or worst >= least_worst))
        return {"budget": budget, "least_mean_kept": least_mean, "least_worst_kept": least_worst,
                "chosen": chosen["label"], "chosen_artifact": chosen["tag"],
                "validation_means": val, "params_pct":
                chosen["params_pct"], "mean_kept": kept, "worst_kept": worst, "met": met}

    def routers(self, goal_artifact: str | None) -> None:
        """expert 'auto' on the mixed eval prompts: the ensemble itself (K=N, so only routing
        can cost) and the goal's artifact, each a copy with a router trained on train prompts."""
        sources = [(f"cosine-mean-k{self.n}", f"channel merging K={self.n} (cosine, mean)")]
        if goal_artifact:
            sources.append((goal_artifact, next(r["label"] for r in self.rows
                                                if r.get("tag") == goal_artifact)))
        for tag, label in sources:
            art = shutil.copytree(self.work / tag, self.work / f"{tag}-router")
            add_task_router(art, self.fam)
            self.rows.append(routed_row(f"{label} + router, expert auto", self.fam, art,
                                        progress=False, series="router", tag=f"{tag}-router"))

    def deltas(self) -> dict[str, dict[str, float]]:
        """||expert - base|| / ||base|| per 2-D tensor, from the files: min, median, max."""
        from safetensors.torch import load_file

        from chmc.models.tiny.family import delta_stats

        base = load_file(self.fam.base / "model.safetensors")
        return {t: {k: v for k, v in delta_stats(base, load_file(e / "model.safetensors")).items()
                    if k != "per_tensor"} for t, e in self.fam.experts.items()}

    def run(self) -> dict[str, Any]:
        start = time.time()
        self.rows = [quality_row("unmerged experts (oracle router)", self.fam, progress=False,
                                 series="unmerged"),
                     base_row(self.fam)]
        self.calibrate()
        self.per_k()
        self.budgets()
        self.dampings()
        self.baselines()
        goal = self.goal()
        self.routers(goal["chosen_artifact"] if goal and "chosen" in goal else None)
        return {"family": self.name, "path": str(self.fam.path), "experts": self.n,
                "build_seconds": self.fam.info["build_seconds"],
                "base_validation": self.fam.info.get("base"),
                "deltas": self.deltas(),
                "calibration_seconds": self.calibration_seconds,
                "seconds": round(time.time() - start, 1), "rows": self.rows,
                "infeasible": self.infeasible, "goal": goal}


def report(table: dict[str, Any]) -> None:
    name = table["family"]
    print_quality_table(f"{name}: exact match (%) on the eval split, each expert on its own task "
                        "(router rows: expert auto on the mixed prompts)", table["rows"])
    for d in table["infeasible"]:
        print(f"{d['label']}: infeasible ({d['error']})")
    print("expert deltas ||expert - base|| / ||base|| per 2-D tensor (min / median / max): "
          + "; ".join(f"{t} {d['min']:.3f} / {d['median']:.3f} / {d['max']:.3f}"
                      for t, d in table["deltas"].items()))
    goal = table["goal"]
    if goal and "chosen" in goal:
        worst = "" if goal["least_worst_kept"] is None else (
            f", worst expert {100 * goal['worst_kept']:.1f}% (goal >= "
            f"{100 * goal['least_worst_kept']:.0f}%)")
        print(f"goal ({name}, <= {goal['budget']} of the ensemble): {goal['chosen']} at "
              f"{goal['params_pct']:.1f}% keeps {100 * goal['mean_kept']:.1f}% of the unmerged "
              f"mean (goal >= {100 * goal['least_mean_kept']:.0f}%){worst}: "
              f"{'MET' if goal['met'] else 'NOT MET'}")


def markdown(table: dict[str, Any]) -> str:
    """The family's table as Markdown (for the README): per-task columns, mean, kept, worst."""
    rows = table["rows"]
    tasks = list(rows[0]["accuracy"])
    lines = [f"| {table['family']} | {' | '.join(tasks)} | mean | kept | worst | params |",
             "|---|" + "---:|" * (len(tasks) + 4)]
    for r in rows:
        kept, worst = shares(r, rows[0])
        cells = [f"{100 * r['accuracy'][t]:.1f}" for t in tasks]
        lines.append(f"| {r['label']} | {' | '.join(cells)} | {100 * r['mean']:.1f} | "
                     f"{100 * kept:.1f}% | {100 * worst:.1f}% | {r['params_pct']:.1f}% |")
    lines += [f"| {d['label']}: infeasible | | | | | |" for d in table["infeasible"]]
    return "\n".join(lines)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both fewer parameters and more quality, by parameters."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(tables: list[dict[str, Any]], file: Path) -> None:
    """One panel per family: share of the unmerged mean kept against stored parameters, each
    method's points and its Pareto front."""
    import matplotlib  # plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(tables))
    rows = -(-len(tables) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    markers = {"unmerged": "*", "base": "X", "task_arithmetic": "s", "ties": "D", "dare_ties": "^"}
    colors: dict[str, Any] = {}  # one color per series across the panels
    for ax, table in zip(axes.flat, tables):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in table["rows"]:
            if r["series"] != "router":
                series.setdefault(r["series"], []).append(
                    (r["params_pct"], 100 * shares(r, table["rows"][0])[0]))
        for label, points in series.items():
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            if label in markers:
                ax.scatter(*zip(*points), marker=markers[label], s=60, color=color, label=label,
                           zorder=3)
            else:
                ax.plot(*zip(*pareto(points)), drawstyle="steps-post", color=color, label=label)
                ax.scatter(*zip(*points), s=12, color=color, alpha=0.6)
        ax.axvline(100 / table["experts"], color="grey", lw=0.5, ls=":")
        ax.set_title(f"{table['family']} ({table['experts']} experts)")
        ax.set_xlabel("stored parameters (% of the ensemble)")
        ax.set_ylabel("mean exact match (% of unmerged)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tables):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = len(tables) % cols  # an empty panel holds the legend
    fig.legend(handles, labels, fontsize=8, loc="lower right" if spare else "upper right")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+",
                        default=["distinct-ft", "conflict-ft", "distinct8-ft", "distinct",
                                 "conflict"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw quality.png from the quality-*.json files in --out")
    parser.add_argument("--markdown", action="store_true",
                        help="with --plot-only: print each family's table as Markdown")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        # merged artifacts: private to this run (concurrent runs never share them), then deleted
        with tempfile.TemporaryDirectory(prefix="chmc-quality-") as work:
            for name in args.families:
                table = Table(name, Path(work)).run()
                for r in table["rows"]:
                    r.pop("outputs", None)  # bulky; the JSON keeps the numbers
                (args.out / f"quality-{name}.json").write_text(json.dumps(table, indent=1))
                report(table)
    order = {n: i for i, n in enumerate(parser.get_default("families"))}
    tables = sorted((json.loads(f.read_text()) for f in args.out.glob("quality-*.json")),
                    key=lambda t: order.get(t["family"], len(order)))
    if args.plot_only:
        for table in tables:
            if args.markdown:
                print(markdown(table) + "\n")
            else:
                report(table)
    plot(tables, args.out / "quality.png")


if __name__ == "__main__":
    main()
