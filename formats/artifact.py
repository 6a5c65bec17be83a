"""The channel-merged artifact: K banks and an index table per merged tensor, and a manifest.

Layout of an artifact folder:
  chmc.json                         the manifest (`ArtifactManifest`)
  weights-00001-of-0000M.safetensors
      <name>.bank     [K, out, in]  bank[k, c] = base[c] + merged delta of group k
      <name>.index    [N, out]      uint8: index[n, c] = group of expert n at row c
      <name>.experts  [N, ...]      tensors that are not channel-merged, per expert, exact
  router.safetensors                optional: the task router (chmc.models.router)
  config.json, generation_config.json, tokenizer files   copied from the base

Each merged tensor has its own K (bank.shape[0]); the manifest's `groups` is the largest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field

from chmc.errors import ChmcError
from chmc.formats.manifest import Manifest, read_manifest_file, write_json
from chmc.formats.safetensors import TensorInfo, read_header, read_tensor

if TYPE_CHECKING:
    import torch

FORMAT: Final = "chmc-artifact"
FORMAT_VERSION: Final = 1
MANIFEST = "chmc.json"
MAX_EXPERTS = 256  # index tables are uint8


def resolve_expert(names: list[str], expert: str | int) -> int:
    """An expert name (or an integer id, also as a string) -> its row in the index tables."""
    if isinstance(expert, int) or (isinstance(expert, str) and expert.lstrip("-").isdigit()):
        i = int(expert)
        if not 0 <= i < len(names):
            raise ChmcError(f"expert id {i} is out of range: this artifact has {len(names)} "
                            f"experts {names}")
        return i
    if expert not in names:
        raise ChmcError(f"unknown expert '{expert}': this artifact has {names}")
    return names.index(expert)


class Source(Manifest):
    path: str
    sha256: str


class Expert(Manifest):
    name: str
    path: str
    sha256: str  # of its weight files (an adapter's: adapter_config.json and its weights)
    kind: Literal["checkpoint", "adapter"] = "checkpoint"  # a full fine-tune, or a PEFT adapter
    rel_error: float  # ||W_rec - W_expert|| / ||W_expert - W_base|| over the merged tensors


class TensorStats(Manifest):
    rel_error: dict[str, float]
    err_sq: dict[str, float]
    delta_sq: dict[str, float]
    mean_groups_used: float


class TensorEntry(Manifest):
    kind: Literal["merged", "stacked"]
    shape: tuple[int, ...]
    dtype: str
    groups: int | None = None  # merged only: this tensor's K
    stats: TensorStats | None = None


class Budget(Manifest):
    fraction: float
    max_groups: int
    error: dict[str, float]  # per tensor: relative error at its chosen K
    curves: dict[str, list[float]]  # per tensor: relative error at K = 1..N


class Accounting(Manifest):
    """Stored parameters: the base, N copies of it (the ensemble), and this artifact."""

    base: int
    ensemble: int
    artifact: int
    index_bytes: int
    ratio: float


class RouterConfig(Manifest):
    """The router's hyper-parameters; the defaults train in seconds on two CPU cores."""

    dim: int = Field(32, ge=1)
    buckets: int = Field(4096, ge=1)  # hashed bigram slots beyond the vocabulary
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    holdout: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    max_examples: int = Field(1000, ge=5)  # prompts used per expert (a random sample)


class RouterSection(Manifest):
    experts: list[str]
    vocab: int
    config: RouterConfig
    train_examples: int
    heldout_examples: int
    heldout_accuracy: float
    confusion: list[list[int]]  # rows: true expert, columns: routed expert
    parameters: int
    file: str


class ArtifactManifest(Manifest):
    format: Literal["chmc-artifact"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    architecture: str
    base: Source
    experts: list[Expert]
    groups: int  # the largest per-tensor K
    budget: Budget | None = None
    clustering: str
    method: str
    calibration: dict[str, str] | None = None
    parameters: dict[str, Any]
    dtype: str | None = None
    tie_word_embeddings: bool
    tensors: dict[str, TensorEntry]
    weight_map: dict[str, str]  # stored tensor name -> shard file
    accounting: Accounting
    router: RouterSection | None = None

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def expert_index(self, expert: str | int) -> int:
        return resolve_expert(self.expert_names, expert)


def read_manifest(path: str | Path) -> ArtifactManifest:
    """An artifact's manifest, checked (torch-free)."""
    file = Path(path) / MANIFEST
    return read_manifest_file(ArtifactManifest, file, "chmc artifact")


def write_manifest(folder: Path, manifest: ArtifactManifest) -> None:
    write_json(folder / MANIFEST, manifest)


class Artifact:
    """Read access to an artifact folder: stored tensors, banks, each expert's reconstruction."""

    kind = "artifact"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    @property
    def experts(self) -> list[str]:
        return self.manifest.expert_names

    @property
    def tensor_names(self) -> list[str]:
        """Names of the original (base) tensors, in stored order."""
        return list(self.manifest.tensors)

    def entry(self, name: str) -> TensorEntry:
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise ChmcError(f"{self.path}: artifact has no tensor '{name}'")
        return entry

    def info(self, stored_name: str) -> TensorInfo:
        """Header entry of one stored tensor, e.g. 'model.layers.0.mlp.up_proj.weight.bank'."""
        shard = self.manifest.weight_map.get(stored_name)
        if shard is None:
            raise ChmcError(f"{self.path}: artifact has no stored tensor '{stored_name}'")
        if shard not in self._headers:
            file = self.path / shard
            if not file.is_file():
                raise ChmcError(f"{file}: shard named by the manifest is missing")
            self._headers[shard] = read_header(file)
        header = self._headers[shard]
        if stored_name not in header:
            raise ChmcError(f"{self.path / shard}: has no tensor '{stored_name}' (the manifest "
                            "names it there)")
        return header[stored_name]

    def stored(self, stored_name: str) -> torch.Tensor:
        """One stored tensor, read into fresh memory."""
        return read_tensor(self.info(stored_name))

    def bank(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(bank [K, out, ...], index [N, out]) of a merged tensor; a stacked tensor is a bank
        with K = N and index[n, c] = n."""
        import torch

        if self.entry(name).kind == "merged":
            return self.stored(f"{name}.bank"), self.stored(f"{name}.index")
        stack = self.stored(f"{name}.experts")  # [N, out, ...]
        n, out = stack.shape[0], stack.shape[1]
        return stack, torch.arange(n).unsqueeze(1).expand(n, out)

    def expert_tensor(self, name: str, expert: str | int) -> torch.Tensor:
        """The expert's version of base tensor `name`: bank[index[n, c], c] per row, or its copy."""
        import torch

        n = self.manifest.expert_index(expert)
        if self.entry(name).kind == "stacked":
            return self.stored(f"{name}.experts")[n]
        bank = self.stored(f"{name}.bank")  # [K, out, in]
        rows = self.stored(f"{name}.index")[n].long()  # [out]
        return bank[rows, torch.arange(bank.shape[1])]

    def expected(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every stored tensor's shape and dtype as the manifest describes them."""
        n = len(self.experts)
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, e in self.manifest.tensors.items():
            if e.kind == "stacked":
                out[f"{name}.experts"] = ((n, *e.shape), e.dtype)
                continue
            if e.groups is None or len(e.shape) != 2:
                raise ChmcError(f"{self.path / MANIFEST}: merged tensor '{name}' needs 'groups' "
                                f"and a 2-D shape, has {e.groups} and {list(e.shape)}")
            out[f"{name}.bank"] = ((e.groups, *e.shape), e.dtype)
            out[f"{name}.index"] = ((n, e.shape[0]), "uint8")
        return out

    def verify(self) -> None:
        """Everything the manifest promises is on disk: each shard's header fits its file, each
        stored tensor has the manifest's shape and dtype, every index value is below its K.
        Reads the headers and the (small) index tables, not the banks."""
        expected = self.expected()
        missing = sorted(set(expected) - set(self.manifest.weight_map))
        extra = sorted(set(self.manifest.weight_map) - set(expected))
        if missing or extra:
            what = f"no shard for '{missing[0]}'" if missing else f"an unknown tensor '{extra[0]}'"
            raise ChmcError(f"{self.path / MANIFEST}: weight_map has {what}")
        for stored, (shape, dtype) in expected.items():
            info = self.info(stored)  # reads and checks the shard's header against its size
            if (info.shape, info.dtype) != (shape, dtype):
                raise ChmcError(f"{info.file}: tensor '{stored}' is {list(info.shape)} "
                                f"{info.dtype}, the manifest says {list(shape)} {dtype}")
            if stored.endswith(".index"):
                groups = expected[stored.removesuffix(".index") + ".bank"][0][0]
                top = int(self.stored(stored).max()) if info.nbytes else 0
                if top >= groups:
                    raise ChmcError(f"{info.file}: index table '{stored}' names group {top}, "
                                    f"but the bank has K={groups}")

    def expert_state_dict(self, expert: str | int) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names:
            yield name, self.expert_tensor(name, expert)
