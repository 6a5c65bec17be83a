"""Reading calibration Gram folders (written by chmc.compiler.calibration.collect_grams): per
expert, grams.json maps each channel-merged tensor to (file, key) of its input Gram [in, in]."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from chmc.compiler.regmean import GramSolver
from chmc.errors import ChmcError

GRAMS_INDEX = "grams.json"


class GramFiles:
    """Per-expert Gram folders, read one tensor at a time: grams(name) -> [N, in, in] or None."""

    def __init__(self, folders: list[Path]):
        self.folders = folders
        self.index: list[dict[str, list[str]]] = []
        for f in folders:
            file = f / GRAMS_INDEX
            if not file.is_file():
                raise ChmcError(f"{f}: not a calibration folder (no {GRAMS_INDEX})")
            self.index.append(json.loads(file.read_text())["tensors"])
        self._solvers: dict[tuple, GramSolver] = {}  # the last two, by their Grams' sources

    def solver(self, tensor: str, n: int, damping: float) -> GramSolver:
        """A GramSolver for `tensor`, shared with the tensors that read the same Grams (q/k/v,
        gate/up), so their subset inverses are computed once."""
        key = (damping, *(tuple(index.get(tensor, ())) for index in self.index))
        if key not in self._solvers:
            while len(self._solvers) >= 2:
                self._solvers.pop(next(iter(self._solvers)))
            self._solvers[key] = GramSolver(self.grams(tensor), n, damping)
        return self._solvers[key]

    def grams(self, tensor: str) -> torch.Tensor | None:
        found: list[torch.Tensor | None] = []
        for folder, index in zip(self.folders, self.index):
            if tensor not in index:
                found.append(None)
                continue
            fname, key = index[tensor]
            with safe_open(str(folder / fname), framework="pt") as h:
                found.append(h.get_tensor(key))
        if all(g is None for g in found):
            return None  # no Linear input (embeddings): the identity, the weight-space rule
        if any(g is None for g in found):
            bad = self.folders[[g is None for g in found].index(True)]
            raise ChmcError(f"calibration statistics {bad} lack tensor '{tensor}'")
        return torch.stack([g for g in found if g is not None])  # [N, in, in]
