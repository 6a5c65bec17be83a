"""RegMean's damping, chosen on the validation split: the calibrated budget merge of each tiny
family at each damping, each expert on its own task's validation prompts.

Damping adds damping x mean(diag C) to every Gram (compiler/regmean.py); more of it pulls each
merged row toward the plain mean of its group. The default (regmean.DAMPING) is the value this
sweep favours across the families; the quality table then reports the eval split.

    python3 benchmarks/damping_sweep.py [--out benchmarks/results/quality/damping.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from chmc.benchmarks.quality_table import CALIBRATED, DAMPINGS, Table
from chmc.demo import quality_row, shares
from chmc.errors import ChmcError

# family -> the budgets swept (the goals' budgets, and 0.5 where the hard families need it)
SWEEP = {"distinct-ft": (0.375,), "conflict-ft": (0.375,), "distinct8-ft": (0.25,),
         "distinct": (0.375, 0.5), "conflict": (0.5,)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality/damping.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.families:
            table = Table(name, Path(work))
            table.calibrate()
            reference = quality_row("", table.fam, split="validation", progress=False)
            for budget in SWEEP[name]:
                for damping in DAMPINGS:
                    try:
                        row = table.row("", "", f"b{budget}-d{damping}", split="validation",
                                        groups=table.n, clustering=CALIBRATED[0],
                                        method=CALIBRATED[1], budget=budget,
                                        parameters={"damping": damping})
                    except ChmcError as e:  # a Gram sum not positive definite in fp64: said
                        rows.append({"family": name, "budget": budget, "damping": damping,
                                     "error": str(e)})
                        continue
                    kept, worst = shares(row, reference)
                    rows.append({"family": name, "budget": budget, "damping": damping,
                                 "validation_kept": round(kept, 4),
                                 "validation_worst": round(worst, 4)})
                    print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": "validation", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
