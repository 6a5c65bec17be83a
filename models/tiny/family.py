"""Trained tiny expert families: a deterministic recipe -> real Hugging Face base + expert folders.

A `Recipe` fixes everything (tasks, model size, steps, seeds). The base LlamaForCausalLM is first
pretrained on a copy mixture (tasks.BASE_TASKS) so the experts share a real starting point, then
each expert is fully fine-tuned from it on its own task. The result is cached under
$CHMC_CACHE (default ~/.cache/chmc) in families/<name>-<recipe hash>/, so a second build is instant
(CHMC_TRAIN_THREADS sets torch's threads, default 1; it changes only float rounding):
  family.json                 recipe, hash, build seconds, own-task validation accuracy
  base/, experts/<task>/      save_pretrained folders (safetensors) + char tokenizer
  tasks/<task>/{train,validation,eval}.jsonl
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers

from chmc.cache import cache_root
from chmc.errors import ChmcError
from chmc.formats.outputs import staged_output
from chmc.models.reference import greedy
from chmc.models.tiny.tasks import ALL_TASKS, BASE_TASKS, Task, make_splits, write_jsonl
from chmc.models.tiny.tokenizer import EOS_ID, PAD_ID, VOCAB, encode, save_tokenizer
from chmc.progress import Stages

RECIPE_VERSION = 1  # bump when the training code changes what a recipe produces
LATER_FIELDS = ("base_task_shares", "expert_lr", "max_delta")
SPLITS = ("train", "validation", "eval")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a family; its hash names the cache folder."""

    name: str
    kind: str  # "distinct" | "conflict": which task table (tasks.ALL_TASKS) the tasks come from
    tasks: tuple[str, ...]
    seed: int = 0
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    base_steps: int = 400
    expert_steps: int = 1500  # a cap: experts stop once validation reaches target
    batch: int = 64
    lr: float = 2e-3
    n_train: int = 20000
    n_validation: int = 200
    n_eval: int = 200
    check_every: int = 100  # experts stop early once validation exact match reaches `target`
    target: float = 0.99
    # The fine-tune regime: the base also sees the family's own tasks ({task: share of its
    # training rows}), then each expert fine-tunes briefly at `expert_lr`, so experts stay within
    # a few percent of the base, as real fine-tunes do. Empty / None: experts learn from scratch.
    base_task_shares: dict[str, float] = field(default_factory=dict)
    expert_lr: float | None = None
    # A trust region: after each expert step, a 2-D tensor further than max_delta x its base's
    # norm from the base is pulled back onto that sphere. The learning rate alone did not bound
    # it on every CPU (the same recipe's distinct-ft add expert moved lm_head 9.7% on one, 13.7%
    # on another: the bases' floats differ, so the expert's steps do).
    max_delta: float | None = None

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        for f in LATER_FIELDS:  # added after families were cached: hashed only when set
            if not fields[f]:
                del fields[f]
        blob = json.dumps({"version": RECIPE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def task_objects(self) -> dict[str, Task]:
        table = ALL_TASKS[self.kind]
        return {t: table[t] for t in self.tasks}


RECIPES = {
    # addition needs the most steps (0.98 validation at 1500); the higher cap keeps it >= 95%
    "distinct": Recipe("distinct", "distinct", ("add", "rev", "sort", "shift"), expert_steps=2500),
    "conflict": Recipe("conflict", "conflict", ("rev", "sort", "shift", "rot")),
    "distinct8": Recipe("distinct8", "distinct",
                        ("add", "rev", "sort", "shift", "sub", "rot", "dbl", "max"),
                        expert_steps=2500),
}
# The fine-tune regime. Each task's share of the base's rows is set so that the base is mediocre
# at it (validation exact match about 0.6-0.95: addition needs a much larger share than the
# letter tasks to get there), and an expert fine-tuned briefly at a low rate masters it while each
# 2-D tensor moves 1-10% of the base's norm. conflict's tasks share one prompt format, so its base
# cannot be good at all of them whatever the shares.
FT_SHARES = {
    "distinct": {"add": 0.19, "rev": 0.012, "sort": 0.025, "shift": 0.008},
    "conflict": {"rev": 0.15, "sort": 0.15, "shift": 0.15, "rot": 0.15},
    "distinct8": {"add": 0.19, "sub": 0.19, "rev": 0.012, "sort": 0.025, "shift": 0.008,
                  "rot": 0.008, "dbl": 0.008, "max": 0.008},
}
FT_BASE_STEPS = {"distinct": 3000, "conflict": 6000, "distinct8": 4000}
# At 3e-4, distinct-ft's shift and add experts moved single tensors 11.4% and 10.9%
FT_EXPERT_LR = {"distinct": 2e-4, "conflict": 3e-4, "distinct8": 2e-4}
for _name, _shares in FT_SHARES.items():
    RECIPES[f"{_name}-ft"] = dataclasses.replace(
        RECIPES[_name], name=f"{_name}-ft", base_steps=FT_BASE_STEPS[_name],
        base_task_shares=_shares, expert_steps=600, expert_lr=FT_EXPERT_LR[_name],
        check_every=50, max_delta=0.09)


@dataclass
class Family:
    """A built family on disk."""

    path: Path
    recipe: Recipe
    info: dict[str, Any]

    @property
    def base(self) -> Path:
        return self.path / "base"

    @property
    def experts(self) -> dict[str, Path]:
        return {t: self.path / "experts" / t for t in self.recipe.tasks}

    @property
    def tasks(self) -> dict[str, dict[str, Path]]:
        return {t: {s: self.path / "tasks" / t / f"{s}.jsonl" for s in SPLITS}
                for t in self.recipe.tasks}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ChmcError(f"unknown family '{name}': choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def load_family(path: str | Path) -> Family:
    path = Path(path)
    file = path / "family.json"
    if not file.is_file():
        raise ChmcError(f"{path}: not a chmc tiny family (no family.json)")
    info = json.loads(file.read_text())
    return Family(path, Recipe(**{**info["recipe"], "tasks": tuple(info["recipe"]["tasks"])}), info)


def family(recipe: Recipe | str, out: str | Path | None = None, *, force: bool = False,
           progress: bool = True) -> Family:
    """The family for `recipe`: loaded from `out` (default: the cache) or built there first."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    out = Path(out) if out else cache_root() / "families" / f"{recipe.name}-{recipe.digest()}"
    if (out / "family.json").is_file() and not force:
        found = load_family(out)
        if found.recipe.digest() != recipe.digest():
            raise ChmcError(f"{out}: holds family recipe {found.recipe.digest()}, not "
                            f"{recipe.digest()} (pass --force to rebuild)")
        return found
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(out, force=force or out.exists()) as tmp:
        build(recipe, tmp, progress=progress)
    return load_family(out)


def write_tasks(recipe: Recipe, folder: Path) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Write each task's JSONL splits under folder/tasks and return them."""
    sizes = {"validation": recipe.n_validation, "eval": recipe.n_eval, "train": recipe.n_train}
    data = {}
    for name, task in recipe.task_objects().items():
        data[name] = make_splits(task, recipe.seed, sizes)
        (folder / "tasks" / name).mkdir(parents=True)
        for split in SPLITS:
            write_jsonl(data[name][split], folder / "tasks" / name / f"{split}.jsonl")
    return data


def build(recipe: Recipe, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Pretrain the base, fine-tune one expert per task, save everything into `folder`."""
    # One thread: as fast for these tiny models, no spinning on a shared machine, and the same
    # floats as the tests' builds (a -ft expert's few steps are sensitive to its base's rounding).
    torch.set_num_threads(int(os.environ.get("CHMC_TRAIN_THREADS", "1")))
    start = time.time()
    data = write_tasks(recipe, folder)
    base_rows = [r for t in BASE_TASKS.values()
                 for r in make_splits(t, recipe.seed, {"train": recipe.n_train})["train"]]
    copy_rows = len(base_rows)
    total_share = sum(recipe.base_task_shares.values())
    for task, share in recipe.base_task_shares.items():  # each task's train rows, at its share
        count = round(copy_rows * share / (1 - total_share))
        base_rows += random.Random(recipe.seed).choices(data[task]["train"], k=count)
    torch.manual_seed(recipe.seed)
    model = new_model(recipe)
    train(model, base_rows, recipe, recipe.base_steps, seed=recipe.seed, desc="base",
          progress=progress)
    save_model(model, folder / "base")
    base_accuracy = {name: exact_match(model, s["validation"]) for name, s in data.items()}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = {}
    for i, (name, splits) in enumerate(data.items()):
        model.load_state_dict(base_state)
        val = splits["validation"]
        steps = train(model, splits["train"], recipe, recipe.expert_steps, seed=recipe.seed + 1 + i,
                      desc=f"expert {name}", check=partial(exact_match, rows=val),
                      progress=progress, lr=recipe.expert_lr,
                      anchor=base_state if recipe.max_delta else None)
        save_model(model, folder / "experts" / name)
        accuracy[name] = {"validation": exact_match(model, val), "steps": steps,
                          "delta": delta_stats(base_state, model.state_dict())}
    info = {"recipe": dataclasses.asdict(recipe), "hash": recipe.digest(),
            "build_seconds": round(time.time() - start, 1), "base": {"validation": base_accuracy},
            "experts": accuracy}
    (folder / "family.json").write_text(json.dumps(info, indent=2))
    return info


def delta_stats(base: dict[str, Any], expert: dict[str, Any]) -> dict[str, Any]:
    """||expert - base|| / ||base|| per 2-D tensor: its min, median and max, and each tensor's."""
    rel = {n: float((expert[n] - w).norm() / w.norm()) for n, w in base.items() if w.dim() == 2}
    ordered = sorted(rel.values())
    return {"min": round(ordered[0], 4), "median": round(ordered[len(ordered) // 2], 4),
            "max": round(ordered[-1], 4), "per_tensor": {n: round(r, 4) for n, r in rel.items()}}


def exact_match(model: Any, rows: list[dict[str, str]]) -> float:
    """Greedy exact match (as runtime/evaluate.py scores it) with the built-in tokenizer."""
    outs = greedy(model.eval(), [encode(r["prompt"]) for r in rows],
                  max(len(r["answer"]) for r in rows) + 2, EOS_ID, PAD_ID)
    return sum(encode(r["answer"]) == o for r, o in zip(rows, outs)) / len(rows)


def new_model(recipe: Recipe) -> Any:
    config = transformers.LlamaConfig(
        hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads, intermediate_size=recipe.intermediate,
        vocab_size=len(VOCAB), max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return transformers.LlamaForCausalLM(config)


def save_model(model: Any, folder: Path) -> None:
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(folder)
    save_tokenizer(folder)


def _batch(rows: list[tuple[list[int], list[int]]]) -> tuple[Any, Any]:
    """Right-padded ids and labels [B, S]; only answer tokens (and EOS) carry a loss."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def train(model: Any, rows: list[dict[str, str]], recipe: Recipe, steps: int, *, seed: int,
          desc: str, check: Callable[[Any], float] | None = None, progress: bool = True,
          lr: float | None = None, anchor: dict[str, torch.Tensor] | None = None) -> int:
    """Full fine-tune with AdamW, linear warm-up then decay, seeded batches; returns steps run.

    With `check` (validation exact match), stop once it reaches recipe.target; with `anchor`
    (the base's state), every 2-D tensor stays within recipe.max_delta of it (relative norm).
    """
    encoded = [(encode(r["prompt"]), encode(r["answer"]) + [EOS_ID]) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr or recipe.lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.05, (steps - s) / (steps - warm + 1))))
    project = (_projection(model, anchor, recipe.max_delta)
               if anchor is not None and recipe.max_delta else None)
    model.train()
    step = 0
    with Stages(progress).bar(f"training {desc}", steps) as advance:
        for step in range(1, steps + 1):
            if _train_step(model, encoded, recipe, gen, opt, sched, step, check, project):
                break
            advance(f"step {step}")
    model.eval()
    return step


def _projection(model: Any, anchor: dict[str, torch.Tensor],
                max_delta: float) -> Callable[[], None]:
    """A step's trust region: every 2-D parameter further than max_delta x its anchor's norm from
    the anchor is pulled back onto that sphere (radii computed once, not per step)."""
    region = [(w, anchor[name], max_delta * float(anchor[name].norm()))
              for name, w in model.named_parameters() if w.ndim == 2]

    @torch.no_grad()
    def project() -> None:
        for w, w0, radius in region:
            moved = float((w - w0).norm())
            if moved > radius:
                w.copy_(w0 + (w - w0) * (radius / moved))
    return project


def _train_step(model: Any, encoded: list[tuple[list[int], list[int]]], recipe: Recipe,
                gen: torch.Generator, opt: Any, sched: Any, step: int,
                check: Callable[[Any], float] | None,
                project: Callable[[], None] | None = None) -> bool:
    """One optimiser step; True when the validation check says the target is reached."""
    pick = torch.randint(len(encoded), (recipe.batch,), generator=gen).tolist()
    ids, labels = _batch([encoded[j] for j in pick])  # [B, S]
    model(input_ids=ids, labels=labels).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if project is not None:
        project()
    if check is not None and step % recipe.check_every == 0:
        if check(model) >= recipe.target:
            return True
        model.train()
    return False
