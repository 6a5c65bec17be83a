"""Activation statistics for output-aware merging: per expert, the Gram matrix of every
channel-merged Linear's inputs, C = X^T X / tokens, over that expert's own calibration prompts.

`collect_grams` runs the expert in transformers with a forward hook on each nn.Linear whose weight
is a channel-merged tensor, accumulating X^T X in fp64 (one forward pass per batch of prompts, no
gradients), and writes the Grams to one safetensors file per expert (fp32, divided by the token
count so experts with more or longer prompts do not outweigh the others). Linears fed the same
tensor (q/k/v, gate/up) share one Gram; the file stores it once and lists the others as aliases in
its metadata. Embeddings have no Linear input (theirs is a one-hot token): they get no Gram, and
the merge treats a missing Gram as the identity, i.e. the weight-space rule (see regmean.py).

Prompt files are JSONL: {"prompt", "answer"} rows (the text is prompt + answer, as the expert
reads it when trained), {"text"} rows, or {"input_ids": [...]} rows of token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch

MAX_PROMPTS = 256  # per expert: "a few hundred of its own prompts"
BATCH = 16  # sequences of equal length run together (no padding, so no masked tokens to skip)


def read_sequences(file: Path, expert: Path, limit: int = MAX_PROMPTS) -> list[list[int]]:
    """The first `limit` prompts of a JSONL file as token id lists (the expert's tokenizer)."""
    rows: list[dict[str, Any]] = []
    if not file.is_file():
        raise ChmcError(f"calibration file {file} does not exist")
    with file.open() as f:
        for line_no, line in enumerate(f, 1):
            if len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChmcError(f"{file}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ({"prompt", "text", "input_ids"} & set(row)):
                raise ChmcError(f"{file}:{line_no}: expected a 'prompt', 'text' or 'input_ids' field")
            rows.append(row)
    if not rows:
        raise ChmcError(f"calibration file {file} has no prompts")
    if all("input_ids" in r for r in rows):
        return [[int(t) for t in r["input_ids"]] for r in rows]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(expert))
    texts = [r.get("text") or r.get("prompt", "") + r.get("answer", "") for r in rows]
    return [list(tok(t, add_special_tokens=False).input_ids) for t in texts]


def collect_grams(expert: str | Path, sequences: list[list[int]], out_file: str | Path,
                  tensors: set[str], progress: bool = True) -> Path:
    """Run `expert` on `sequences` and write C = X^T X / tokens for each Linear in `tensors`."""
    import torch
    import transformers
    from rich.progress import Progress
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(str(expert), dtype=torch.float32)
    model.eval()
    grams: dict[str, torch.Tensor] = {}  # canonical name -> [in, in] fp64 sum
    aliases: dict[str, str] = {}  # tensor name -> canonical name whose input it shares
    last: list[Any] = [None, ""]  # (input tensor, canonical name) of the latest hook call

    def hook(name: str):
        def accumulate(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if x is last[0]:  # same input as the previous Linear (q/k/v, gate/up)
                aliases[name] = last[1]
                return
            flat = x.reshape(-1, x.shape[-1]).double()  # [tokens, in]
            if name not in grams:
                grams[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
            grams[name].addmm_(flat.T, flat)
            last[0], last[1] = x, name
        return accumulate

    handles = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and f"{n}.weight" in tensors]
    batches = _equal_length_batches(sequences)
    tokens = 0
    try:
        with torch.inference_mode(), Progress(transient=True, disable=not progress) as bar:
            job = bar.add_task(f"calibrating {Path(expert).name}", total=len(batches))
            for ids in batches:
                last[0] = None
                model(input_ids=ids, use_cache=False)
                tokens += ids.numel()
                bar.advance(job)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(t for t in tensors if t.endswith(".weight") and _is_linear(model, t)
                     and t not in grams and t not in aliases)
    if missing:
        raise ChmcError(f"expert {expert}: calibration never reached '{missing[0]}'")
    out = Path(out_file)
    save_file({k: (v / tokens).float() for k, v in grams.items()}, str(out),
              metadata={"aliases": json.dumps(aliases), "tokens": str(tokens)})
    return out


def _is_linear(model: Any, tensor: str) -> bool:
    import torch

    module = dict(model.named_modules()).get(tensor.removesuffix(".weight"))
    return isinstance(module, torch.nn.Linear)


def _equal_length_batches(sequences: list[list[int]]) -> list[torch.Tensor]:
    """[B, S] id batches of at most BATCH sequences of one length, in a fixed order."""
    import torch

    by_len: dict[int, list[list[int]]] = {}
    for s in sequences:
        if s:
            by_len.setdefault(len(s), []).append(s)
    return [torch.tensor(group[i : i + BATCH]) for length, group in sorted(by_len.items())
            for i in range(0, len(group), BATCH)]


class GramFiles:
    """Per-expert Gram files, read one tensor at a time: grams(name) -> [N, in, in] or None."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self.aliases: list[dict[str, str]] = []
        self.names: list[set[str]] = []
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
                self.aliases.append(json.loads(meta.get("aliases", "{}")))
                self.names.append(set(h.keys()))

    def grams(self, tensor: str) -> torch.Tensor | None:
        import torch
        from safetensors import safe_open

        found: list[torch.Tensor | None] = []
        for f, aliases, names in zip(self.files, self.aliases, self.names):
            key = aliases.get(tensor, tensor)
            if key not in names:
                found.append(None)
                continue
            with safe_open(str(f), framework="pt") as h:
                found.append(h.get_tensor(key))
        if all(g is None for g in found):
            return None  # no Linear input (embeddings): the identity, the weight-space rule
        if any(g is None for g in found):
            bad = self.files[[g is None for g in found].index(True)]
            raise ChmcError(f"calibration statistics {bad} lack tensor '{tensor}'")
        return torch.stack([g for g in found if g is not None])  # [N, in, in]
