"""PyTorch backend, two ways to serve an artifact without exporting:
  - experts (the CPU default): each expert reconstructed (bank[index[n, c], c] per row) into a
    transformers model, cached per expert, rows grouped by expert. The reference the ONNX graph
    is checked against.
  - merged (the CUDA default, `merged=True` elsewhere): one model reads the banks directly, the
    expert chosen per batch row (chmc.runtime.torch_merged: Triton kernels, CUDA-graph decode)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
from chmc.errors import ChmcError


def reconstruct(path: Path, expert: int | None, dtype: str | None = None) -> Any:
    """The transformers model of one expert of an artifact (or the checkpoint itself if None)."""
    import torch
    import transformers
    from chmc.compiler.artifact import Artifact

    if expert is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    else:
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        state = dict(Artifact(path).expert_state_dict(expert))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (config.tie_word_embeddings and "lm_head" in m)]
        if missing or unexpected:
            raise ChmcError(f"{path}: artifact tensors do not match {type(model).__name__} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
        for name, module in list(model.named_modules()):  # computed buffers (rotary inv_freq)
            if any(b.is_meta for b in module.buffers(recurse=False)):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, type(module)(config=config))
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.eval()


class TorchBackend:
    """Serves an artifact (one reconstructed model per expert) or a plain checkpoint."""

    def __init__(self, path: Path, kind: str, device: str = "cpu", dtype: str | None = None,
                 merged: bool | None = None):
        import torch
        from chmc.compiler.artifact import read_manifest
        from chmc.compiler.export import _generation_ids
        from chmc.models.spec import decoder_config
        from chmc.runtime import read_export_manifest

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ChmcError(f"--device {device}: torch sees no CUDA device here "
                            f"(torch {torch.__version__}); use --device cpu")
        self.folder = path  # tokenizer and manifest live here
        self.device, self.dtype = device, dtype
        if kind == "export":
            manifest = read_export_manifest(path)
            source = Path(manifest["export"]["source"])
            if not source.is_dir():
                raise ChmcError(f"{path}: the export's source {source} is gone; the torch backend "
                                "needs the artifact or checkpoint")
            path, kind = source, ("artifact" if (source / "chmc.json").is_file() else "checkpoint")
        self.source, self.is_artifact = path, kind == "artifact"
        self.manifest: dict[str, Any] = read_manifest(path) if self.is_artifact else {"experts": []}
        config = json.loads((path / "config.json").read_text())
        eos, pad = _generation_ids(path, decoder_config(config))
        self.manifest = {**self.manifest, "export": {"eos_token_ids": eos, "pad_token_id": pad}}
        self._models: dict[int | None, Any] = {}
        if merged is None:
            merged = self.is_artifact and device.startswith("cuda")
        if merged and not self.is_artifact:
            raise ChmcError(f"{path}: merged=True serves a chmc artifact; this is a plain checkpoint")
        self.decoder: Any = None
        if merged:
            from chmc.runtime.torch_merged import MergedDecoder

            self.decoder = MergedDecoder(path, device, dtype)

    def model(self, expert: int | None) -> Any:
        if expert not in self._models:
            self._models[expert] = reconstruct(self.source, expert, self.dtype).to(self.device)
        return self._models[expert]

    def start(self, expert_ids: np.ndarray) -> Any:
        if (np.asarray(expert_ids) < 0).any() and "router" not in self.manifest:
            from chmc.compiler.router import no_router

            raise no_router(self.source)
        if self.decoder is None:
            return TorchState(self, expert_ids)
        from chmc.runtime.torch_merged import MergedState

        return MergedState(self.decoder, expert_ids, self.route)

    def route(self, expert_ids: np.ndarray, input_ids: np.ndarray,
              attention_mask: np.ndarray) -> np.ndarray:
        """expert_ids [B] with the -1 rows routed on their prompts (compiler.router)."""
        if not (expert_ids < 0).any():
            return expert_ids
        from chmc.compiler.router import route_prompts

        return np.where(expert_ids < 0, route_prompts(self.source, input_ids, attention_mask),
                        expert_ids)


class TorchState:
    """Rows grouped by expert; each group keeps its own transformers cache."""

    def __init__(self, backend: TorchBackend, expert_ids: np.ndarray):
        self.b = backend
        self.expert_ids = np.asarray(expert_ids, dtype=np.int64)  # [B]; -1: routed at step 1
        self.groups: dict[Any, list[int]] = {}

    def _group(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Route the -1 rows on their prompts, then group rows by expert."""
        ids = self.expert_ids = self.b.route(self.expert_ids, input_ids, attention_mask)
        keys = ids.tolist() if self.b.is_artifact else [None] * len(ids)
        for row, e in enumerate(keys):
            self.groups.setdefault(e, []).append(row)
        self.caches: dict[Any, Any] = dict.fromkeys(self.groups)
        model = self.b.model(next(iter(self.groups)))
        params = inspect.signature(model.forward).parameters  # transformers >= 5.x: `cache`
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        import torch

        if not self.groups:
            self._group(input_ids, attention_mask)
        out: np.ndarray | None = None
        dev = self.b.device
        for e, rows in self.groups.items():
            with torch.no_grad():
                res = self.b.model(e)(
                    input_ids=torch.from_numpy(input_ids[rows]).to(dev),
                    attention_mask=torch.from_numpy(attention_mask[rows]).to(dev),
                    position_ids=torch.from_numpy(position_ids[rows]).to(dev),
                    use_cache=True, **{self.cache_arg: self.caches[e]})
            # transformers 5.x renamed the output `cache` too (past_key_values warns there)
            self.caches[e] = res["cache"] if "cache" in res else res.past_key_values
            logits = res.logits[:, -1].float().cpu().numpy()  # [rows, V]
            if out is None:
                out = np.empty((len(input_ids), logits.shape[-1]), dtype=np.float32)
            out[rows] = logits
        assert out is not None
        return out
