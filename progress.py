"""Progress of long work: a rich bar with an ETA on a terminal, plain stage lines elsewhere (a
log file or CI reads "stage: 12/40, ETA 1 min" every few seconds instead of redraws)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_EVERY_S = 10.0  # without a terminal: at most one line per stage this often



class Advance(Protocol):
    def __call__(self, label: str, n: int = 1) -> None: ...  # n items done, the last `label`


def millions(sizes: list[int]) -> list[int]:
    """Progress units for items of very different sizes (a model's tensors): millions, at least 1
    each, so that the ETA follows the work rather than the item count."""
    return [max(1, round(size / 1e6)) for size in sizes]


def warn(message: str) -> None:
    """A doubt worth a user's attention that does not stop the work: one line on stderr."""
    print(f"chmc: warning: {message}", file=sys.stderr, flush=True)


class Stages:
    """Reports progress to stderr; `enabled=False` keeps quiet (tests, library calls)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextmanager
    def bar(self, stage: str, total: int) -> Iterator[Advance]:
        if not self.enabled:
            yield lambda label, n=1: None
            return
        if sys.stderr.isatty():
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn())
            with Progress(*columns, transient=True) as progress:
                job = progress.add_task(stage, total=total)
                yield lambda label, n=1: progress.update(job, advance=n,
                                                         description=f"{stage}: {label}")
            return
        start = last = time.monotonic()
        done = 0
        print(f"{stage}: 0/{total}", file=sys.stderr, flush=True)

        def advance(label: str, n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= LINE_EVERY_S or done >= total:
                eta = (now - start) / done * (total - done)
                print(f"{stage}: {done}/{total} ({label}), {now - start:.0f} s, "
                      f"ETA {eta:.0f} s", file=sys.stderr, flush=True)
                last = now

        yield advance

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
