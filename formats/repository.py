"""The Triton model repository `chmc triton` writes (`name` defaults to "chmc"):

  chmc-repository.json              `RepositoryManifest` (Triton ignores files at the top level)
  <name>_engine/config.pbtxt        the exported graph as it is: onnxruntime_onnx or tensorrt_plan
  <name>_engine/1/model.onnx(.data) or model.plan (+ chmc_ort_kernel.so for plugin-form graphs)
  <name>/config.pbtxt               text in, text out: the Python backend, continuous
                                    (decoupled, streaming) or request scheduling
  <name>/1/model.py, chmc.json, tokenizer and config files
  <name>/1/artifact/                the torch backend's artifact (no <name>_engine then)

The text model reads the graph from `../../<name>_engine/1/`, so the weights are on disk once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from chmc.errors import ChmcError
from chmc.formats.manifest import Manifest, read_manifest_file, write_json

FORMAT: Final = "chmc-triton-repository"
FORMAT_VERSION: Final = 2
REPOSITORY_JSON = "chmc-repository.json"
CONFIG = "config.pbtxt"


class RepositoryManifest(Manifest):
    format: Literal["chmc-triton-repository"] = FORMAT
    format_version: Literal[2] = FORMAT_VERSION
    name: str  # the text model; the graph model (onnxruntime, tensorrt) is `{name}_engine`
    backend: Literal["onnxruntime", "tensorrt", "torch"]
    scheduling: Literal["continuous", "request"]
    source: str  # the artifact, export or engine folder it was written from


def is_repository(path: Path) -> bool:
    """A Triton model repository: folders holding config.pbtxt (chmc's or anyone's)."""
    return path.is_dir() and any(path.glob(f"*/{CONFIG}"))


def write_repository_manifest(folder: Path, manifest: RepositoryManifest) -> None:
    write_json(folder / REPOSITORY_JSON, manifest)


class TritonRepository:
    """A model repository; `manifest` is None for one chmc did not write."""

    kind = "repository"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_repository(self.path):
            raise ChmcError(f"{self.path}: not a Triton model repository (no */{CONFIG})")
        file = self.path / REPOSITORY_JSON
        self.manifest: RepositoryManifest | None = None
        if file.is_file():
            self.manifest = read_manifest_file(RepositoryManifest, file, "chmc Triton repository")

    @property
    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.path.glob(f"*/{CONFIG}"))
