"""chmc.runtime: load a compiled model once, generate for any mix of experts.

    from chmc.runtime import load
    runner = load("out/onnx")                    # export folder, artifact, or HF checkpoint
    runner.generate(["2+3="], experts=["math"])  # -> ["5"]

The ONNX Runtime path (this module, onnxruntime_backend, generation, tokenizer) imports neither
torch nor transformers; an artifact or checkpoint given to it is exported once into a cache folder
first (that step does need torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from chmc.errors import ChmcError

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def folder_kind(path: Path) -> str:
    """'export', 'artifact' or 'checkpoint'."""
    if not path.is_dir():
        raise ChmcError(f"{path}: not a folder (expected an ONNX export, an artifact or a "
                        "Hugging Face model folder)")
    manifest = path / "chmc.json"
    if (path / "model.onnx").is_file() and manifest.is_file():
        return "export"
    if manifest.is_file():
        return "artifact"
    if (path / "config.json").is_file():
        return "checkpoint"
    raise ChmcError(f"{path}: neither an ONNX export (model.onnx + chmc.json), an artifact "
                    "(chmc.json) nor a Hugging Face folder (config.json)")


def read_export_manifest(folder: Path) -> dict[str, Any]:
    file = folder / "chmc.json"
    try:
        manifest: dict[str, Any] = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChmcError(f"{file}: invalid JSON ({e})") from None
    if "export" not in manifest:
        raise ChmcError(f"{file}: has no 'export' section (not written by `chmc export`)")
    return manifest


def cached_export(path: Path, linear: str = "gather", dtype: str = "float32") -> Path:
    """Export an artifact/checkpoint once into <cache>/onnx/<hash> (chmc.cache) and reuse it."""
    from chmc.cache import cache_root
    from chmc.compiler.export import export

    key = hashlib.sha256()
    for name in ("chmc.json", "config.json"):
        if (path / name).is_file():
            key.update((path / name).read_bytes())
    key.update(f"{path.resolve()}|{linear}|{dtype}".encode())
    root = cache_root() / "onnx"
    out = root / key.hexdigest()[:16]
    if not (out / "model.onnx").is_file():
        root.mkdir(parents=True, exist_ok=True)
        export(path, out, linear=linear, dtype=dtype, force=out.exists())
    return out


def load(path: str | Path, backend: str = "onnxruntime", **options: Any) -> Any:
    """A Runner for an export folder, an artifact or a plain checkpoint.

    options: onnxruntime: providers, threads, linear/dtype (when exporting first; linear "auto":
    the plugin form where its native CPU kernel builds, else the gather form);
    torch: device, dtype, merged (one model reading the banks, experts per row; the default on
    CUDA, where it runs the Triton kernels and replays the decode step from a CUDA graph). tensorrt takes an engine folder (`chmc engine`) and needs a CUDA GPU.
    """
    from chmc.runtime.generation import Runner
    from chmc.runtime.tokenizer import TextTokenizer

    path = Path(path)
    if backend not in BACKENDS:
        raise ChmcError(f"--backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "tensorrt":  # an engine folder (chmc engine): the ORT loop drives the engine
        from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend
        from chmc.runtime.tensorrt_backend import TensorRTRunner

        if not (path / "model.plan").is_file():
            raise ChmcError(f"{path}: the tensorrt backend needs an engine folder with model.plan "
                            "(build one with `chmc engine EXPORT --out DIR`)")
        session = TensorRTRunner(path)  # checks TensorRT and the GPU first
        manifest = read_export_manifest(path)
        return Runner(OnnxRuntimeBackend(path, manifest["export"], session=session), manifest,
                      TextTokenizer(path))
    kind = folder_kind(path)
    if backend == "torch":
        from chmc.runtime.torch_backend import TorchBackend

        tb = TorchBackend(path, kind, **options)
        return Runner(tb, tb.manifest, TextTokenizer(tb.folder))
    from chmc.runtime.onnxruntime_backend import OnnxRuntimeBackend, preferred_linear

    if kind != "export":
        linear, dtype = options.pop("linear", "auto"), options.pop("dtype", "float32")
        path = cached_export(path, preferred_linear(dtype) if linear == "auto" else linear, dtype)
    manifest = read_export_manifest(path)
    return Runner(OnnxRuntimeBackend(path, manifest["export"], **options), manifest,
                  TextTokenizer(path))


__all__ = ["BACKENDS", "load"]
