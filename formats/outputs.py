"""Output paths that cannot hurt, and outputs that appear whole or not at all.

Every stage checks its output before any work (`check_output_path`): not the filesystem root, the
home folder, the working folder or one of its parents, not an input or a folder holding one; an
existing output is replaced (`--force`) only when chmc wrote it (its manifest says so) or it is
empty; its parent must exist and be writable. Then the stage writes into a temporary sibling
folder that is renamed into place when complete, so a failed or interrupted run never leaves a
half-written output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from chmc.errors import ChmcError

# A folder holding one of these was written by chmc (artifact and export: chmc.json; engine;
# Triton repository; tiny family), so --force may replace it.
CHMC_MANIFESTS = ("chmc.json", "engine.json", "chmc-repository.json", "family.json")


def written_by_chmc(folder: Path) -> bool:
    return any((folder / name).is_file() for name in CHMC_MANIFESTS)


def _refuse(out: Path, inputs: Iterable[str | Path]) -> str | None:
    """Why `out` may never be an output, or None."""
    where = out.resolve()
    cwd = Path.cwd().resolve()
    if where == Path(where.anchor):
        return "it is the filesystem root"
    if where == Path.home().resolve():
        return "it is the home folder"
    if cwd == where or where in cwd.parents:
        return "it is the working folder or one of its parents"
    for given in inputs:
        source = Path(given).resolve()
        if source == where or where in source.parents:
            return f"it is, or holds, the input {given}"
    return None


def check_output_path(out: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early (before any work) when `out` cannot be written or replaced safely."""
    out = Path(out)
    why = _refuse(out, inputs)
    if why:
        raise ChmcError(f"{out}: refusing to write an output there ({why}); choose a new folder")
    if out.is_symlink() or out.exists():
        if not force:
            raise ChmcError(f"{out}: output path exists (pass --force to replace it)")
        if out.is_symlink() or not out.is_dir():
            raise ChmcError(f"{out}: exists and is not a folder; --force replaces only a folder "
                            "chmc wrote: remove it yourself or choose another output")
        entries = sorted(p.name for p in out.iterdir())
        if entries and not written_by_chmc(out):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ChmcError(f"{out}: --force replaces only a folder chmc wrote (with one of "
                            f"{', '.join(CHMC_MANIFESTS)}) or an empty one, and this one holds "
                            f"{len(entries)} other entries ({shown}): remove it yourself or "
                            "choose another output")
    check_writable_folder(out.parent, f"the output {out}")
    return out


def check_writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise ChmcError(f"{folder}: parent folder of {what} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ChmcError(f"{folder}: cannot write {what} there (permission denied)")


def check_output_file(file: str | Path, what: str) -> Path:
    """A file chmc will write at the end of a long run, checked before the run starts."""
    file = Path(file)
    if file.is_dir():
        raise ChmcError(f"{file}: {what} is a folder; give a file name")
    check_writable_folder(file.parent, f"{what} {file}")
    return file


@contextmanager
def staged_output(out: str | Path, force: bool = False,
                  inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out`, on error it vanishes."""
    out = check_output_path(out, force, inputs)
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
