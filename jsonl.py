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
    with file.open("rb") as f:  # bytes, so a line that is not UTF-8 is named like any other
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ChmcError(f"{file}:{i}: not UTF-8 text ({e.reason} at byte {e.start})") \
                    from None
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
