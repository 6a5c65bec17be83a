"""Stage: an artifact, export or engine folder -> a Triton Inference Server model repository
(chmc.formats.repository describes the layout).

Three backends serve the text model `<name>` (the Python backend; its config's `backend`
parameter says which):
  - onnxruntime / tensorrt: the graph model `<name>_engine` is the exported graph (or engine) as
    it is: onnxruntime_onnx or tensorrt_plan, inputs/outputs exactly as the graph declares them
    (expert_id included), max_batch_size 0 (the KV cache has its own batch dim); a plugin-form
    graph carries its native chmc::ChannelGatherMatMul kernel, named by `model_operations` with
    its absolute path. The text model reads the graph from `../../<name>_engine/1/` (a relative
    path in its config), so the weights are on disk once.
  - torch: no graph model; the artifact's files are linked into `<name>/1/artifact/` and the text
    model serves them with the merged torch CUDA runtime (Triton kernels, CUDA graphs).
The text model schedules per decode step (`continuous`, decoupled: requests join and leave the
running batch, tokens stream) or per request (`request`: the dynamic batcher's batches run to
completion). Config files are written as protobuf text and, when tritonclient[grpc] is
installed, parsed back with Triton's own ModelConfig message before anything is renamed into
place.
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

BACKENDS = ("onnxruntime", "tensorrt", "torch")
SCHEDULING = ("continuous", "request")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
# engine.json (written by `chmc engine`) describes the plan's profiles for chmc.runtime.
GRAPH_FILES = {"onnxruntime": (GRAPH, GRAPH_DATA), "tensorrt": (PLAN, ENGINE_JSON)}
ARTIFACT_DIR = "artifact"  # the torch backend's artifact, inside the text model's version
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
    """The text model's serving knobs. `scheduling`: continuous (per decode step, streaming) or
    request (the dynamic batcher: wait up to `queue_delay_us` to fill a preferred batch, run it
    to the end). `slots`, `kv_tokens`, `queue`: the continuous scheduler's limits
    (chmc.runtime.scheduler.Limits); `stream_interval_ms`: the least time between two streamed
    responses of a request (0: one per text piece; more sends several tokens per response).
    `device`: the torch backend's."""

    scheduling: str = "continuous"
    slots: int = 16
    kv_tokens: int = 16384
    queue: int = 64
    stream_interval_ms: float = 20.0
    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    queue_delay_us: int = 20_000
    instances: int = 1
    max_new_tokens: int = 64  # default when a request leaves `max_tokens` out
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.scheduling not in SCHEDULING:
            raise ChmcError(f"--scheduling {self.scheduling!r} is not one of {list(SCHEDULING)}")
        if not self.stream_interval_ms >= 0:
            raise ChmcError(f"--stream-interval-ms {self.stream_interval_ms}: must be >= 0")
        for field in ("slots", "kv_tokens", "queue", "max_batch_size", "max_new_tokens"):
            if getattr(self, field) < 1:
                raise ChmcError(f"--{field.replace('_', '-')} {getattr(self, field)}: must be "
                                ">= 1")


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


def engine_config(name: str, inputs: list[TensorIO], outputs: list[TensorIO],
                  backend: str = "onnxruntime", op_library: str | None = None) -> str:
    """config.pbtxt of the graph model: no batching by Triton (batch is the graph's first dim).
    `op_library`: absolute path of a custom-op library the ONNX Runtime backend registers."""
    if backend not in PLATFORMS:
        raise ChmcError(f"backend {backend!r} has no graph model; one of {list(PLATFORMS)}")
    ops = f'model_operations {{ op_library_filename: "{op_library}" }}\n' if op_library else ""
    return (
        f'name: "{name}"\nplatform: "{PLATFORMS[backend]}"\nmax_batch_size: 0\n'
        f"input [\n{_tensor_entries(inputs)}\n]\noutput [\n{_tensor_entries(outputs)}\n]\n"
        f"{ops}instance_group [ {{ kind: KIND_AUTO count: 1 }} ]\n"
    )


# The text model's inputs: the names of Triton's generate extension (and TensorRT-LLM's).
TEXT_INPUTS = (("text_input", "TYPE_STRING", 1), ("expert", "TYPE_STRING", 1),
               ("max_tokens", "TYPE_INT32", 1), ("temperature", "TYPE_FP32", 1),
               ("top_p", "TYPE_FP32", 1), ("seed", "TYPE_INT64", 1), ("stop", "TYPE_STRING", -1),
               ("stream", "TYPE_BOOL", 1))


def text_model_config(name: str, backend: str, opts: TextModelOptions,
                      where: dict[str, str]) -> str:
    """config.pbtxt of the text model: the Python backend, decoupled for continuous scheduling,
    dynamically batched for request scheduling. `where`: engine_dir or artifact_dir."""
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ]'
                        f'{"" if n == "text_input" else " optional: true"} }}'
                        for n, t, d in TEXT_INPUTS)
    params = {"backend": backend, "scheduling": opts.scheduling,
              "max_new_tokens": str(opts.max_new_tokens), **where}
    if opts.scheduling == "continuous":
        params.update(slots=str(opts.slots), kv_tokens=str(opts.kv_tokens), queue=str(opts.queue),
                      stream_interval_ms=str(opts.stream_interval_ms))
        batching = "max_batch_size: 0\nmodel_transaction_policy { decoupled: true }\n"
    else:
        preferred = ", ".join(str(s) for s in opts.preferred_batch_sizes
                              if s <= opts.max_batch_size)
        batching = (f"max_batch_size: {opts.max_batch_size}\ndynamic_batching {{\n"
                    f"  preferred_batch_size: [ {preferred} ]\n"
                    f"  max_queue_delay_microseconds: {opts.queue_delay_us}\n}}\n")
    if backend == "torch":
        params["device"] = opts.device
    kind = "KIND_MODEL" if backend == "torch" else "KIND_CPU"  # torch picks its own device
    lines = "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
                    for k, v in params.items())
    return (f'name: "{name}"\nbackend: "python"\n{batching}input [\n{inputs}\n]\n'
            f'output [\n  {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }}\n]\n'
            f"instance_group [ {{ kind: {kind} count: {opts.instances} }} ]\n{lines}")


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


def write_triton_repo(source: str | Path, out: str | Path, *, backend: str = "onnxruntime",
                      name: str = "chmc", force: bool = False,
                      options: TextModelOptions | None = None) -> Path:
    """Write the repository: for onnxruntime, an export folder (an artifact is exported first,
    in the portable gather form); for tensorrt, an engine folder; for torch, an artifact."""
    from chmc.compiler.export import export  # torch and onnx: only for an artifact source

    source = Path(source)
    options = options or TextModelOptions()
    if backend not in BACKENDS:
        raise ChmcError(f"--backend {backend!r} is not one of {list(BACKENDS)}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ChmcError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    if backend == "tensorrt" and folder_kind(source) != "engine":
        raise ChmcError(f"{source}: no model.plan for --backend tensorrt: build one with "
                        "`chmc engine EXPORT --out ENGINE_DIR` and pass ENGINE_DIR")
    expect = {"tensorrt": ("engine",), "torch": ("artifact",)}.get(backend,
                                                                  ("artifact", "export"))
    folder = open_folder(source, expect=expect)
    with staged_output(out, force, inputs=[source]) as tmp:
        text_dir = tmp / name / "1"
        text_dir.mkdir(parents=True)
        shutil.copy2(MODEL_PY, text_dir / "model.py")
        configs = {}
        if backend == "torch":
            for f in sorted(p for p in source.rglob("*") if p.is_file()):
                (text_dir / ARTIFACT_DIR / f.relative_to(source)).parent.mkdir(
                    parents=True, exist_ok=True)
                _place(f, text_dir / ARTIFACT_DIR / f.relative_to(source))
            where = {"artifact_dir": ARTIFACT_DIR}
        else:
            if isinstance(folder, EngineFolder):
                graph_dir, manifest = folder.path, folder.export
            else:
                if not isinstance(folder, ExportFolder):  # an artifact: export it first
                    folder = ExportFolder(export(source, tmp / ".export"))
                graph_dir, manifest = folder.path, folder.manifest
            _copy_graph(graph_dir, tmp, backend, name)
            op_library = None
            if backend == "onnxruntime" and _place_op_library(graph_dir,
                                                              tmp / f"{name}_engine" / "1"):
                op_library = str(Path(out).resolve() / f"{name}_engine" / "1" / OP_LIBRARY)
            section = manifest.export
            configs[f"{name}_engine"] = engine_config(f"{name}_engine", section.inputs,
                                                      section.outputs, backend, op_library)
            where = {"engine_dir": f"../../{name}_engine/1"}
        configs[name] = text_model_config(name, backend, options, where)
        for model, text in configs.items():
            (tmp / model / "config.pbtxt").write_text(text)
            # validation is a check, not a requirement for writing the repository
            with contextlib.suppress(MissingDependencyError):
                parse_model_config(text, f"{out}/{model}/config.pbtxt")
        shutil.rmtree(tmp / ".export", ignore_errors=True)
        write_repository_manifest(tmp, RepositoryManifest(
            name=name, backend=backend, scheduling=options.scheduling,
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
            "with --dtype float32, or build a TensorRT engine and use --backend tensorrt")
    shutil.copy2(library_path(), graph_dir / OP_LIBRARY)
    return True


def _copy_graph(graph_dir: Path, repo: Path, backend: str, name: str) -> None:
    """Graph files into <name>_engine/1; manifest, tokenizer and config into <name>/1 (the
    runtime reads them from one folder)."""
    graph, text = repo / f"{name}_engine" / "1", repo / name / "1"
    graph.mkdir(parents=True)
    for f in GRAPH_FILES[backend]:
        if (graph_dir / f).is_file():
            _place(graph_dir / f, graph / f)
    copy_side_files(graph_dir, text)
    shutil.copy2(graph_dir / MANIFEST, text / MANIFEST)
