"""chmc.runtime: load a compiled model once, generate for any mix of experts.

    from chmc.runtime import load
    runner = load("out/onnx")                    # an export folder (chmc export)
    runner.generate(["2+3="], experts=["math"])  # -> ["5"]

`load` dispatches on the folder's kind (chmc.formats.folders): an export folder runs on ONNX Runtime
(or, with backend="torch", its source artifact on PyTorch), an engine folder on TensorRT, an
artifact or a checkpoint on PyTorch. `chmc.load` also takes an artifact for ONNX Runtime: it
exports it into the cache first (that needs the compiler; the runtime never imports it).

The ONNX Runtime path (this module, onnxruntime_backend, graph_state, generation, tokenizer)
imports neither torch nor transformers; the other backends import them when they are chosen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from chmc.errors import ChmcError, MissingDependencyError
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import Checkpoint, GenerationIds, read_config
from chmc.formats.engine import EngineFolder
from chmc.formats.export import ExportFolder, ExportManifest
from chmc.formats.folders import DESCRIPTIONS, folder_kind, open_folder
from chmc.models.rope import longrope_switch
from chmc.plugins.tensorrt import require_tensorrt
from chmc.runtime.generation import ModelInfo
from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions
from chmc.runtime.runner import Runner
from chmc.runtime.tensorrt_backend import TensorRTBackend, TensorRTOptions
from chmc.runtime.tokenizer import TextTokenizer

BACKENDS = ("onnxruntime", "torch", "tensorrt")
FOLDERS = {"onnxruntime": ("export",), "tensorrt": ("engine",),
           "torch": ("export", "artifact", "checkpoint")}
WRONG_FOLDER = {
    "onnxruntime": "the onnxruntime backend runs an export folder: export it first (`chmc "
                   "export`), or load it with chmc.load, which exports into the cache",
    "tensorrt": "the tensorrt backend needs an engine folder with model.plan (build one with "
                "`chmc engine EXPORT --out DIR`)",
    "torch": "the torch backend runs an artifact, a checkpoint or an export folder's source"}


def typed_options(cls: type[Any], backend: str, options: dict[str, Any]) -> Any:
    """A backend's options dataclass from keyword options; an unknown one is a one-line error."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ChmcError(f"the {backend} backend has no option '{unknown[0]}' (it takes "
                        f"{', '.join(known) or 'none'})")
    return cls(**options)


def export_info(path: Path, manifest: ExportManifest) -> ModelInfo:
    section = manifest.export
    return ModelInfo(str(path), tuple(manifest.experts), manifest.router is not None,
                     GenerationIds(tuple(section.eos_token_ids), section.pad_token_id),
                     longrope_switch(read_config(path)))


def load(path: str | Path, backend: str = "onnxruntime", **options: Any) -> Runner:
    """A Runner for a folder this backend runs as it is (FOLDERS); options are the backend's
    (OnnxRuntimeOptions, TorchOptions, TensorRTOptions)."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ChmcError(f"--backend {backend!r} is not one of {list(BACKENDS)}")
    kind = folder_kind(path)
    if kind not in FOLDERS[backend]:
        raise ChmcError(f"{path}: is {DESCRIPTIONS[kind]}; {WRONG_FOLDER[backend]}")
    if backend == "tensorrt":
        require_tensorrt()  # before the engine is read
    folder = open_folder(path)
    if isinstance(folder, EngineFolder):
        trt = TensorRTBackend(folder, typed_options(TensorRTOptions, backend, options))
        return Runner(trt, export_info(path, folder.export), TextTokenizer(path))
    if isinstance(folder, ExportFolder) and backend == "onnxruntime":
        ort = OnnxRuntimeBackend(folder, typed_options(OnnxRuntimeOptions, backend, options))
        return Runner(ort, export_info(path, folder.manifest), TextTokenizer(path))
    try:  # torch: only when chosen
        from chmc.runtime.torch_backend import TorchBackend, TorchOptions
    except ImportError as e:
        raise MissingDependencyError(f"the torch backend needs torch and transformers in this "
                                     f"Python environment ({e})") from None

    if isinstance(folder, ExportFolder):  # the torch backend runs the export's source
        source = Path(folder.section.source)
        if not source.is_dir():
            raise ChmcError(f"{path}: the export's source {source} is gone; the torch backend "
                            "needs the artifact or checkpoint")
        folder = open_folder(source, expect=("artifact", "checkpoint"))
    assert isinstance(folder, (Artifact, Checkpoint))
    tb = TorchBackend(folder, typed_options(TorchOptions, backend, options))
    experts = tuple(folder.experts) if isinstance(folder, Artifact) else ()
    routed = isinstance(folder, Artifact) and folder.manifest.router is not None
    info = ModelInfo(str(folder.path), experts, routed, GenerationIds.of(folder.path),
                     longrope_switch(read_config(folder.path)))
    return Runner(tb, info, TextTokenizer(folder.path))


__all__ = ["BACKENDS", "load"]
