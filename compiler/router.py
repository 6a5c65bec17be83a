"""Training the task router (expert 'auto') and emitting it into the ONNX graph.

The model and its reference routing are chmc.models.router: a fastText-style classifier over
the prompt's token ids and hashed bigrams (embedding, masked mean, one linear layer), small
enough to train on a CPU in seconds and to compile into the graph as a handful of nodes. 20% of
the prompts are held out: the manifest's `router` section keeps their accuracy and confusion.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from chmc.errors import ChmcError
from chmc.formats.artifact import MANIFEST, RouterConfig, RouterSection, read_manifest
from chmc.formats.checkpoint import TOKENIZER
from chmc.formats.manifest import write_json
from chmc.jsonl import read_jsonl
from chmc.models.inputs import left_pad
from chmc.models.router import ROUTER_FILE, Weights, features, route

MIN_PROMPTS = 5


def read_prompts(file: Path) -> list[str]:
    """Prompts from a JSONL file of {"prompt": ...} (or {"text": ...}) objects."""
    prompts = []
    for i, record in read_jsonl(file, "router data file"):
        text = record.get("prompt", record.get("text"))
        if text is None:
            raise ChmcError(f"{file}:{i}: expected a JSON object with a 'prompt' field")
        prompts.append(str(text))
    if len(prompts) < MIN_PROMPTS:
        raise ChmcError(f"{file}: needs at least {MIN_PROMPTS} example prompts, "
                        f"found {len(prompts)}")
    return prompts


def _encode(tokenizer: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [B, S], as the runtime pads (padding is masked out of the
    features)."""
    return left_pad([tokenizer.encode(p).ids or [0] for p in prompts], pad_id=0)


def train_router(tokenizer_file: Path, data: dict[str, Path], experts: list[str],
                 config: RouterConfig | None = None) -> tuple[Weights, RouterSection]:
    """Train on `data` ({expert: prompts.jsonl}); the weights and the manifest section with the
    held-out scores."""
    config = config or RouterConfig()
    unknown = sorted(set(data) - set(experts))
    if unknown:
        raise ChmcError(f"router data names expert '{unknown[0]}', which is not one of {experts}")
    missing = [e for e in experts if e not in data]
    if missing:
        raise ChmcError(f"router data has no prompts for expert '{missing[0]}' (give "
                        f"NAME=prompts.jsonl for each of {experts})")
    if not tokenizer_file.is_file():
        raise ChmcError(f"{tokenizer_file}: the router needs the model's {TOKENIZER}")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab = tokenizer.get_vocab_size()

    rng = random.Random(config.seed)
    train, held = [], []
    for label, name in enumerate(experts):
        prompts = read_prompts(Path(data[name]))
        rng.shuffle(prompts)
        prompts = prompts[: config.max_examples]
        n_held = max(1, int(len(prompts) * config.holdout))
        held += [(p, label) for p in prompts[:n_held]]
        train += [(p, label) for p in prompts[n_held:]]

    torch.manual_seed(config.seed)
    embedding = torch.nn.Embedding(vocab + config.buckets, config.dim)
    linear = torch.nn.Linear(config.dim, len(experts))
    opt = torch.optim.Adam([*embedding.parameters(), *linear.parameters()], lr=config.lr)

    def logits(batch: list[tuple[str, int]]) -> torch.Tensor:
        ids, mask = _encode(tokenizer, [p for p, _ in batch])
        feats, w = features(ids, mask, vocab, config.buckets)
        w_t = torch.from_numpy(w).float()  # [B, F]
        emb = embedding(torch.from_numpy(feats))  # [B, F, D]
        pooled = (emb * w_t[..., None]).sum(1) / w_t.sum(1, keepdim=True).clamp(min=1)
        return linear(pooled)

    order = list(range(len(train)))
    for _ in range(config.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), 64):
            batch = [train[i] for i in order[start : start + 64]]
            loss = torch.nn.functional.cross_entropy(logits(batch),
                                                     torch.tensor([y for _, y in batch]))
            opt.zero_grad()
            loss.backward()
            opt.step()

    weights = {
        "router.embedding": embedding.weight.detach().numpy().astype(np.float32),
        "router.weight": linear.weight.detach().numpy().astype(np.float32),
        "router.bias": linear.bias.detach().numpy().astype(np.float32),
    }
    ids, mask = _encode(tokenizer, [p for p, _ in held])
    predicted = route(weights, ids, mask, vocab, config.buckets)
    truth = np.array([y for _, y in held])
    confusion = np.zeros((len(experts), len(experts)), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    section = RouterSection(
        experts=experts, vocab=vocab, config=config, train_examples=len(train),
        heldout_examples=len(held), heldout_accuracy=float((predicted == truth).mean()),
        confusion=confusion.tolist(), parameters=int(sum(v.size for v in weights.values())),
        file=ROUTER_FILE)
    return weights, section


def add_router(artifact: str | Path, data: dict[str, Path],
               config: RouterConfig | None = None) -> RouterSection:
    """Train a router for an artifact and store it there; files are replaced atomically."""
    folder = Path(artifact)
    manifest = read_manifest(folder)
    weights, section = train_router(folder / TOKENIZER, data, manifest.expert_names, config)
    tmp = folder / f".{ROUTER_FILE}.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, folder / ROUTER_FILE)
    write_json(folder / MANIFEST, manifest.model_copy(update={"router": section}))
    return section


def router_graph(g: Any, expert_id: str, weights: Weights, section: RouterSection) -> str:
    """ONNX nodes (into GraphBuilder `g`) computing `route` on the graph's inputs; returns the
    resolved id [B]: the router's argmax where expert_id < 0, expert_id elsewhere.

    attention_mask [B, P+S] spans past and current tokens; the router reads its last S columns.
    At decode steps the runtime passes back the id it got, so the router's answer is unused there.
    """
    vocab, buckets = section.vocab, section.config.buckets
    big = np.iinfo(np.int64).max
    seq = g.op("Slice", g.op("Shape", "input_ids"), g.const([1]), g.const([2]))  # [1] = S
    mask = g.op("Slice", "attention_mask", g.op("Neg", seq), g.const([big]), g.const([1]))
    first, rest = g.const([0]), g.const([1])

    def pairs(x: str) -> tuple[str, str]:  # x[:, :-1], x[:, 1:]
        return (g.op("Slice", x, first, g.const([-1]), rest),
                g.op("Slice", x, rest, g.const([big]), rest))

    a, c = pairs("input_ids")
    bigram = g.op("Add", g.op("Mod", g.op("Add", g.op("Mul", a, g.const(vocab)), c),
                              g.const(buckets)), g.const(vocab))  # [B, S-1]
    ma, mc = pairs(mask)
    feats = g.op("Concat", "input_ids", bigram, axis=1)  # [B, F]
    w = g.op("Cast", g.op("Concat", mask, g.op("Mul", ma, mc), axis=1), to=1)  # [B, F] float
    table = g.weight("router.embedding", torch.from_numpy(weights["router.embedding"]))
    emb = g.op("Gather", table, feats, axis=0)  # [B, F, D]
    total = g.op("ReduceSum", g.op("Mul", emb, g.op("Unsqueeze", w, g.const([-1]))),
                 g.const([1]), keepdims=0)  # [B, D]
    count = g.op("Max", g.op("ReduceSum", w, g.const([1]), keepdims=1), g.const(1.0, "float32"))
    linear = g.weight("router.weight.T", torch.from_numpy(weights["router.weight"].T.copy()))
    bias = g.weight("router.bias", torch.from_numpy(weights["router.bias"]))
    logits = g.op("Add", g.op("MatMul", g.op("Div", total, count), linear), bias)  # [B, N]
    routed = g.op("ArgMax", logits, axis=-1, keepdims=0)  # [B] int64
    return str(g.op("Where", g.op("Less", expert_id, g.const(0)), routed, expert_id))


def print_router_report(section: RouterSection) -> None:
    """Held-out accuracy and the confusion matrix (rows: true expert, columns: routed) as a
    table."""
    table = Table(title="router confusion (held out)")
    table.add_column("true \\ routed")
    for e in section.experts:
        table.add_column(e, justify="right")
    for e, row in zip(section.experts, section.confusion):
        table.add_row(e, *map(str, row))
    console = Console()
    console.print(table)
    console.print(f"router: held-out accuracy {100 * section.heldout_accuracy:.1f}% on "
                  f"{section.heldout_examples} prompts, {section.parameters:,} parameters",
                  soft_wrap=True)
