"""PyTorch backend, two ways to serve an artifact without exporting:
  - experts (the CPU default): each expert reconstructed (bank[index[n, c], c] per row) into a
    transformers model, cached per expert, rows grouped by expert. The reference the ONNX graph
    is checked against.
  - merged (the CUDA default, `merged=True` elsewhere): one model reads the banks directly, the
    expert chosen per batch row (chmc.runtime.torch_merged: Triton kernels, CUDA-graph decode).
A plain checkpoint is served as it is, in transformers."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from chmc.errors import ChmcError
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import Checkpoint
from chmc.formats.folders import open_folder
from chmc.models.router import Router, no_router
from chmc.runtime.torch_merged import MergedDecoder, MergedState, require_artifact


@dataclass(frozen=True)
class TorchOptions:
    """`device`: cpu or cuda[:n]; `dtype`: the weights' (default the artifact's); `merged`: one
    model reading the banks (default on CUDA, or with `compile`) or one transformers model per
    expert; `compile`: the merged model's decode step through torch.compile with this backend
    ("inductor"; a step of a new batch shape then takes seconds to minutes, once)."""

    device: str = "cpu"
    dtype: str | None = None
    merged: bool | None = None
    compile: str | None = None


def reconstruct(folder: Artifact | Checkpoint | str | Path, expert: int | None,
                dtype: str | None = None) -> Any:
    """The transformers model of one expert of an artifact (or the checkpoint itself)."""
    if isinstance(folder, (str, Path)):
        folder = open_folder(folder, expect=("artifact", "checkpoint"))  # type: ignore[assignment]
    assert isinstance(folder, (Artifact, Checkpoint))
    path = folder.path
    if not isinstance(folder, Artifact):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    else:
        # transformers' own loading path from a state dict: it ties the embeddings and computes
        # the buffers (RoPE frequencies, Gemma's embedding scale) that checkpoints do not store
        config = transformers.AutoConfig.from_pretrained(path)
        state = dict(folder.expert_state_dict(0 if expert is None else expert))
        model_class = getattr(transformers, folder.manifest.architecture)  # a supported one
        model = model_class.from_pretrained(None, config=config, state_dict=state,
                                            dtype=next(iter(state.values())).dtype)
        missing = set(model.state_dict()) - set(state)
        missing = {m for m in missing if not (config.tie_word_embeddings and "lm_head" in m)}
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ChmcError(f"{path}: artifact tensors do not match {type(model).__name__} "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.eval()


class TorchBackend:
    """Serves an artifact (per expert, or merged) or a plain checkpoint."""

    def __init__(self, folder: Artifact | Checkpoint, options: TorchOptions | None = None):
        options = options or TorchOptions()
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise ChmcError(f"--device {options.device}: torch sees no CUDA device here "
                            f"(torch {torch.__version__}); use --device cpu")
        self.folder, self.options = folder, options
        self.is_artifact = isinstance(folder, Artifact)
        section = folder.manifest.router if isinstance(folder, Artifact) else None
        self.router = Router(folder.path, section) if section is not None else None
        self._models: dict[int | None, Any] = {}
        merged = options.merged
        if merged is None:
            merged = self.is_artifact and (options.device.startswith("cuda")
                                           or options.compile is not None)
        if options.compile and not merged:
            raise ChmcError(f"compile={options.compile!r} compiles the merged model's decode "
                            "step; merged=False serves one transformers model per expert")
        self.decoder = (MergedDecoder.from_artifact(require_artifact(folder), options.device,
                                                    options.dtype, compile=options.compile)
                        if merged else None)

    @property
    def continuous(self) -> bool:
        """The merged model's states can change their batch between steps (runtime.scheduler);
        per-expert transformers caches cannot."""
        return self.decoder is not None

    def model(self, expert: int | None) -> Any:
        if expert not in self._models:
            self._models[expert] = reconstruct(self.folder, expert, self.options.dtype).to(
                self.options.device)
        return self._models[expert]

    def route(self, expert_ids: np.ndarray, input_ids: np.ndarray,
              attention_mask: np.ndarray) -> np.ndarray:
        """expert_ids [B] with the ROUTED rows routed on their prompts (models.router)."""
        if self.router is None:
            if (expert_ids < 0).any():
                raise no_router(self.folder.path)
            return expert_ids
        return self.router.resolve(expert_ids, input_ids, attention_mask)

    def start(self, expert_ids: np.ndarray) -> Any:
        if self.decoder is None:
            return TorchState(self, expert_ids)
        return MergedState(self.decoder, expert_ids, self.route)


class TorchState:
    """Rows grouped by expert; each group keeps its own transformers cache."""

    def __init__(self, backend: TorchBackend, expert_ids: np.ndarray):
        self.backend = backend
        self.expert_ids = np.asarray(expert_ids, dtype=np.int64)  # [B]; -1: routed at step 1
        self.rows_of: dict[Any, list[int]] = {}  # expert (None: a checkpoint) -> its rows

    def _group(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Route the ROUTED rows on their prompts, then group rows by expert."""
        ids = self.expert_ids = self.backend.route(self.expert_ids, input_ids, attention_mask)
        keys = ids.tolist() if self.backend.is_artifact else [None] * len(ids)
        for row, e in enumerate(keys):
            self.rows_of.setdefault(e, []).append(row)
        self.caches: dict[Any, Any] = dict.fromkeys(self.rows_of)
        model = self.backend.model(next(iter(self.rows_of)))
        params = inspect.signature(model.forward).parameters  # transformers >= 5.x: `cache`
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        if not self.rows_of:
            self._group(input_ids, attention_mask)
        out: np.ndarray | None = None
        dev = self.backend.options.device
        for e, rows in self.rows_of.items():
            with torch.no_grad():
                res = self.backend.model(e)(
                    input_ids=torch.from_numpy(input_ids[rows]).to(dev),
                    attention_mask=torch.from_numpy(attention_mask[rows]).to(dev),
                    position_ids=torch.from_numpy(position_ids[rows]).to(dev),
                    use_cache=True, **{self.cache_arg: self.caches[e]})
            # transformers 5.x renamed the output `cache` too; reading past_key_values there warns,
            # so it is not evaluated as a .get() default would be
            self.caches[e] = res["cache"] if "cache" in res else res.past_key_values  # noqa: SIM401
            logits = res.logits[:, -1].float().cpu().numpy()  # [rows, V]
            if out is None:
                out = np.empty((len(input_ids), logits.shape[-1]), dtype=np.float32)
            out[rows] = logits
        assert out is not None
        return out
