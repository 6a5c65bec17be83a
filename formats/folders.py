"""`open_folder(path)`: the typed object for any folder kind chmc reads, decided by its manifest
(never by guessing from file names), or a one-line error saying what the folder is not."""

from __future__ import annotations

import json
from pathlib import Path

from chmc.errors import ChmcError
from chmc.formats import artifact, engine, export, repository
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import CONFIG, Checkpoint
from chmc.formats.engine import EngineFolder
from chmc.formats.export import ExportFolder
from chmc.formats.repository import TritonRepository, is_repository

Folder = Checkpoint | Artifact | ExportFolder | EngineFolder | TritonRepository
KINDS = ("checkpoint", "artifact", "export", "engine", "repository")
DESCRIPTIONS = {"checkpoint": "a Hugging Face model folder", "artifact": "a chmc artifact",
                "export": "a chmc export (ONNX) folder", "engine": "a chmc TensorRT engine folder",
                "repository": "a Triton model repository"}


def manifest_format(path: Path) -> str | None:
    """The `format` tag of path/chmc.json, None when there is no such file."""
    file = path / artifact.MANIFEST
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChmcError(f"{file}: invalid JSON ({e})") from None
    return raw.get("format") if isinstance(raw, dict) else None


def folder_kind(path: Path) -> str:
    """One of KINDS, from the folder's own manifest."""
    if not path.exists():
        raise ChmcError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ChmcError(f"{path}: not a folder (expected a chmc artifact, export, engine, "
                        "Triton repository or Hugging Face model folder)")
    if (path / engine.ENGINE_JSON).is_file() or (path / engine.PLAN).is_file():
        return "engine"
    fmt = manifest_format(path)
    if fmt == artifact.FORMAT:
        return "artifact"
    if fmt == export.FORMAT:
        return "export"
    if fmt is not None:
        raise ChmcError(f"{path / artifact.MANIFEST}: format {fmt!r} is not one chmc reads "
                        f"({artifact.FORMAT!r} or {export.FORMAT!r})")
    if (path / repository.REPOSITORY_JSON).is_file() or is_repository(path):
        return "repository"
    if (path / CONFIG).is_file():
        return "checkpoint"
    raise ChmcError(f"{path}: not a chmc artifact, export or engine folder, a Triton repository "
                    "or a Hugging Face model folder (no chmc.json, engine.json, */config.pbtxt "
                    "or config.json)")


def open_folder(path: str | Path, *, expect: tuple[str, ...] = KINDS) -> Folder:
    """The typed folder at `path`; `expect` lists the kinds the caller takes (others are a
    one-line error naming what the folder is and what was expected)."""
    path = Path(path)
    kind = folder_kind(path)
    if kind not in expect:
        raise ChmcError(f"{path}: is {DESCRIPTIONS[kind]}; expected "
                        + " or ".join(DESCRIPTIONS[k] for k in expect))
    opener: dict[str, type[Folder]] = {"checkpoint": Checkpoint, "artifact": Artifact,
                                        "export": ExportFolder, "engine": EngineFolder,
                                        "repository": TritonRepository}
    return opener[kind](path)
