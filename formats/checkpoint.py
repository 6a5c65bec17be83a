"""Hugging Face model folders: validated from their headers alone, read tensor by tensor.

Nothing is loaded up front: safetensors headers give every tensor's name, shape and dtype, and
tensors are read one at a time, so memory stays bounded by the tensor being worked on, never by
the model. `pytorch_model*.bin` files are read with `torch.load(weights_only=True)` only; nothing
is ever unpickled. This module also owns the side files every output folder carries (config,
tokenizer) and the EOS / pad ids, the way transformers reads them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chmc.errors import ChmcError
from chmc.formats.digest import files_sha256
from chmc.formats.safetensors import TensorInfo, read_header, read_tensor

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Files copied from the source into every output folder so it stays a usable HF folder.
SIDE_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER, "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja")


def copy_side_files(src: Path, dst: Path, *, dtype: str | None = None) -> None:
    """Config, generation config and tokenizer files from `src` into `dst`; `dtype` rewrites the
    config's torch_dtype / dtype (the output's weights changed dtype)."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if dtype is not None and (dst / CONFIG).is_file():
        config = json.loads((dst / CONFIG).read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        (dst / CONFIG).write_text(json.dumps(config, indent=2))


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict; missing or malformed is a ChmcError naming the file."""
    file = folder / CONFIG
    if not file.is_file():
        raise ChmcError(f"{folder}: not a Hugging Face model folder (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChmcError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ChmcError(f"{file}: expected a JSON object")
    return config


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


@dataclass(frozen=True)
class GenerationIds:
    """EOS ids and pad id: generation_config.json wins over config.json, as in transformers;
    without a pad id the first EOS pads (and 0 when there is neither)."""

    eos: tuple[int, ...]
    pad: int

    @classmethod
    def of(cls, folder: Path, config: dict[str, Any] | None = None) -> GenerationIds:
        config = read_config(folder) if config is None else config
        eos, pad = _ids(config.get("eos_token_id")), config.get("pad_token_id")
        gen_file = folder / GENERATION_CONFIG
        if gen_file.is_file():
            try:
                gen = json.loads(gen_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ChmcError(f"{gen_file}: invalid JSON ({e})") from None
            if gen.get("eos_token_id") is not None:
                eos = _ids(gen["eos_token_id"])
            pad = gen.get("pad_token_id", pad)
        return cls(eos, int(pad if pad is not None else (eos or (0,))[0]))


def architecture(config: dict[str, Any]) -> str:
    """config.json's architecture class (its model_type when `architectures` is absent)."""
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(archs[0])


class Checkpoint:
    """A Hugging Face model folder: config plus weights, opened lazily and read tensor by tensor."""

    kind = "checkpoint"

    def __init__(self, path: str | Path, role: str = "model folder"):
        """`role` names the folder in errors ("base", "expert 'math'")."""
        self.path = Path(path)
        if not self.path.exists():
            raise ChmcError(f"{self.path}: {role}: no such file or directory")
        if not self.path.is_dir():
            raise ChmcError(f"{self.path}: {role} is not a folder (expected a directory with "
                            f"{CONFIG})")
        self.config = read_config(self.path)
        self._bin_state: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors: dict[str, TensorInfo] = self._index_weights()

    @property
    def architecture(self) -> str:
        return architecture(self.config)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def _index_weights(self) -> dict[str, TensorInfo]:
        p = self.path
        single = p / SINGLE_FILE
        index = p / SHARD_INDEX
        if single.is_file():
            return read_header(single)
        if index.is_file():
            return self._index_sharded(index)
        bins = sorted(p.glob("pytorch_model*.bin"))
        if bins:
            return self._index_bins(bins)
        raise ChmcError(f"{p}: no weights found (expected {SINGLE_FILE}, {SHARD_INDEX} or "
                        "pytorch_model*.bin)")

    def _index_sharded(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ChmcError(f"{index}: invalid shard index ({e})") from None
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise ChmcError(f"{index}: names shard {shard}, which is missing")
            for name, info in read_header(shard_path).items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ChmcError(f"{index}: tensor '{missing[0]}' is not in its shard "
                            f"{weight_map[missing[0]]}")
        return tensors

    def _index_bins(self, bins: list[Path]) -> dict[str, TensorInfo]:
        import torch  # .bin checkpoints only: safetensors folders are indexed without torch

        tensors: dict[str, TensorInfo] = {}
        for b in bins:
            try:
                state = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001  torch raises many types for corrupt or unsafe files
                raise ChmcError(f"{b}: cannot load with torch.load(weights_only=True): {e}") \
                    from None
            self._bin_state[b] = state
            for name, t in state.items():
                tensors[name] = TensorInfo(name, tuple(t.shape),
                                           str(t.dtype).removeprefix("torch."), b)
        return tensors

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, in fresh memory."""
        info = self.tensors.get(name)
        if info is None:
            raise ChmcError(f"{self.path}: has no tensor '{name}'")
        if info.file.suffix == ".bin":
            return self._bin_state[info.file][name].clone()
        return read_tensor(info)

    @cached_property
    def content_hash(self) -> str:
        """sha256 over the weight files, in name order: identifies exactly what was merged."""
        return files_sha256(self.weight_files())
