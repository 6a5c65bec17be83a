"""Typed JSON manifests: pydantic models read with one-line errors naming the file and field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from chmc.errors import ChmcError

M = TypeVar("M", bound="Manifest")


class Manifest(BaseModel):
    """Base of every manifest: unknown fields are errors, values are validated on read."""

    # inf is a valid relative error (an expert identical to its base): write it as JSON's Infinity
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """('models', 1, 'parameters', 'weight') -> 'models[1].parameters.weight'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def first_error(e: ValidationError) -> str:
    """"field 'a.b[0]': message" of a pydantic error's first problem."""
    err = e.errors()[0]
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"field '{field_path(err['loc'])}': {message}"


def read_json(file: Path, what: str) -> Any:
    """The JSON document in `file`; a missing or malformed file is a ChmcError naming it."""
    if not file.is_file():
        raise ChmcError(f"{file.parent}: not a {what} (no {file.name})")
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChmcError(f"{file}: invalid JSON ({e})") from None


def check_format(raw: Any, file: Path, fmt: str, version: int) -> None:
    """The format tag and version come first, so a wrong kind of file is named as such."""
    if not isinstance(raw, dict):
        raise ChmcError(f"{file}: expected a JSON object")
    if raw.get("format") != fmt:
        raise ChmcError(f"{file}: field 'format' is {raw.get('format')!r}, expected {fmt!r}")
    if raw.get("format_version") != version:
        raise ChmcError(f"{file}: format_version {raw.get('format_version')} is not supported "
                        f"(this chmc reads {version})")


def parse(cls: type[M], raw: Any, file: Path) -> M:
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ChmcError(f"{file}: {first_error(e)}") from None


def read_manifest_file(cls: type[M], file: Path, what: str) -> M:
    """A manifest of `cls` from `file`: its format tag and version checked first (the model's
    own defaults), then every field; `what` names the folder kind in errors."""
    raw = read_json(file, what)
    fields = cls.model_fields
    check_format(raw, file, fields["format"].default, fields["format_version"].default)
    return parse(cls, raw, file)


def validated(cls: type[M], where: str, **values: Any) -> M:
    """A model from keyword values; a bad one is a ChmcError naming `where` and the field."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise ChmcError(f"{where}: {first_error(e)}") from None


def write_json(file: Path, model: BaseModel) -> None:
    """Write atomically (a temporary sibling renamed into place); absent optional sections (None)
    are left out, as readers default them."""
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(model.model_dump_json(indent=1, exclude_none=True))
    os.replace(tmp, file)
