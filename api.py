"""The Python API over both rooms: what takes an artifact where the runtime takes an export
composes a compiler stage with a runtime loader here (the runtime never imports the compiler).

    import chmc
    chmc.build("./base", {"math": "./math", "code": "./code"}, "./merged", groups=2)
    runner = chmc.load("./merged")            # exported once into the cache, then ONNX Runtime
    runner.generate(["2+3="], experts=["math"])
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from chmc.cache import cache_root
from chmc.compiler.export import export
from chmc.compiler.pipeline import build
from chmc.compiler.triton_repo import write_triton_repo
from chmc.errors import ChmcError
from chmc.formats.artifact import MANIFEST
from chmc.formats.checkpoint import CONFIG
from chmc.formats.export import ExportFolder
from chmc.formats.folders import folder_kind, open_folder
from chmc.formats.repository import TritonRepository
from chmc.runtime import load as load_folder
from chmc.runtime.onnxruntime_backend import preferred_linear
from chmc.runtime.serve import find_tritonserver
from chmc.runtime.serve import serve as serve_repository

__all__ = ["build", "cached_export", "check", "load", "serve"]


def cached_export(path: Path, linear: str = "gather", dtype: str = "float32") -> Path:
    """Export an artifact/checkpoint once into <cache>/onnx/<hash> (chmc.cache) and reuse it."""
    key = hashlib.sha256()
    for name in (MANIFEST, CONFIG):
        if (path / name).is_file():
            key.update((path / name).read_bytes())
    key.update(f"{path.resolve()}|{linear}|{dtype}".encode())
    root = cache_root() / "onnx"
    out = root / key.hexdigest()[:16]
    if not (out / "model.onnx").is_file():
        root.mkdir(parents=True, exist_ok=True)
        export(path, out, linear=linear, dtype=dtype, force=out.exists())
    return out


def _exported(path: Path, linear: str = "auto", dtype: str = "float32") -> Path:
    """`path` itself if it is an export folder, else its cached export (`linear` "auto": the plugin
    form where its native CPU kernel builds, else the gather form)."""
    if folder_kind(path) == "export":
        return path
    return cached_export(path, preferred_linear(dtype) if linear == "auto" else linear, dtype)


def load(path: str | Path, backend: str = "onnxruntime", **options: Any) -> Any:
    """chmc.runtime.load, also for an artifact or checkpoint on ONNX Runtime (exported once into
    the cache first; `linear` and `dtype` choose that export)."""
    path = Path(path)
    if backend == "onnxruntime" and folder_kind(path) in ("artifact", "checkpoint"):
        path = _exported(path, options.pop("linear", "auto"), options.pop("dtype", "float32"))
    return load_folder(path, backend, **options)


def check(source: str | Path, *, atol: float | None = None, rtol: float | None = None,
          seq: int = 8) -> tuple[str, Table, bool]:
    """`chmc check`: an export folder (or an artifact, exported first) against transformers,
    within the tolerances of the graph's dtype (TOLERANCES) unless atol / rtol are given.
    Returns a line saying which tolerances, the table per expert, and whether all passed."""
    from chmc.runtime.check import TOLERANCES, check_export  # polygraphy: optional

    folder = ExportFolder(_exported(Path(source), "gather"))
    dtype = folder.section.dtype
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    whose = "the defaults" if (atol, rtol) == TOLERANCES[dtype] else "as given"
    table, ok = check_export(folder, atol=atol, rtol=rtol, seq=seq)
    return f"{dtype} graph: atol {atol:g}, rtol {rtol:g} ({whose} for it)", table, ok


def serve(source: str | Path, *, port: int = 8000, host: str = "127.0.0.1",
          tritonserver: str | Path | None = None, models: list[str] | None = None) -> None:
    """`chmc serve`: a Triton repository, or an artifact / export folder turned into a temporary
    one, served until Ctrl-C."""
    source = Path(source)
    if not source.exists():
        raise ChmcError(f"{source}: no such file or directory")
    find_tritonserver(tritonserver)  # before any work
    with tempfile.TemporaryDirectory(prefix="chmc-serve-") as tmp:
        folder = open_folder(source, expect=("repository", "artifact", "export"))
        repo = folder if isinstance(folder, TritonRepository) else TritonRepository(
            write_triton_repo(source, Path(tmp) / "repo"))
        serve_repository(repo, port=port, host=host, tritonserver=tritonserver, models=models)
