"""The export folder: one ONNX decoder graph serving every expert through its `expert_id` input.

  model.onnx, model.onnx.data   the graph and its initializers (external data, page aligned)
  chmc.json                     `ExportManifest`: experts, router, and the `export` section
  config.json, generation_config.json, tokenizer files   copied from the source folder

The `export` section is everything a runtime needs to drive the graph without torch: its inputs
and outputs, the KV cache layout, the EOS / pad ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from chmc.errors import ChmcError
from chmc.formats.artifact import MANIFEST, RouterSection, resolve_expert
from chmc.formats.manifest import Manifest, read_manifest_file, write_json

FORMAT: Final = "chmc-export"
FORMAT_VERSION: Final = 1
GRAPH = "model.onnx"
GRAPH_DATA = "model.onnx.data"
LINEAR_FORMS = ("gather", "select", "plugin")  # how a channel-merged Linear is written
DTYPES = ("float32", "float16", "bfloat16")


class TensorIO(Manifest):
    """One graph input or output; symbolic dims are strings."""

    name: str
    dtype: str  # numpy-style name: "int64", "float32", ...
    shape: tuple[int | str, ...]


class ExportSection(Manifest):
    source: str  # the artifact or checkpoint folder it was exported from
    linear: Literal["dense", "gather", "select", "plugin"]
    dtype: Literal["float32", "float16", "bfloat16"]
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: list[int]
    pad_token_id: int
    inputs: list[TensorIO]
    outputs: list[TensorIO]

    @property
    def merged(self) -> bool:
        """The graph takes `expert_id` (an artifact's); a dense graph serves one model."""
        return any(i.name == "expert_id" for i in self.inputs)

    @property
    def reports_expert(self) -> bool:
        """The graph returns `expert_id_used` (the id each row ran with, routed or given)."""
        return any(o.name == "expert_id_used" for o in self.outputs)


class ExportManifest(Manifest):
    format: Literal["chmc-export"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    experts: list[str]  # empty for a dense export
    router: RouterSection | None = None  # the graph routes expert_id < 0 rows when present
    export: ExportSection

    def expert_index(self, expert: str | int) -> int:
        return resolve_expert(self.experts, expert)


def read_export_manifest(folder: Path) -> ExportManifest:
    file = folder / MANIFEST
    return read_manifest_file(ExportManifest, file, "chmc export folder")


def write_export_manifest(folder: Path, manifest: ExportManifest) -> None:
    write_json(folder / MANIFEST, manifest)


class ExportFolder:
    """An export folder, checked: its manifest parses and its graph file is there."""

    kind = "export"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_export_manifest(self.path)
        if not self.graph.is_file():
            raise ChmcError(f"{self.path}: export folder without its graph ({GRAPH})")

    @property
    def graph(self) -> Path:
        return self.path / GRAPH

    @property
    def section(self) -> ExportSection:
        return self.manifest.export
