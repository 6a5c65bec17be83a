"""The channel-merged artifact: K banks and an index table per merged tensor, and a manifest.

Layout of an artifact folder:
  chmc.json                         manifest (see `Manifest` keys below)
  weights-00001-of-0000M.safetensors
      <name>.bank     [K, out, in]  source dtype: bank[k, c] = base[c] + merged delta of group k
      <name>.index    [N, out]      uint8: index[n, c] = group of expert n at row c
      <name>.experts  [N, ...]      tensors that are not channel-merged, per expert, exact
  config.json, generation_config.json, tokenizer files   copied from the base

Manifest keys: format, format_version, architecture, base {path, sha256}, experts [{name, path,
sha256}], groups (the largest per-tensor K), clustering, method, calibration {expert: prompts} or
null, budget (null, or {fraction, max_groups, error, curves} when --budget chose each tensor's K),
parameters, dtype, tie_word_embeddings,
tensors {name: {kind: "merged"|"stacked", shape, dtype, groups, stats}}, weight_map
{stored tensor name: shard file}, accounting {base, ensemble, artifact, ratio} (parameters).

The writer streams: every shard's header is planned from the tensor specs up front, then tensors
are appended in order as they are produced, so memory holds one tensor at a time. The manifest is
read without torch (the ONNX Runtime serving path needs only its JSON).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from chmc.errors import ChmcError

if TYPE_CHECKING:
    import torch

FORMAT = "chmc-artifact"
FORMAT_VERSION = 1
MANIFEST = "chmc.json"
MAX_SHARD_BYTES = 2 * 1024**3

_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
          "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's name, shape and dtype, known before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


class ShardedSafetensorsWriter:
    """Append tensors, in the planned order, to safetensors shards whose headers are written first."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        total = len(shards)
        self.shard_names = [f"weights-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.weight_map = {s.name: self.shard_names[i] for i, shard in enumerate(shards) for s in shard}
        self._queue: list[tuple[str, list[TensorSpec]]] = list(zip(self.shard_names, shards))
        self._pending: list[TensorSpec] = []
        self._file: IO[bytes] | None = None

    def _open_next_shard(self) -> None:
        name, specs = self._queue.pop(0)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": _CODES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._file = open(self.folder / name, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._pending = list(specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if not self._pending:
            if self._file is not None:
                self._file.close()
            self._open_next_shard()
        spec = self._pending.pop(0)
        got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        if spec.name != name or got != (spec.shape, spec.dtype):
            raise RuntimeError(f"writer expected {spec} next, got '{name}' {got}")
        assert self._file is not None
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))

    def close(self) -> None:
        if self._pending or self._queue:
            left = [s.name for s in self._pending] + [s.name for _, q in self._queue for s in q]
            raise RuntimeError(f"writer closed with tensors not written: {left[:3]}")
        if self._file is not None:
            self._file.close()
            self._file = None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and check an artifact's manifest (torch-free)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise ChmcError(f"{folder}: not a chmc artifact (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChmcError(f"{file}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ChmcError(f"{file}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ChmcError(
            f"{file}: format_version {manifest.get('format_version')} is not supported "
            f"(this chmc reads {FORMAT_VERSION})"
        )
    return manifest


def expert_names(manifest: dict[str, Any]) -> list[str]:
    return [e["name"] for e in manifest["experts"]]


def expert_index(manifest: dict[str, Any], expert: str | int) -> int:
    """Resolve an expert name (or an integer id) to its row in the index tables."""
    names = expert_names(manifest)
    if isinstance(expert, int) or (isinstance(expert, str) and expert.lstrip("-").isdigit()):
        i = int(expert)
        if not 0 <= i < len(names):
            raise ChmcError(f"expert id {i} is out of range: this artifact has {len(names)} experts {names}")
        return i
    if expert not in names:
        raise ChmcError(f"unknown expert '{expert}': this artifact has {names}")
    return names.index(expert)


class Artifact:
    """Read access to an artifact: raw stored tensors, and each expert's reconstructed weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.experts = expert_names(self.manifest)
        self._handles: dict[str, Any] = {}

    @property
    def tensor_names(self) -> list[str]:
        """Names of the original (base) tensors, in stored order."""
        return list(self.manifest["tensors"])

    def stored(self, stored_name: str) -> torch.Tensor:
        """One stored tensor, e.g. 'model.layers.0.mlp.up_proj.weight.bank'."""
        from safetensors import safe_open

        shard = self.manifest["weight_map"].get(stored_name)
        if shard is None:
            raise ChmcError(f"{self.path}: artifact has no stored tensor '{stored_name}'")
        handle = self._handles.get(shard)
        if handle is None:
            file = self.path / shard
            if not file.is_file():
                raise ChmcError(f"{file}: shard named by the manifest is missing")
            handle = self._handles[shard] = safe_open(str(file), framework="pt")
        return handle.get_tensor(stored_name)

    def expert_tensor(self, name: str, expert: str | int) -> torch.Tensor:
        """The expert's version of base tensor `name`: bank[index[n, c], c] per row, or its stacked copy."""
        import torch

        n = expert_index(self.manifest, expert)
        entry = self.manifest["tensors"].get(name)
        if entry is None:
            raise ChmcError(f"{self.path}: artifact has no tensor '{name}'")
        if entry["kind"] == "stacked":
            return self.stored(f"{name}.experts")[n]
        bank = self.stored(f"{name}.bank")  # [K, out, in]
        rows = self.stored(f"{name}.index")[n].long()  # [out]
        return bank[rows, torch.arange(bank.shape[1])]

    def expert_state_dict(self, expert: str | int) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names:
            yield name, self.expert_tensor(name, expert)
