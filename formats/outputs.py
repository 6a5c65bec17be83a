"""Every stage writes into a temporary sibling folder and renames it into place when complete,
so a failed or interrupted run never leaves a half-written output behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chmc.errors import ChmcError


def check_output_path(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) when the output exists and --force was not given."""
    out = Path(out)
    if out.exists() and not force:
        raise ChmcError(f"{out}: output path exists (pass --force to replace it)")
    if not out.parent.exists():
        raise ChmcError(f"{out.parent}: parent folder of the output does not exist")
    return out


@contextmanager
def staged_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out`, on error it vanishes."""
    out = check_output_path(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --force: swap the old output out only after the new one is complete
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
