"""The task router: a fastText-style classifier from a prompt's tokens to the expert that fits it.

Features are the prompt's token ids plus hashed token bigrams, read with the model's own tokenizer
so the exported graph can route from `input_ids` alone. The model is an embedding table, masked
mean pooling and one linear layer: small enough to train on a CPU in seconds and to compile into
the ONNX graph as a handful of nodes. `route` (NumPy) is the reference the graph must match.

Stored in the artifact as `router.safetensors` (router.embedding [V + buckets, D], router.weight
[N, D], router.bias [N]) plus a `router` section in the manifest with held-out accuracy and the
confusion matrix.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chmc.compiler.artifact import MANIFEST, expert_names, read_manifest
from chmc.errors import ChmcError

ROUTER_FILE = "router.safetensors"


@dataclass(frozen=True)
class RouterConfig:
    """Hyper-parameters; the defaults train in seconds on two CPU cores."""

    dim: int = 32
    buckets: int = 4096  # hashed bigram slots beyond the vocabulary
    epochs: int = 10
    lr: float = 0.05
    holdout: float = 0.2
    seed: int = 0
    max_examples: int = 1000  # prompts used per expert (a random sample): more add little here


def features(input_ids: np.ndarray, attention_mask: np.ndarray, vocab: int,
             buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature ids [B, 2S-1] and their 0/1 weights: unigrams, then hashed bigrams of valid pairs."""
    ids = input_ids.astype(np.int64)  # [B, S]
    mask = attention_mask.astype(np.int64)  # [B, S]
    bigram = vocab + (ids[:, :-1] * vocab + ids[:, 1:]) % buckets  # [B, S-1]
    bigram_mask = mask[:, :-1] * mask[:, 1:]
    return np.concatenate([ids, bigram], axis=1), np.concatenate([mask, bigram_mask], axis=1)


def route(weights: dict[str, np.ndarray], input_ids: np.ndarray, attention_mask: np.ndarray,
          vocab: int, buckets: int) -> np.ndarray:
    """Reference routing: the expert id [B] with the highest router logit for each row."""
    feats, w = features(input_ids, attention_mask, vocab, buckets)
    emb = weights["router.embedding"][feats]  # [B, F, D]
    pooled = (emb * w[..., None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1)  # [B, D]
    logits = pooled @ weights["router.weight"].T + weights["router.bias"]  # [B, N]
    return logits.argmax(-1).astype(np.int64)


def read_prompts(file: Path) -> list[str]:
    """Prompts from a JSONL file of {"prompt": ...} (or {"text": ...}) objects."""
    from chmc.jsonl import read_jsonl

    prompts = []
    for i, record in read_jsonl(file, "router data file"):
        text = record.get("prompt", record.get("text"))
        if text is None:
            raise ChmcError(f"{file}:{i}: expected a JSON object with a 'prompt' field")
        prompts.append(str(text))
    if len(prompts) < 5:
        raise ChmcError(f"{file}: needs at least 5 example prompts, found {len(prompts)}")
    return prompts


def _encode(tokenizer: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [B, S], as the runtime pads (padding is masked out of the features)."""
    from chmc.runtime.generation import left_pad

    return left_pad([tokenizer.encode(p).ids or [0] for p in prompts], pad_id=0)


def train_router(tokenizer_file: Path, data: dict[str, Path], experts: list[str],
                 config: RouterConfig = RouterConfig()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on `data` ({expert: prompts.jsonl}); return weights and a report with held-out scores."""
    import torch
    from tokenizers import Tokenizer

    unknown = sorted(set(data) - set(experts))
    if unknown:
        raise ChmcError(f"router data names expert '{unknown[0]}', which is not one of {experts}")
    missing = [e for e in experts if e not in data]
    if missing:
        raise ChmcError(f"router data has no prompts for expert '{missing[0]}' (give NAME=prompts.jsonl for each of {experts})")
    if not tokenizer_file.is_file():
        raise ChmcError(f"{tokenizer_file}: the router needs the model's tokenizer.json")
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
    params = list(embedding.parameters()) + list(linear.parameters())
    opt = torch.optim.Adam(params, lr=config.lr)

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
            loss = torch.nn.functional.cross_entropy(logits(batch), torch.tensor([y for _, y in batch]))
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
    report = {
        "experts": experts,
        "vocab": vocab,
        "config": asdict(config),
        "train_examples": len(train),
        "heldout_examples": len(held),
        "heldout_accuracy": float((predicted == truth).mean()),
        "confusion": confusion.tolist(),  # rows: true expert, columns: routed expert
        "parameters": int(sum(v.size for v in weights.values())),
    }
    return weights, report


def add_router(artifact: str | Path, data: dict[str, Path], config: RouterConfig = RouterConfig()) -> dict[str, Any]:
    """Train a router for an artifact and store it there; files are replaced atomically."""
    from safetensors.numpy import save_file

    folder = Path(artifact)
    manifest = read_manifest(folder)
    weights, report = train_router(folder / "tokenizer.json", data, expert_names(manifest), config)
    tmp = folder / f".{ROUTER_FILE}.tmp"
    save_file(weights, str(tmp))
    manifest["router"] = {**report, "file": ROUTER_FILE}
    manifest_tmp = folder / f".{MANIFEST}.tmp"
    manifest_tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / ROUTER_FILE)
    os.replace(manifest_tmp, folder / MANIFEST)
    return report


def no_router(where: str | Path) -> ChmcError:
    """The error for expert 'auto' on a model without a router, saying how to add one."""
    return ChmcError(
        f"{where}: expert 'auto' needs a router, and this model has none: add one with "
        "`chmc router ARTIFACT --data NAME=prompts.jsonl ...` (or `chmc build ... --router-data`), "
        "then export again"
    )


def load_router(folder: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The stored router weights and manifest section; a clear error when there is none."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    manifest = read_manifest(folder)
    section = manifest.get("router")
    if section is None:
        raise no_router(folder)
    return load_file(str(folder / section["file"])), section


def route_prompts(folder: str | Path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """`route` with the router stored in an artifact: expert ids [B] for padded prompts [B, S]."""
    weights, section = load_router(folder)
    return route(weights, input_ids, attention_mask, section["vocab"], section["config"]["buckets"])


def router_graph(b: Any, weights: dict[str, np.ndarray], vocab: int, buckets: int,
                 input_ids: str, attention_mask: str, expert_id: str) -> str:
    """ONNX nodes (into GraphBuilder `b`) computing `route` on the graph's inputs; returns the
    resolved id [B]: the router's argmax where expert_id < 0, expert_id elsewhere.

    attention_mask [B, P+S] spans past and current tokens; the router reads its last S columns.
    At decode steps the runtime passes back the id it got, so the router's answer is unused there.
    """
    import torch

    big = np.iinfo(np.int64).max
    seq = b.op("Slice", b.op("Shape", input_ids), b.const([1]), b.const([2]))  # [1] = S
    mask = b.op("Slice", attention_mask, b.op("Neg", seq), b.const([big]), b.const([1]))  # [B, S]
    first, rest = b.const([0]), b.const([1])

    def pairs(x: str) -> tuple[str, str]:  # x[:, :-1], x[:, 1:]
        return (b.op("Slice", x, first, b.const([-1]), rest),
                b.op("Slice", x, rest, b.const([big]), rest))

    a, c = pairs(input_ids)
    bigram = b.op("Add", b.op("Mod", b.op("Add", b.op("Mul", a, b.const(vocab)), c),
                              b.const(buckets)), b.const(vocab))  # [B, S-1]
    ma, mc = pairs(mask)
    feats = b.op("Concat", input_ids, bigram, axis=1)  # [B, F]
    w = b.op("Cast", b.op("Concat", mask, b.op("Mul", ma, mc), axis=1), to=1)  # [B, F] float
    table = b.weight("router.embedding", torch.from_numpy(weights["router.embedding"]))
    emb = b.op("Gather", table, feats, axis=0)  # [B, F, D]
    total = b.op("ReduceSum", b.op("Mul", emb, b.op("Unsqueeze", w, b.const([-1]))),
                 b.const([1]), keepdims=0)  # [B, D]
    count = b.op("Max", b.op("ReduceSum", w, b.const([1]), keepdims=1), b.const(1.0, "float32"))
    linear = b.weight("router.weight.T", torch.from_numpy(weights["router.weight"].T.copy()))
    bias = b.weight("router.bias", torch.from_numpy(weights["router.bias"]))
    logits = b.op("Add", b.op("MatMul", b.op("Div", total, count), linear), bias)  # [B, N]
    routed = b.op("ArgMax", logits, axis=-1, keepdims=0)  # [B] int64
    return b.op("Where", b.op("Less", expert_id, b.const(0)), routed, expert_id)


def print_router_report(report: dict[str, Any]) -> None:
    """Held-out accuracy and the confusion matrix (rows: true expert, columns: routed) as a table."""
    from rich.console import Console
    from rich.table import Table

    experts = report["experts"]
    table = Table(title="router confusion (held out)")
    table.add_column("true \\ routed")
    for e in experts:
        table.add_column(e, justify="right")
    for e, row in zip(experts, report["confusion"]):
        table.add_row(e, *map(str, row))
    console = Console()
    console.print(table)
    console.print(f"router: held-out accuracy {100 * report['heldout_accuracy']:.1f}% on "
                  f"{report['heldout_examples']} prompts, {report['parameters']:,} parameters",
                  soft_wrap=True)
