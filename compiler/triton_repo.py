"""Stage: an export (or engine) folder -> a Triton Inference Server model repository
(chmc.formats.repository describes the layout).

The graph model `<name>_engine` is the exported graph as it is: onnxruntime_onnx or tensorrt_plan,
inputs/outputs exactly as the graph declares them (expert_id included), max_batch_size 0 (the KV
cache has its own batch dim); a plugin-form graph carries its native chmc::ChannelGatherMatMul
kernel, named by `model_operations` with its absolute path. The text model `<name>` is the
Python backend with dynamic batching, so one execute() gets requests for several experts and
runs them as one batch with per-row expert ids through chmc.runtime; it reads the graph from
`../../<name>_engine/1/` (a relative path kept in its config's parameters), so the weights are on
disk once and the repository runs on its own. Config files are written as protobuf text and,
when tritonclient[grpc] is installed, parsed back with Triton's own ModelConfig message before
anything is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chmc.errors import ChmcError, MissingDependencyError, NotSupportedError
from chmc.formats.artifact import MANIFEST
from chmc.formats.checkpoint import copy_side_files
from chmc.formats.engine import ENGINE_JSON, PLAN, EngineFolder
from chmc.formats.export import GRAPH, GRAPH_DATA, ExportFolder, TensorIO, read_export_manifest
from chmc.formats.folders import folder_kind, open_folder
from chmc.formats.outputs import staged_output
from chmc.formats.repository import RepositoryManifest, write_repository_manifest
from chmc.plugins.channel_gather_matmul.onnxruntime_op import library_path

ENGINES = ("onnx", "trt")
PLATFORMS = {"onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}
# engine.json (written by `chmc engine`) describes the plan's profiles for chmc.runtime.
GRAPH_FILES = {"onnx": (GRAPH, GRAPH_DATA), "trt": (PLAN, ENGINE_JSON)}
OP_LIBRARY = "chmc_ort_kernel.so"  # beside a plugin-form graph; Triton's ORT backend loads it
MODEL_PY = Path(__file__).resolve().parent.parent / "runtime" / "triton_model.py"
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "string": "TYPE_STRING",
}


@dataclass(frozen=True)
class TextModelOptions:
    """The text model's batching knobs: wait up to `queue_delay_us` to fill a preferred batch."""

    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    queue_delay_us: int = 20_000
    instances: int = 1
    max_new_tokens: int = 64  # default when a request leaves `max_new_tokens` out


def _dims(t: TensorIO) -> list[int]:
    """Symbolic dims become -1 in a Triton config."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in t.shape]


def _tensor_entries(tensors: list[TensorIO]) -> str:
    items = []
    for t in tensors:
        if t.dtype not in TRITON_TYPES:
            raise ChmcError(f"graph tensor '{t.name}' has dtype {t.dtype!r}, which Triton has no "
                            "type for")
        dims = ", ".join(str(d) for d in _dims(t))
        items.append(f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} '
                     f'dims: [ {dims} ] }}')
    return ",\n".join(items)


def engine_config(name: str, inputs: list[TensorIO], outputs: list[TensorIO], engine: str = "onnx",
                  op_library: str | None = None) -> str:
    """config.pbtxt of the graph model: no batching by Triton (batch is the graph's first dim).
    `op_library`: absolute path of a custom-op library the ONNX Runtime backend registers."""
    if engine not in PLATFORMS:
        raise ChmcError(f"engine {engine!r} is not one of {list(PLATFORMS)}")
    ops = f'model_operations {{ op_library_filename: "{op_library}" }}\n' if op_library else ""
    return (
        f'name: "{name}"\nplatform: "{PLATFORMS[engine]}"\nmax_batch_size: 0\n'
        f"input [\n{_tensor_entries(inputs)}\n]\noutput [\n{_tensor_entries(outputs)}\n]\n"
        f"{ops}instance_group [ {{ kind: KIND_AUTO count: 1 }} ]\n"
    )


def text_model_config(name: str, engine_dir: str, backend: str, opts: TextModelOptions) -> str:
    """config.pbtxt of the text model: Python backend, dynamic batching across experts."""
    preferred = ", ".join(str(s) for s in opts.preferred_batch_sizes if s <= opts.max_batch_size)
    return f"""name: "{name}"
backend: "python"
max_batch_size: {opts.max_batch_size}
input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "expert" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {opts.queue_delay_us}
}}
instance_group [ {{ kind: KIND_CPU count: {opts.instances} }} ]
parameters {{ key: "engine_dir" value: {{ string_value: "{engine_dir}" }} }}
parameters {{ key: "backend" value: {{ string_value: "{backend}" }} }}
parameters {{ key: "max_new_tokens" value: {{ string_value: "{opts.max_new_tokens}" }} }}
"""


def parse_model_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse protobuf text with Triton's ModelConfig message; a bad config is a ChmcError."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError without grpcio
        raise MissingDependencyError(
            "validating Triton configs needs tritonclient[grpc]: pip install 'chmc[triton]'"
        ) from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ChmcError(f"{where}: not a valid Triton model config ({e})") from None


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (weights stay on disk once), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_triton_repo(source: str | Path, out: str | Path, *, engine: str = "onnx",
                      name: str = "chmc", force: bool = False,
                      options: TextModelOptions | None = None) -> Path:
    """Write the two-model repository for an export folder (an artifact is exported first, in
    the portable gather form) or, with engine="trt", an engine folder."""
    from chmc.compiler.export import export  # torch and onnx: only for an artifact source

    source = Path(source)
    if engine not in ENGINES:
        raise ChmcError(f"--engine {engine!r} is not one of {list(ENGINES)}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ChmcError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    if engine == "trt" and folder_kind(source) != "engine":
        raise ChmcError(f"{source}: no model.plan for --engine trt: build one with "
                        "`chmc engine EXPORT --out ENGINE_DIR` and pass ENGINE_DIR")
    folder = open_folder(source, expect=("engine",) if engine == "trt" else ("artifact", "export"))
    with staged_output(out, force, inputs=[source]) as tmp:
        if isinstance(folder, EngineFolder):
            graph_dir, manifest = folder.path, folder.export
        else:
            if not isinstance(folder, ExportFolder):  # an artifact: export it into the scratch
                folder = ExportFolder(export(source, tmp / ".export"))
            graph_dir, manifest = folder.path, folder.manifest
        _copy_files(graph_dir, tmp, engine, name)
        section = manifest.export
        op_library = None
        if engine == "onnx" and _place_op_library(graph_dir, tmp / f"{name}_engine" / "1"):
            op_library = str(Path(out).resolve() / f"{name}_engine" / "1" / OP_LIBRARY)
        backend = "onnxruntime" if engine == "onnx" else "tensorrt"
        configs = {
            f"{name}_engine": engine_config(f"{name}_engine", section.inputs, section.outputs,
                                            engine, op_library),
            name: text_model_config(name, f"../../{name}_engine/1", backend,
                                    options or TextModelOptions()),
        }
        for model, text in configs.items():
            (tmp / model / "config.pbtxt").write_text(text)
            # validation is a check, not a requirement for writing the repository
            with contextlib.suppress(MissingDependencyError):
                parse_model_config(text, f"{out}/{model}/config.pbtxt")
        shutil.rmtree(tmp / ".export", ignore_errors=True)
        write_repository_manifest(tmp, RepositoryManifest(name=name, engine=engine,
                                                          source=str(source.resolve())))
    return Path(out)


def _place_op_library(export_dir: Path, graph_dir: Path) -> bool:
    """Put the native kernel beside a plugin-form graph (Triton's ORT backend cannot run its node
    otherwise); False for other forms."""
    export = read_export_manifest(export_dir).export
    if export.linear != "plugin":
        return False
    if export.dtype != "float32":
        raise NotSupportedError(
            f"{export_dir}: a {export.dtype} plugin-form graph cannot be served by Triton's "
            "ONNX Runtime backend (the chmc::ChannelGatherMatMul CPU kernel is float32): export "
            "with --dtype float32, or build a TensorRT engine and use --engine trt")
    shutil.copy2(library_path(), graph_dir / OP_LIBRARY)
    return True


def _copy_files(graph_dir: Path, repo: Path, engine: str, name: str) -> None:
    """Graph files into <name>_engine/1; manifest, tokenizer, config and model.py into <name>/1
    (the runtime reads them from one folder)."""
    graph, text = repo / f"{name}_engine" / "1", repo / name / "1"
    graph.mkdir(parents=True)
    text.mkdir(parents=True)
    for f in GRAPH_FILES[engine]:
        if (graph_dir / f).is_file():
            _place(graph_dir / f, graph / f)
    copy_side_files(graph_dir, text)
    shutil.copy2(graph_dir / MANIFEST, text / MANIFEST)
    shutil.copy2(MODEL_PY, text / "model.py")
