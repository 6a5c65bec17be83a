"""Stage 1, checkpoints in: Hugging Face model folders, validated from their headers alone.

Nothing is loaded up front: safetensors headers give every tensor's name, shape and dtype, and
tensors are read one at a time from memory-mapped files, so memory stays bounded by the tensor
being merged, never by the model. `pytorch_model*.bin` files are read with
`torch.load(weights_only=True)` only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch

# safetensors dtype codes -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
# Files copied from the base into every output folder so it stays a usable HF folder.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a file header."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float16"
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; a truncated or corrupt file is a ChmcError."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ChmcError(f"{file}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100_000_000:
                raise ChmcError(f"{file}: corrupt safetensors header (length {header_len}, file {size} bytes)")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChmcError(f"{file}: cannot read safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ChmcError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ChmcError(f"{file}: corrupt header entry for tensor '{name}'") from None
        if code not in SAFETENSORS_DTYPES:
            raise ChmcError(f"{file}: tensor '{name}' has unsupported dtype {code}")
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        info = TensorInfo(name, shape, dtype, file)
        if end - begin != info.numel * itemsize or end > data_size or begin < 0:
            raise ChmcError(
                f"{file}: tensor '{name}' needs bytes {begin}..{end} but the file holds {data_size} "
                "bytes of data (truncated or corrupt file)"
            )
        tensors[name] = info
    return tensors


class Checkpoint:
    """A Hugging Face model folder: config plus weights, opened lazily and read tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ChmcError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise ChmcError(f"{self.path}: not a model folder (expected a directory with config.json)")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ChmcError(f"{self.path}: not a Hugging Face model folder (no config.json)")
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ChmcError(f"{config_file}: invalid JSON ({e})") from None
        self._bin_state: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors: dict[str, TensorInfo] = self._index_weights()

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def _index_weights(self) -> dict[str, TensorInfo]:
        p = self.path
        single = p / "model.safetensors"
        index = p / "model.safetensors.index.json"
        if single.is_file():
            return read_safetensors_header(single)
        if index.is_file():
            return self._index_sharded(index)
        bins = sorted(p.glob("pytorch_model*.bin"))
        if bins:
            return self._index_bins(bins)
        raise ChmcError(
            f"{p}: no weights found (expected model.safetensors, model.safetensors.index.json "
            "or pytorch_model*.bin)"
        )

    def _index_sharded(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ChmcError(f"{index}: invalid shard index ({e})") from None
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise ChmcError(f"{index}: names shard {shard}, which is missing")
            header = read_safetensors_header(shard_path)
            for name, info in header.items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ChmcError(f"{index}: tensor '{missing[0]}' is not in its shard {weight_map[missing[0]]}")
        return tensors

    def _index_bins(self, bins: list[Path]) -> dict[str, TensorInfo]:
        import torch

        tensors: dict[str, TensorInfo] = {}
        for b in bins:
            try:
                state = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt or unsafe files
                raise ChmcError(f"{b}: cannot load with torch.load(weights_only=True): {e}") from None
            self._bin_state[b] = state
            for name, t in state.items():
                tensors[name] = TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), b)
        return tensors

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor as a copy, closing the file right after: a kept safetensors handle keeps
        every page it ever touched mapped, which would grow RSS to the size of all checkpoints."""
        info = self.tensors.get(name)
        if info is None:
            raise ChmcError(f"{self.path}: has no tensor '{name}'")
        if info.file.suffix == ".bin":
            return self._bin_state[info.file][name]
        from safetensors import safe_open

        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    @cached_property
    def content_hash(self) -> str:
        """sha256 over the weight files, in name order: identifies exactly what was merged."""
        h = hashlib.sha256()
        for f in self.weight_files():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()
