"""`chmc serve`: run a tritonserver process on a model repository, and stop it cleanly.

The server runs in its own process group (start_new_session), so stopping it also ends the Python
backend stubs it started; stop() sends SIGTERM to the group, then SIGKILL after a grace period.
Readiness is polled over HTTP with the standard library only (bounded by a deadline).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from chmc.errors import ChmcError, MissingDependencyError
from chmc.formats.repository import TritonRepository

if TYPE_CHECKING:
    from collections.abc import Iterator

    from typing_extensions import Self


EXIT_TIMEOUT_S = 10  # how long a stopping server waits for in-flight work and open connections


def find_tritonserver(explicit: str | Path | None = None) -> Path:
    """The tritonserver binary: the one given, else the first on PATH."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ChmcError(f"--tritonserver {path}: not an executable file")
        return path
    found = shutil.which("tritonserver")
    if found is None:
        raise MissingDependencyError(
            "no tritonserver on PATH: run inside a Triton container or pass --tritonserver PATH"
        )
    return Path(found)


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A TCP port nobody uses right now (the OS picks it), and the `count - 1` ports after it
    free as well: `chmc serve` puts gRPC on port + 1."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port + count <= 65536 and all(_bindable(host, p) for p in range(port + 1, port + count)):
            return port


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class TritonServer:
    """One tritonserver process bound to `host`; use as a context manager or call start()/stop()."""

    def __init__(self, repository: str | Path, *, port: int, host: str = "127.0.0.1",
                 grpc_port: int | None = None, executable: str | Path | None = None,
                 models: list[str] | None = None, env: dict[str, str] | None = None,
                 log: str | Path | None = None):
        self.repository = Path(repository).resolve()
        self.port, self.host, self.grpc_port = port, host, grpc_port  # grpc_port None: no gRPC
        self.executable = find_tritonserver(executable)
        self.models = models  # None: load everything; else explicit mode with just these
        self.env = env
        self.log = Path(log) if log else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(self.executable), f"--model-repository={self.repository}",
               f"--http-address={self.host}", f"--http-port={self.port}", "--allow-metrics=false",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
        if self.grpc_port is None:
            cmd.append("--allow-grpc=false")
        else:
            cmd += [f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}"]
        backends = self.executable.resolve().parent.parent / "backends"
        if backends.is_dir():  # a relocated server (e.g. a wheel's) keeps backends beside bin/
            cmd.append(f"--backend-directory={backends}")
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in self.models]
        return cmd

    def start(self, ready_timeout: float = 120.0) -> Self:
        # Without a log file the server logs to our stderr; stdout stays for chmc's own lines.
        with open(self.log, "ab") if self.log else contextlib.nullcontext(sys.stderr) as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll /v2/health/ready until 200, the process exits, or `timeout` seconds pass."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChmcError(f"tritonserver exited with status {self.process.returncode} "
                                f"before it was ready{self._log_hint()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ChmcError(f"tritonserver not ready after {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log and self.log.is_file():
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            return f" (see {self.log}: {' | '.join(tail)})"
        return ""

    def stop(self, grace: float = EXIT_TIMEOUT_S + 10.0) -> None:
        """SIGTERM the server, SIGKILL its process group if it is still alive after `grace` s.

        The server stops its backend stubs itself and gives up on open client connections after
        EXIT_TIMEOUT_S, cleaning the stubs' shared memory that a SIGKILL would leave in /dev/shm.
        The group kill at the end also ends stubs whose server died without stopping them."""
        p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _interrupted_by_signals() -> Iterator[None]:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) both raise KeyboardInterrupt, so either stops the
    server cleanly: a SIGINT that the parent left ignored (a background job of a script) would
    otherwise do nothing, and a bare SIGTERM would orphan tritonserver in its own session."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals need the main thread
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(repository: TritonRepository, *, port: int = 8000, host: str = "127.0.0.1",
          tritonserver: str | Path | None = None, models: list[str] | None = None,
          ready_timeout: float = 600.0) -> None:
    """Serve a model repository until Ctrl-C (chmc.serve also takes an artifact or export).

    The ready timeout is generous: a server loading billions of parameters takes minutes, and
    its log (on stderr) shows the progress meanwhile."""
    server = TritonServer(repository.path, port=port, host=host, grpc_port=port + 1,
                          executable=find_tritonserver(tritonserver), models=models)
    with _interrupted_by_signals(), server.start(ready_timeout):
        print(f"serving {repository.path} at {server.url} (HTTP), {host}:{port + 1} (gRPC); "
              "Ctrl-C stops", flush=True)
        try:
            while (code := server.process.poll()) is None:  # type: ignore[union-attr]
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping tritonserver", flush=True)
            return
    raise ChmcError(f"tritonserver exited by itself with status {code}")
