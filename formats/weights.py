"""A model folder seen by tensor name, whatever it is: an artifact's experts (banks and stacked
copies) or a plain checkpoint's dense tensors. The export and the merged torch runtime read
weights through this one view."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from chmc.errors import ChmcError
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

Kind = Literal["dense", "merged", "stacked"]


class ModelWeights:
    """Tensors of an artifact (kinds merged / stacked, per expert) or a checkpoint (dense)."""

    def __init__(self, folder: Artifact | Checkpoint,
                 on_read: Callable[[str], object] | None = None):
        """`on_read(name)` is called after each tensor is read (a progress bar's advance)."""
        self.folder = folder
        self.on_read = on_read
        self.path: Path = folder.path
        if isinstance(folder, Artifact):
            self.experts = folder.experts
            self._kinds: dict[str, Kind] = {n: e.kind for n, e in folder.manifest.tensors.items()}
            self._shapes = {n: tuple(e.shape) for n, e in folder.manifest.tensors.items()}
        else:
            self.experts = []
            self._kinds = dict.fromkeys(folder.tensors, "dense")
            self._shapes = {n: i.shape for n, i in folder.tensors.items()}

    @property
    def names(self) -> list[str]:
        return list(self._kinds)

    def _read(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.on_read is not None:
            self.on_read(name)
        return t

    @property
    def merged(self) -> bool:
        """Per-expert weights (an artifact): the graph takes `expert_id`."""
        return isinstance(self.folder, Artifact)

    def has(self, name: str) -> bool:
        return name in self._kinds

    def kind(self, name: str) -> Kind:
        if name not in self._kinds:
            raise ChmcError(f"{self.path}: has no tensor '{name}' (needed by the graph)")
        return self._kinds[name]

    def shape(self, name: str) -> tuple[int, ...]:
        self.kind(name)
        return self._shapes[name]

    def dense(self, name: str) -> torch.Tensor:
        """A checkpoint's tensor (a copy-on-write map of its bytes)."""
        if self.kind(name) != "dense":
            raise ChmcError(f"{self.path}: tensor '{name}' is stored per expert, not dense")
        assert isinstance(self.folder, Checkpoint)
        return self._read(name, self.folder.tensor(name))

    def stacked(self, name: str) -> torch.Tensor:
        """An artifact's per-expert copies [N, ...] of a tensor that is not channel-merged."""
        if self.kind(name) != "stacked":
            raise ChmcError(f"{self.path}: tensor '{name}' is stored as '{self.kind(name)}', "
                            "expected 'stacked'")
        assert isinstance(self.folder, Artifact)
        return self._read(name, self.folder.stored(f"{name}.experts"))

    def bank(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(bank [K, out, in], index [N, out]) of an artifact's merged or stacked 2-D tensor."""
        if not isinstance(self.folder, Artifact):
            raise ChmcError(f"{self.path}: a checkpoint has no banks ('{name}')")
        bank, index = self.folder.bank(name)
        return self._read(name, bank), index
