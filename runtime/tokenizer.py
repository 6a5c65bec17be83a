"""Text <-> ids with the `tokenizers` library alone (no transformers), from an export folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chmc.errors import ChmcError, MissingDependencyError


class TextTokenizer:
    """Wraps tokenizer.json; encode adds the special tokens its post-processor defines
    (e.g. BOS)."""

    def __init__(self, folder: str | Path):
        file = Path(folder) / "tokenizer.json"
        if not file.is_file():
            raise ChmcError(f"{folder}: no tokenizer.json (copy the base model's tokenizer files "
                            "into the folder, or pass token ids)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MissingDependencyError("the runtime needs `pip install tokenizers`") from None
        try:
            self._tok: Any = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001  tokenizers raises a plain Exception on a bad file
            raise ChmcError(f"{file}: cannot load tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)
