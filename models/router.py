"""The task router's inference half: from a prompt's token ids to the expert that fits it.

Features are the prompt's token ids plus hashed token bigrams, so a graph can route from
`input_ids` alone. The model is an embedding table, masked mean pooling and one linear layer.
`route` (NumPy) is the reference every backend matches: the ONNX graph's nodes
(chmc.compiler.router.router_graph) and the torch runtime's routing. Training lives in
chmc.compiler.router; the weights are stored in the artifact as `router.safetensors`
(router.embedding [V + buckets, D], router.weight [N, D], router.bias [N]) beside the manifest's
`router` section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chmc.errors import ChmcError
from chmc.formats.artifact import RouterSection, read_manifest

AUTO = "auto"  # the expert name that asks the model's router to pick
ROUTED = -1  # its expert id: the row is routed on its prompt, then keeps that expert
ROUTER_FILE = "router.safetensors"
Weights = dict[str, np.ndarray]


def features(input_ids: np.ndarray, attention_mask: np.ndarray, vocab: int,
             buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature ids [B, 2S-1] and their 0/1 weights: unigrams, then hashed bigrams of valid pairs."""
    ids = input_ids.astype(np.int64)  # [B, S]
    mask = attention_mask.astype(np.int64)  # [B, S]
    bigram = vocab + (ids[:, :-1] * vocab + ids[:, 1:]) % buckets  # [B, S-1]
    bigram_mask = mask[:, :-1] * mask[:, 1:]
    return np.concatenate([ids, bigram], axis=1), np.concatenate([mask, bigram_mask], axis=1)


def route(weights: Weights, input_ids: np.ndarray, attention_mask: np.ndarray, vocab: int,
          buckets: int) -> np.ndarray:
    """Reference routing: the expert id [B] with the highest router logit for each row."""
    feats, w = features(input_ids, attention_mask, vocab, buckets)
    emb = weights["router.embedding"][feats]  # [B, F, D]
    pooled = (emb * w[..., None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1)  # [B, D]
    logits = pooled @ weights["router.weight"].T + weights["router.bias"]  # [B, N]
    return logits.argmax(-1).astype(np.int64)


def no_router(where: str | Path) -> ChmcError:
    """The error for expert 'auto' on a model without a router, saying how to add one."""
    return ChmcError(
        f"{where}: expert 'auto' needs a router, and this model has none: add one with "
        "`chmc router ARTIFACT --data NAME=prompts.jsonl ...` (or `chmc build ... --router-data`), "
        "then export again"
    )


class Router:
    """A stored router: its weights and manifest section, routing padded prompts."""

    def __init__(self, folder: Path, section: RouterSection | None):
        # safetensors only where weights are read: the ONNX Runtime path routes inside the graph
        from safetensors.numpy import load_file

        if section is None:
            raise no_router(folder)
        file = folder / section.file
        if not file.is_file():
            raise ChmcError(f"{file}: the router named by the manifest is missing")
        self.section = section
        self.weights: Weights = load_file(str(file))

    @classmethod
    def of_artifact(cls, folder: str | Path) -> Router:
        """The router stored in an artifact folder (a one-line error when it has none)."""
        return cls(Path(folder), read_manifest(folder).router)

    def route(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Expert ids [B] for left-padded prompts [B, S]."""
        return route(self.weights, input_ids, attention_mask, self.section.vocab,
                     self.section.config.buckets)

    def resolve(self, expert_ids: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> np.ndarray:
        """expert_ids [B] with the ROUTED rows routed on their prompts."""
        if not (expert_ids < 0).any():
            return expert_ids
        return np.where(expert_ids < 0, self.route(input_ids, attention_mask), expert_ids)
