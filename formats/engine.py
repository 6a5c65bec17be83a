"""The TensorRT engine folder `chmc engine` writes:

  model.plan    the serialized engine (plugins embedded as AOT kernels)
  engine.json   `EngineManifest`: the optimisation profiles and the engine's bindings
  chmc.json     the export's manifest (experts, EOS ids, graph I/O), tokenizer and config files
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from chmc.errors import ChmcError
from chmc.formats.export import ExportManifest, read_export_manifest
from chmc.formats.manifest import Manifest, read_manifest_file, write_json

FORMAT: Final = "chmc-trt-engine"
FORMAT_VERSION: Final = 1
PLAN = "model.plan"
ENGINE_JSON = "engine.json"
ProfileName = Literal["prefill", "decode"]
PROFILES: tuple[ProfileName, ProfileName] = ("prefill", "decode")  # 0: any length, 1: one token


class ShapeRange(Manifest):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


class Profile(Manifest):
    name: ProfileName
    shapes: dict[str, ShapeRange]


class Binding(Manifest):
    name: str
    mode: Literal["input", "output"]
    dtype: str
    shape: tuple[int, ...]  # -1 for a dynamic axis


class EngineManifest(Manifest):
    format: Literal["chmc-trt-engine"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    onnx: str  # the graph it was built from
    tensorrt: str  # TensorRT's version
    profiles: list[Profile]  # in PROFILES order
    bindings: list[Binding]


def read_engine_manifest(folder: Path) -> EngineManifest:
    file = folder / ENGINE_JSON
    return read_manifest_file(EngineManifest, file, "chmc TensorRT engine folder")


def write_engine_manifest(folder: Path, manifest: EngineManifest) -> None:
    write_json(folder / ENGINE_JSON, manifest)


class EngineFolder:
    kind = "engine"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_engine_manifest(self.path)
        self.export: ExportManifest = read_export_manifest(self.path)
        if not self.plan.is_file():
            raise ChmcError(f"{self.path}: engine folder without its {PLAN} (build one with "
                            "`chmc engine EXPORT --out DIR`)")

    @property
    def plan(self) -> Path:
        return self.path / PLAN
