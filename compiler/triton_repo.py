"""Stage: a Triton Inference Server model repository from an export folder.

Layout written (`name` defaults to "chmc"):
  <name>_engine/config.pbtxt        the exported graph as it is: onnxruntime_onnx or tensorrt_plan,
  <name>_engine/1/model.onnx(.data) inputs/outputs exactly as the graph declares them (expert_id
                                    included), max_batch_size 0: the KV cache has its own batch dim
<name>_engine/1/chmc_ort_kernel.so  plugin-form graphs only: the native chmc::ChannelGatherMatMul
                                    kernel, named by `model_operations` with its absolute path
  <name>/config.pbtxt               text in, text out: Python backend with dynamic batching, so one
  <name>/1/model.py                 execute() gets requests for several experts and runs them as one
  <name>/1/chmc.json, tokenizer...  batch with per-row expert ids through chmc.runtime

The text model reads the graph from `../../<name>_engine/1/` (a relative path kept in its config's
parameters), so the weights are on disk once and the repository runs on its own.
Config files are written as protobuf text and, when tritonclient[grpc] is installed, parsed back
with Triton's own ModelConfig message before anything is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chmc.errors import ChmcError, MissingDependencyError, NotSupportedError

ENGINES = ("onnx", "trt")
PLATFORMS = {"onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}
# engine.json (written by `chmc engine`) describes the plan's profiles for chmc.runtime.
GRAPH_FILES = {"onnx": ("model.onnx", "model.onnx.data"), "trt": ("model.plan", "engine.json")}
OP_LIBRARY = "chmc_ort_kernel.so"  # beside a plugin-form graph; Triton's ORT backend loads it
# What the text model needs beside the graph: the runtime loads these from one folder.
META_FILES = ("chmc.json", "tokenizer.json", "config.json", "generation_config.json",
              "tokenizer_config.json", "special_tokens_map.json")
MODEL_PY = Path(__file__).resolve().parent.parent / "runtime" / "triton_model.py"
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32", "float64": "TYPE_FP64", "string": "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output; symbolic dims (str or None) become -1 in the config."""

    name: str
    dtype: str  # numpy-style name: "int64", "float32", ...
    shape: tuple[int | str | None, ...]

    def dims(self) -> list[int]:
        return [d if isinstance(d, int) and d >= 0 else -1 for d in self.shape]


@dataclass(frozen=True)
class TextModelOptions:
    """The text model's batching knobs: wait up to `queue_delay_us` to fill a preferred batch."""

    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    queue_delay_us: int = 20_000
    instances: int = 1
    max_new_tokens: int = 64  # default when a request leaves `max_new_tokens` out


def _tensor_entries(tensors: list[TensorIO]) -> str:
    items = []
    for t in tensors:
        if t.dtype not in TRITON_TYPES:
            raise ChmcError(f"graph tensor '{t.name}' has dtype {t.dtype!r}, which Triton has no type for")
        dims = ", ".join(str(d) for d in t.dims())
        items.append(f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: [ {dims} ] }}')
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


def graph_io(export_dir: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    """The graph's inputs and outputs as the export recorded them in chmc.json's `export` section."""
    file = export_dir / "chmc.json"
    try:
        section = json.loads(file.read_text())["export"]
        return tuple(  # type: ignore[return-value]
            [TensorIO(t["name"], t["dtype"], tuple(t["shape"])) for t in section[key]]
            for key in ("inputs", "outputs")
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ChmcError(f"{file}: no usable 'export' section with inputs/outputs ({e!r})") from None


def is_export(path: Path) -> bool:
    return (path / "chmc.json").is_file() and (path / "model.onnx").is_file()


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (weights stay on disk once), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _export_first(artifact: Path, into: Path) -> Path:
    from chmc.compiler import export as export_stage

    export_stage.export(artifact, into)
    return into


def write_triton_repo(source: str | Path, out: str | Path, *, engine: str = "onnx",
                      name: str = "chmc", force: bool = False,
                      options: TextModelOptions | None = None) -> Path:
    """Write the two-model repository for an export folder (or an artifact, exported first)."""
    from chmc.compiler.outputs import staged_output

    source = Path(source)
    if engine not in ENGINES:
        raise ChmcError(f"--engine {engine!r} is not one of {list(ENGINES)}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ChmcError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    if not (source / "chmc.json").is_file():
        raise ChmcError(f"{source}: not a chmc artifact, export or engine folder (no chmc.json)")
    if engine == "trt" and not (source / "model.plan").is_file():
        raise ChmcError(f"{source}: no model.plan for --engine trt: build one with "
                        "`chmc engine EXPORT --out ENGINE_DIR` and pass ENGINE_DIR")
    with staged_output(out, force) as tmp, tempfile.TemporaryDirectory(dir=tmp) as scratch:
        ready = engine == "trt" or is_export(source)  # an engine folder carries the export's chmc.json
        export_dir = source if ready else _export_first(source, Path(scratch) / "export")
        _copy_files(export_dir, tmp, engine, name)
        inputs, outputs = graph_io(export_dir)
        backend = "onnxruntime" if engine == "onnx" else "tensorrt"
        op_library = None
        if engine == "onnx" and _place_op_library(export_dir, tmp / f"{name}_engine" / "1"):
            op_library = str(Path(out).resolve() / f"{name}_engine" / "1" / OP_LIBRARY)
        configs = {
            f"{name}_engine": engine_config(f"{name}_engine", inputs, outputs, engine, op_library),
            name: text_model_config(name, f"../../{name}_engine/1", backend,
                                    options or TextModelOptions()),
        }
        for model, text in configs.items():
            (tmp / model / "config.pbtxt").write_text(text)
            try:
                parse_model_config(text, f"{out}/{model}/config.pbtxt")
            except MissingDependencyError:
                pass  # validation is a check, not a requirement for writing the repository
    return Path(out)


def _place_op_library(export_dir: Path, graph_dir: Path) -> bool:
    """Put the native kernel beside a plugin-form graph (Triton's ORT backend cannot run its node
    otherwise); False for other forms."""
    from chmc.runtime import read_export_manifest

    export = read_export_manifest(export_dir)["export"]
    if export.get("linear") != "plugin":
        return False
    if export.get("dtype") != "float32":
        raise NotSupportedError(
            f"{export_dir}: a {export.get('dtype')} plugin-form graph cannot be served by Triton's "
            "ONNX Runtime backend (the chmc::ChannelGatherMatMul CPU kernel is float32): export "
            "with --dtype float32, or build a TensorRT engine and use --engine trt")
    from chmc.plugins.channel_gather_matmul.onnxruntime_op import library_path

    shutil.copy2(library_path(), graph_dir / OP_LIBRARY)
    return True


def _copy_files(export_dir: Path, repo: Path, engine: str, name: str) -> None:
    """Graph files into <name>_engine/1, manifest, tokenizer and model.py into <name>/1."""
    graph, text = repo / f"{name}_engine" / "1", repo / name / "1"
    graph.mkdir(parents=True)
    text.mkdir(parents=True)
    for f in GRAPH_FILES[engine]:
        if (export_dir / f).is_file():
            _place(export_dir / f, graph / f)
    for f in META_FILES:
        if (export_dir / f).is_file():
            shutil.copy2(export_dir / f, text / f)
    shutil.copy2(MODEL_PY, text / "model.py")
