"""Activation statistics for output-aware merging: per expert, the Gram matrix of every
channel-merged Linear's inputs, C = X^T X / tokens, over that expert's own calibration prompts.

`collect_grams` runs the expert in transformers layer by layer with forward hooks on the
nn.Linears whose weights are channel-merged tensors, accumulating X^T X (fp32 per batch, fp64
across batches; one forward pass per batch of prompts, no gradients), and writes the Grams to a
folder per expert: one safetensors file per decoder layer (fp32, divided by the token count so
experts with more or longer prompts do not outweigh the others) and grams.json mapping
tensor -> (file, key). Linears fed the same tensor (q/k/v, gate/up) share one Gram, stored once.
Embeddings have no Linear input (theirs is a one-hot token): they get no Gram, and the merge
treats a missing Gram as the identity, i.e. the weight-space rule (see regmean.py).

Prompt files are JSONL: {"prompt", "answer"} rows (the text is prompt + answer, as the expert
reads it when trained), {"text"} rows, or {"input_ids": [...]} rows of token ids.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from safetensors.torch import save_file

from chmc.compiler.grams import GRAMS_INDEX, GramFiles
from chmc.compiler.plan import BuildPlan
from chmc.errors import ChmcError
from chmc.formats.adapter import Adapter
from chmc.formats.checkpoint import Checkpoint, read_config
from chmc.formats.manifest import first_error
from chmc.jsonl import read_jsonl
from chmc.progress import Stages

MAX_PROMPTS = 256  # per expert: "a few hundred of its own prompts"
BATCH = 16  # sequences of equal length run together (no padding, so no masked tokens to skip)
GRAM_BLOCK = 352  # columns per block of the Gram's upper block triangle (symmetric: ~half the work)


class CalibrationRow(BaseModel):
    """One calibration line: {"prompt", "answer"}, {"text"} or {"input_ids"} (other keys are
    the user's own and ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    prompt: StrictStr | None = None
    answer: StrictStr = ""
    text: StrictStr | None = None
    input_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None


def read_sequences(file: Path, expert: Path, limit: int = MAX_PROMPTS) -> list[list[int]]:
    """The first `limit` prompts of a JSONL file as token id lists (the expert's tokenizer)."""
    vocab = int(read_config(Path(expert)).get("vocab_size") or 0)
    rows: list[CalibrationRow] = []
    for line_no, raw in read_jsonl(file, "calibration file"):
        if len(rows) >= limit:
            break
        try:
            row = CalibrationRow.model_validate(raw)
        except ValidationError as e:
            raise ChmcError(f"{file}:{line_no}: {first_error(e)}") from None
        if row.prompt is None and row.text is None and row.input_ids is None:
            raise ChmcError(f"{file}:{line_no}: expected a 'prompt', 'text' or 'input_ids' field")
        if row.input_ids is not None and vocab and max(row.input_ids, default=0) >= vocab:
            raise ChmcError(f"{file}:{line_no}: token id {max(row.input_ids)} is outside the "
                            f"expert's vocabulary ({vocab} tokens)")
        rows.append(row)
    if not rows:
        raise ChmcError(f"calibration file {file} has no prompts")
    if all(r.input_ids is not None for r in rows):
        return [list(r.input_ids or []) for r in rows]
    import transformers  # 0.6 s to import: only builds with text prompts pay it

    tok = transformers.AutoTokenizer.from_pretrained(str(expert))
    texts = [r.text or (r.prompt or "") + r.answer for r in rows]
    return [list(tok(t, add_special_tokens=False).input_ids) for t in texts]


def folder_of(expert: str | Path | Checkpoint | Adapter) -> Path:
    return expert.path if isinstance(expert, (Checkpoint, Adapter)) else Path(expert)


def load_model(expert: str | Path | Checkpoint | Adapter, device: str = "cpu") -> Any:
    """The expert's transformers model in float32 on `device`: from its folder, or for an adapter
    the base with the adapter's tensors folded in."""
    import transformers  # 0.6 s to import: only calibrated builds pay it

    path = expert.base.path if isinstance(expert, Adapter) else folder_of(expert)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if isinstance(expert, Adapter):
        model.load_state_dict({t: expert.tensor(t).float() for t in expert.changed}, strict=False)
    # transformers types its wrapped `to` as taking the model twice
    return model.to(torch.device(device)).eval()  # type: ignore[arg-type]


def check_device(device: str) -> str:
    """`device` if torch can run there, else a one-line error (before any work)."""
    if device == "cpu":
        return device
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ChmcError(f"--device {device}: " + (
            "expected cpu or cuda[:n]" if not device.startswith("cuda") else
            f"torch sees no CUDA device here (torch {torch.__version__}); use --device cpu"))
    return device


def collect_grams(expert: str | Path | Checkpoint | Adapter, sequences: list[list[int]],
                  out: str | Path, tensors: set[str], progress: bool = True,
                  device: str = "cpu") -> Path:
    """Run `expert` on `sequences` layer by layer and write C = X^T X / tokens for each Linear
    in `tensors` into the folder `out` (one safetensors file per decoder layer + grams.json).

    GPTQ's order: the embeddings' outputs for every batch are caught at the first decoder layer,
    then each layer runs on all batches with hooks on its own Linears only, its Grams are written
    and freed, and its outputs feed the next. One forward pass per batch in all; memory holds the
    batches' hidden states and one layer's Grams, never all of them. On a GPU (`device`), the
    model runs there and the Grams are summed there."""
    stages = Stages(progress)
    model = load_model(expert, device)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"tokens": 0, "tensors": {}}
    layers = model.model.layers
    with torch.inference_mode(), stages.bar(f"calibrating {folder_of(expert).name}",
                                            len(layers) + 1) as advance:
        batches = [b.to(device) for b in _equal_length_batches(sequences)]
        hidden, kwargs = _layer_inputs(model, batches)
        index["tokens"] = tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
        for i, layer in enumerate(layers):
            prefix = _module_name(model, layer)
            with _GramHooks(layer, prefix, tensors) as grams:
                for b, (h, kw) in enumerate(zip(hidden, kwargs)):
                    out_h = layer(h, **kw)
                    hidden[b] = out_h[0] if isinstance(out_h, tuple) else out_h
            _save(grams, folder / f"layer-{i:03d}.safetensors", tokens, index)
            advance(f"layer {i}")
        if "lm_head.weight" in tensors and isinstance(model.lm_head, torch.nn.Linear):
            with _GramHooks(model.lm_head, "lm_head", tensors) as grams:  # its input, no logits
                for h in hidden:
                    grams.accumulate("lm_head.weight", model.model.norm(h))
            _save(grams, folder / "head.safetensors", tokens, index)
        advance("lm_head")
    missing = sorted(t for t in tensors if _is_linear(model, t) and t not in index["tensors"])
    if missing:
        raise ChmcError(f"expert {folder_of(expert)}: calibration never reached '{missing[0]}'")
    (folder / GRAMS_INDEX).write_text(json.dumps(index, indent=1))
    return folder


class _Caught(Exception):
    pass


def _layer_inputs(model: Any, batches: list[torch.Tensor]) -> tuple[list[Any], list[dict]]:
    """Hidden states and keyword arguments (mask, rotary embeddings) the first decoder layer
    receives for each batch, caught by a pre-hook that stops the forward there."""
    hidden: list[Any] = []
    kwargs: list[dict[str, Any]] = []

    def catch(module: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise _Caught

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Caught):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


class _GramHooks:
    """Forward hooks summing X^T X on the Linears under `root` whose weights are in
    `tensors`; a Linear fed the very tensor the previous one got (q/k/v, gate/up) is an alias."""

    def __init__(self, root: Any, prefix: str, tensors: set[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self.last: tuple[Any, str] = (None, "")
        self.handles = []
        for name, m in root.named_modules():
            full = f"{prefix}.{name}.weight" if name else f"{prefix}.weight"
            if isinstance(m, torch.nn.Linear) and full in tensors:
                self.handles.append(m.register_forward_hook(self._hook(full)))

    def _hook(self, name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            if args[0] is self.last[0]:
                self.aliases[name] = self.last[1]
                return
            self.accumulate(name, args[0])
            self.last = (args[0], name)
        return hook

    def accumulate(self, name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        width = flat.shape[1]
        if name not in self.sums:
            self.sums[name] = torch.zeros(width, width, dtype=torch.float64, device=x.device)
        total = self.sums[name]  # the upper block triangle only: the Gram is symmetric
        for a in range(0, width, GRAM_BLOCK):  # (_save mirrors it)
            b = min(a + GRAM_BLOCK, width)  # fp32 products within a batch, fp64 sums across
            total[a:b, a:] += flat[:, a:b].T @ flat[:, a:]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _save(grams: _GramHooks, file: Path, tokens: int, index: dict[str, Any]) -> None:
    upper = {k: (v / tokens).float().cpu() for k, v in grams.sums.items()}
    save_file({k: v.triu() + v.triu(1).T for k, v in upper.items()}, str(file))  # mirrored
    for name in grams.sums:
        index["tensors"][name] = [file.name, name]
    for name, target in grams.aliases.items():
        index["tensors"][name] = [file.name, target]


def _module_name(model: Any, module: Any) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _is_linear(model: Any, tensor: str) -> bool:
    if not tensor.endswith(".weight"):
        return False
    module = dict(model.named_modules()).get(tensor.removesuffix(".weight"))
    return isinstance(module, torch.nn.Linear)


def _equal_length_batches(sequences: list[list[int]]) -> list[torch.Tensor]:
    """[B, S] id batches of at most BATCH sequences of one length, in a fixed order."""
    by_len: dict[int, list[list[int]]] = {}
    for s in sequences:
        if s:
            by_len.setdefault(len(s), []).append(s)
    return [torch.tensor(group[i : i + BATCH]) for length, group in sorted(by_len.items())
            for i in range(0, len(group), BATCH)]


def calibrate(plan: BuildPlan, folder: Path, stages: Stages, device: str = "cpu") -> BuildPlan:
    """A planning step: the plan with every expert's Grams (a given folder, or collected into
    `folder` from its .jsonl prompts, the experts run on `device`)."""
    if not plan.calibration:
        return plan
    folder.mkdir(exist_ok=True)
    merged = {t.name for t in plan.tasks if t.kind == "merged"}
    files = []
    for name, source in plan.calibration.items():
        if source.is_dir():
            files.append(source)
            continue
        ckpt = plan.experts[name]
        seqs = read_sequences(source, plan.base.path if isinstance(ckpt, Adapter) else ckpt.path)
        files.append(collect_grams(ckpt, seqs, folder / name, merged, stages.enabled, device))
    return plan.with_(gram_files=GramFiles(files))
