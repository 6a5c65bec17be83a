"""JSON Lines inputs (task splits, router data, calibration prompts): one reader, one error
style."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chmc.errors import ChmcError


def read_jsonl(file: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a missing file, a line that is not JSON or not an
    object is a ChmcError naming `file:line`. Callers check the fields they need."""
    file = Path(file)
    if not file.is_file():
        raise ChmcError(f"{file}: {what} not found")
    rows: list[tuple[int, dict[str, Any]]] = []
    with file.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChmcError(f"{file}:{i}: expected a JSON object per line ({e.msg})") from None
            if not isinstance(row, dict):
                raise ChmcError(f"{file}:{i}: expected a JSON object per line, "
                                f"got {line.strip()[:80]!r}")
            rows.append((i, row))
    return rows
