"""The tiny families' tasks: seeded generators of (prompt, answer) pairs, written as JSONL splits.

Format: one JSON object per line, `{"prompt": "...", "answer": "..."}`. The model reads the prompt
characters and must produce the answer characters followed by <eos> (see tokenizer.py); exact
match compares the greedy continuation up to <eos> with `answer`.

Operations (letters: 3-7 distinct lowercase letters; numbers: 0-99, so answers carry):
  add    a+b            "57+68="      -> "125"
  sub    a-b, a >= b    "52-7="       -> "45"
  rev    reverse        "rev:abcd>"   -> "dcba"
  sort   sort letters   "sort:dbca>"  -> "abcd"
  shift  next letter    "shift:abz>"  -> "bca"
  rot    rotate left    "rot:abcd>"   -> "bcda"
  dbl    double each    "dbl:abc>"    -> "aabbcc"     (3-5 letters)
  max    largest letter "max:dbca>"   -> "d"
  copy   copy (base pretraining only)  "abcd|" -> "abcd", "52|" -> "52"

`distinct` tasks each have their own prompt format (the table above). `conflict` tasks share one
format, "{letters}>": the same prompt "dbca>" must become "acbd" for rev, "abcd" for sort, "ecdb"
for shift and "bcad" for rot, so no single model can serve two of them.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(ch) + 1) % 26] for ch in s)


# op -> (kind, answer function); kind "letters" fills {s}, kind "numbers" fills {a} and {b}
OPS: dict[str, tuple[str, Callable[..., str]]] = {
    "add": ("numbers", lambda a, b: str(a + b)),
    "sub": ("numbers", lambda a, b: str(a - b)),
    "rev": ("letters", lambda s: s[::-1]),
    "sort": ("letters", lambda s: "".join(sorted(s))),
    "shift": ("letters", _shift),
    "rot": ("letters", lambda s: s[1:] + s[0]),
    "dbl": ("letters", lambda s: "".join(ch + ch for ch in s)),
    "max": ("letters", lambda s: max(s)),
    "copy": ("letters", lambda s: s),
    "copy_num": ("numbers", lambda a, b: str(a)),
}


@dataclass(frozen=True)
class Task:
    """One task: an operation and the prompt template it is asked in."""

    name: str
    op: str
    template: str  # e.g. "rev:{s}>" or "{a}+{b}="

    def sample(self, rng: random.Random) -> dict[str, str]:
        kind, fn = OPS[self.op]
        if kind == "numbers":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if self.op == "sub" and a < b:
                a, b = b, a
            return {"prompt": self.template.format(a=a, b=b), "answer": fn(a, b)}
        n = rng.randint(3, 5 if self.op == "dbl" else 7)
        s = "".join(rng.sample(LETTERS, n))
        return {"prompt": self.template.format(s=s), "answer": fn(s)}


DISTINCT_TEMPLATES = {"add": "{a}+{b}=", "sub": "{a}-{b}=", "rev": "rev:{s}>",
                      "sort": "sort:{s}>", "shift": "shift:{s}>", "rot": "rot:{s}>",
                      "dbl": "dbl:{s}>", "max": "max:{s}>"}
DISTINCT_TASKS = {op: Task(op, op, t) for op, t in DISTINCT_TEMPLATES.items()}
CONFLICT_TASKS = {op: Task(op, op, "{s}>") for op in ("rev", "sort", "shift", "rot")}
BASE_TASKS = {"copy": Task("copy", "copy", "{s}|"),
              "copy_num": Task("copy_num", "copy_num", "{a}|")}
ALL_TASKS = {"distinct": DISTINCT_TASKS, "conflict": CONFLICT_TASKS, "base": BASE_TASKS}


def make_splits(task: Task, seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits by prompt: held-out splits (in `sizes` order after train) first, then train.

    `sizes` maps split name -> count, e.g. {"train": 20000, "validation": 200, "eval": 200}.
    Held-out prompts are unique; train never contains a held-out prompt.
    """
    rng = random.Random(f"{seed}:{task.name}:{task.template}")  # str seeds are stable across runs
    splits: dict[str, list[dict[str, str]]] = {}
    held: set[str] = set()
    for split in [s for s in sizes if s != "train"]:
        rows: list[dict[str, str]] = []
        splits[split] = rows
        while len(rows) < sizes[split]:
            ex = task.sample(rng)
            if ex["prompt"] not in held:
                held.add(ex["prompt"])
                rows.append(ex)
    train: list[dict[str, str]] = []
    splits["train"] = train
    while len(train) < sizes.get("train", 0):
        ex = task.sample(rng)
        if ex["prompt"] not in held:
            train.append(ex)
    return splits


def write_jsonl(rows: list[dict[str, str]], file: Path) -> None:
    with open(file, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
