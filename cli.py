"""The `chmc` command line: parses, validates and calls the Python API, nothing more.

Each command's body lives with its stage (chmc.compiler.*, chmc.runtime.*); this module only
maps options onto those calls. A ChmcError becomes one line on stderr and exit status 1.
Heavy imports (torch, transformers, onnx) happen inside commands, so `chmc --help` is instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from chmc.errors import ChmcError

app = typer.Typer(
    name="chmc",
    help="Deployment compiler for channel-merged experts: N fine-tunes -> K banks -> one graph.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a ChmcError into one line on stderr and a non-zero exit, with no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ChmcError as e:
            typer.echo(f"chmc: error: {e}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


# Commands are added below, one small function each, grouped by stage.
