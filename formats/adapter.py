"""PEFT LoRA and DoRA adapter folders as experts: an adapter over its base reads like a full
checkpoint of the fine-tuned model, one tensor at a time.

`Adapter` has the attributes of a `Checkpoint` that a build reads (config, tensors, tensor(),
content_hash): its tensors are the base's names, shapes and dtypes, and `tensor(name)` reads the
base tensor and folds the adapter's delta into it, as peft's `merge_and_unload()` does:

- LoRA: W + s * B @ A, with s = alpha / r (rsLoRA: alpha / sqrt(r)); r and alpha per module
  from rank_pattern / alpha_pattern, matched the way peft matches them;
- DoRA: m / ||W + s * B @ A|| * (W + s * B @ A), the norm per output row (per embedding column
  for an embedding, as peft has it);
- embeddings (lora_embedding_A / _B), LoRA biases (lora_bias), and whole tensors the adapter
  stores (modules_to_save, bias="all", save_embedding_layers) replacing the base's.

No full copy of the base is ever made per expert: memory holds one tensor and its factors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch  # the build side only: serving never opens an adapter
from pydantic import BaseModel, ConfigDict, ValidationError

from chmc.errors import ChmcError, NotSupportedError
from chmc.formats.checkpoint import Checkpoint
from chmc.formats.digest import files_sha256
from chmc.formats.manifest import first_error
from chmc.formats.safetensors import TensorInfo, read_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix for causal LMs
# peft's saved key suffixes -> the part of a module's adapter they hold
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
         ".lora_magnitude_vector.weight": "magnitude", ".lora_magnitude_vector": "magnitude",
         ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
EMBEDDING_PARTS = (".lora_embedding_A", ".lora_embedding_B")


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


class AdapterConfig(BaseModel):
    """The fields of adapter_config.json that decide what folding means (peft writes many more)."""

    model_config = ConfigDict(extra="allow")

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    # features that change the forward pass beyond a folded weight: refused when set
    layer_replication: Any = None
    target_parameters: Any = None
    trainable_token_indices: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    use_bdlora: Any = None


UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices",
               "alora_invocation_tokens", "use_qalora", "use_bdlora", "fan_in_fan_out")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the
    module's name (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass
class Module:
    """One adapted module: its factors (and magnitude, LoRA bias) and its scaling."""

    name: str
    embedding: bool = False
    parts: dict[str, TensorInfo] = field(default_factory=dict)
    scaling: float = 0.0


class Adapter:
    """A PEFT adapter folder over `base`, read as the full fine-tuned checkpoint."""

    kind = "adapter"

    def __init__(self, path: str | Path, base: Checkpoint, role: str = "adapter"):
        self.path, self.base, self.role = Path(path), base, role
        self.settings = self._read_config()
        self.file = self.path / ADAPTER_WEIGHTS
        if not self.file.is_file():
            found = sorted(p.name for p in self.path.glob("adapter_model.*"))
            hint = f" (found {found[0]}: convert it to safetensors)" if found else ""
            raise ChmcError(f"{self.path}: {role}: no {ADAPTER_WEIGHTS}{hint}")
        self.modules: dict[str, Module] = {}  # base tensor name -> its adapter
        self.replaced: dict[str, TensorInfo] = {}  # base tensor name -> the adapter's own copy
        self._index(read_header(self.file))
        self.config, self.tensors = base.config, base.tensors  # it is the base, fine-tuned

    @property
    def architecture(self) -> str:
        return self.base.architecture

    @property
    def tied(self) -> bool:
        return self.base.tied

    @property
    def changed(self) -> list[str]:
        """The base tensors this adapter changes."""
        return sorted({*self.modules, *self.replaced})

    def _read_config(self) -> AdapterConfig:
        file = self.path / ADAPTER_CONFIG
        try:
            raw = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChmcError(f"{file}: invalid JSON ({e})") from None
        try:
            settings = AdapterConfig.model_validate(raw)
        except ValidationError as e:
            raise ChmcError(f"{file}: {first_error(e)}") from None
        if settings.peft_type != "LORA":
            raise NotSupportedError(f"{file}: peft_type '{settings.peft_type}' is not supported "
                                    "(chmc folds LoRA and DoRA adapters)")
        for name in UNSUPPORTED:
            if getattr(settings, name):
                raise NotSupportedError(f"{file}: field '{name}' is not supported (its effect "
                                        "is not a folded weight)")
        if settings.r <= 0:
            raise ChmcError(f"{file}: field 'r' must be positive, got {settings.r}")
        return settings

    def _index(self, header: dict[str, TensorInfo]) -> None:
        """Sort the adapter's tensors into per-module factors and whole-tensor replacements,
        each checked against the base's shapes."""
        for key, info in header.items():
            name = key.removeprefix(PREFIX)
            suffix = next((s for s in PARTS if name.endswith(s)), None)
            if suffix is None:  # a whole tensor: modules_to_save, a bias, an embedding layer
                target = name.replace(".base_layer.", ".")
                self._expect(key, target, info.shape, self.base_shape(key, target))
                self.replaced[target] = info
                continue
            module = name.removesuffix(suffix)
            weight = f"{module}.weight"
            entry = self.modules.setdefault(weight, Module(module))
            entry.embedding |= suffix in EMBEDDING_PARTS
            entry.parts[PARTS[suffix]] = info
        for weight, entry in list(self.modules.items()):  # a LoRA bias adds an entry
            self._check_module(weight, entry)
        if self.base.tied and "lm_head.weight" in self.changed:
            raise NotSupportedError(f"{self.file}: changes lm_head.weight, which the base ties "
                                    "to the embeddings")

    def base_shape(self, key: str, target: str) -> tuple[int, ...]:
        info = self.base.tensors.get(target)
        if info is None:
            raise ChmcError(f"{self.file}: tensor '{key}' is for '{target}', which the base "
                            f"({self.base.path}) does not have: an adapter of another model?")
        return info.shape

    def _expect(self, key: str, target: str, got: tuple[int, ...],
                want: tuple[int, ...]) -> None:
        if tuple(got) != tuple(want):
            raise ChmcError(f"{self.file}: tensor '{key}' is {list(got)}, but '{target}' of the "
                            f"base ({self.base.path}) needs {list(want)}: an adapter of another "
                            "model?")

    def _check_module(self, weight: str, m: Module) -> None:
        missing = [p for p in ("A", "B") if p not in m.parts]
        if missing:
            raise ChmcError(f"{self.file}: module '{m.name}' has no lora_{missing[0]} tensor")
        shape = self.base_shape(f"{m.name}.lora_A", weight)
        a, b = m.parts["A"], m.parts["B"]
        rank = a.shape[0]
        # Linear: A [r, in], B [out, r] for W [out, in]; embedding: A [r, vocab], B [dim, r]
        # for W [vocab, dim]
        rows, cols = (shape[1], shape[0]) if m.embedding else shape
        self._expect(a.name, weight, a.shape, (rank, cols))
        self._expect(b.name, weight, b.shape, (rows, rank))
        if "magnitude" in m.parts:
            self._expect(m.parts["magnitude"].name, weight, m.parts["magnitude"].shape, (rows,))
        if "bias" in m.parts:
            bias = f"{m.name}.bias"
            self._expect(m.parts["bias"].name, bias, m.parts["bias"].shape,
                         self.base_shape(m.parts["bias"].name, bias))
            self.modules[bias] = m  # the bias tensor is changed too
        s = self.settings
        r = pattern_value(s.rank_pattern, m.name, s.r)
        if r != rank:
            raise ChmcError(f"{self.path / ADAPTER_CONFIG}: module '{m.name}' has rank {rank} "
                            f"in {ADAPTER_WEIGHTS}, the config says {r}")
        alpha = pattern_value(s.alpha_pattern, m.name, s.lora_alpha)
        m.scaling = alpha / (rank ** 0.5 if s.use_rslora else rank)

    def tensor(self, name: str) -> torch.Tensor:
        """The fine-tuned tensor: the base's (or the adapter's own copy), with the delta folded
        in, in the base's dtype."""
        base_info = self.base.tensors.get(name)
        if base_info is None:
            raise ChmcError(f"{self.path}: has no tensor '{name}'")
        w = read_tensor(self.replaced[name]) if name in self.replaced else self.base.tensor(name)
        dtype = getattr(torch, base_info.dtype)
        module = self.modules.get(name)
        if module is None:
            return w.to(dtype)
        if name.endswith(".bias"):
            lora_bias = read_tensor(module.parts["bias"]).float()
            return (w.float() + module.scaling * lora_bias).to(dtype)
        return fold(w.float(), module).to(dtype)

    @cached_property
    def content_hash(self) -> str:
        """sha256 over adapter_config.json and the adapter's weights (the base is hashed as the
        base)."""
        return files_sha256([self.path / ADAPTER_CONFIG, self.file])


def fold(w: torch.Tensor, m: Module) -> torch.Tensor:
    """W with the module's LoRA (and DoRA magnitude) folded in, in float32."""
    a, b = (read_tensor(m.parts[p]).float() for p in ("A", "B"))
    delta = m.scaling * (b @ a)  # [out, in]; an embedding's is [dim, vocab]
    if m.embedding:
        delta = delta.T
    merged = w + delta
    if "magnitude" not in m.parts:
        return merged
    magnitude = read_tensor(m.parts["magnitude"]).float()
    if m.embedding:  # one magnitude per embedding dimension: norms over the vocabulary
        return merged * (magnitude / merged.norm(dim=0))[None, :]
    return merged * (magnitude / merged.norm(dim=1))[:, None]


def open_expert(path: str | Path, base: Checkpoint, role: str) -> Checkpoint | Adapter:
    """An expert folder: a full checkpoint, or a PEFT adapter over `base`."""
    path = Path(path)
    return Adapter(path, base, role) if is_adapter(path) else Checkpoint(path, role)
