"""A real tritonserver for the tests: the one the `nvidia-pytriton` wheel bundles (tritonserver
2.51 with only the Python backend), downloaded once with pip, unzipped (never installed: it pins
numpy < 2) under $CHMC_CACHE (default ~/.cache/chmc). Its Python backend stub embeds this
interpreter's libpython and runs the interpreter first on PATH in isolated mode (PYTHONPATH
ignored), so the stub gets a small cached venv of its own: numpy 1.26 (inference fails with
numpy 2 in that stub), onnxruntime, tokenizers and pydantic (the manifests), the serving path's
whole dependency set: no torch, no transformers, so the text model answering at all shows that
path needs neither. chmc is put on its path by a .pth hook reading CHMC_STUB_PATH, pointing at
this checkout for this run only.

That server has no onnxruntime backend, so it cannot load `<name>_engine`; it is started in
explicit mode loading only the text model, which runs the engine's graph itself through
chmc.runtime from the files in the repository. Helpers here also speak Triton's generate
extension (`generate`, and `generate_stream`'s server-sent events) with the standard library.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chmc.cache import cache_root

PYTRITON = "0.7.0"  # the wheel that bundles tritonserver 2.51
STUB_NUMPY = "1.26.4"
STUB_NUMPY_2 = "2.2.6"  # what a serving image gets by default today


def _cache() -> Path:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise setup of one cache entry between concurrent test runs."""
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        pytest.skip(f"cannot provision the test tritonserver: {' '.join(args[:3])}... failed: "
                    f"{done.stderr.strip().splitlines()[-1:]}")


def _tritonserver_dist(cache: Path) -> Path:
    """pytriton's tritonserver tree plus its bundled libraries, with this Python's stub
    installed."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = cache / f"pytriton-{PYTRITON}-py{py}"
    with _locked(root):
        if (root / "ok").exists():
            return root
        wheels = cache / "wheels"
        if not list(wheels.glob(f"nvidia_pytriton-{PYTRITON}-*.whl")):
            _pip("download", "--no-deps", "--only-binary=:all:", f"nvidia-pytriton=={PYTRITON}",
                 "-d", str(wheels))
        (wheel,) = wheels.glob(f"nvidia_pytriton-{PYTRITON}-*.whl")
        shutil.rmtree(root, ignore_errors=True)
        stubs = "pytriton/tritonserver/python_backend_stubs/"
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                f = info.filename
                if (not f.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))
                        or f.startswith("nvidia_pytriton.libs/libpython")  # pytriton's own Python
                        or (f.startswith(stubs) and not f.startswith(f"{stubs}{py}/"))):
                    continue
                path = Path(z.extract(info, root))
                path.chmod((info.external_attr >> 16) & 0o777 or 0o644)
        server = root / "pytriton" / "tritonserver"
        stub = server / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.is_file():
            pytest.skip(f"nvidia-pytriton {PYTRITON} ships no Python backend stub for Python {py}")
        shutil.copy2(stub, server / "backends" / "python" / stub.name)
        (root / "ok").touch()
    return root


PTH_HOOK = ("import os, sys; sys.path.extend(p for p in "
            "os.environ.get('CHMC_STUB_PATH', '').split(os.pathsep) if p)\n")


def _stub_venv(cache: Path, numpy: str = STUB_NUMPY) -> Path:
    """The stub's Python environment: exactly what the serving path needs, keyed by versions."""
    import onnxruntime
    import pydantic
    import tokenizers

    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    where = hashlib.sha256(sys.base_prefix.encode()).hexdigest()[:8]  # the venv links this Python
    key = (f"stubenv-py{py}-{where}-numpy{numpy}-ort{onnxruntime.__version__}"
           f"-tok{tokenizers.__version__}-pydantic{pydantic.VERSION}")
    root = cache / key
    with _locked(root):
        if (root / "ok").exists():
            return root
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        python = str(root / "bin" / "python")
        _pip("--python", python, "install", f"numpy=={numpy}",
             f"onnxruntime=={onnxruntime.__version__}", f"pydantic=={pydantic.VERSION}")
        _pip("--python", python, "install", "--no-deps", f"tokenizers=={tokenizers.__version__}")
        (site,) = (root / "lib").glob("python*/site-packages")
        (site / "chmc_stub_path.pth").write_text(PTH_HOOK)
        (root / "ok").touch()
    return root


def triton_env_for(scratch: Path, numpy: str = STUB_NUMPY) -> dict[str, Any]:
    """The tritonserver executable and the environment its stub needs; `scratch`: an empty
    folder for the link that puts this checkout on the stub's path."""
    import chmc

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not (Path(libdir) / soname).is_file():
        pytest.skip(f"this Python has no shared libpython ({libdir}/{soname}) for the backend stub")
    cache = _cache()
    dist = _tritonserver_dist(cache)
    venv = _stub_venv(cache, numpy)
    src = scratch
    (src / "chmc").symlink_to(Path(chmc.__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CUDA"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               LD_LIBRARY_PATH=libdir, CHMC_STUB_PATH=str(src), OMP_NUM_THREADS="1")
    return {"executable": dist / "pytriton" / "tritonserver" / "bin" / "tritonserver", "env": env}


def generate(url: str, model: str, body: dict[str, Any],
             timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """POST to a model's generate endpoint (url: host:port): (HTTP status, the JSON answer)."""
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def generate_stream(url: str, model: str, body: dict[str, Any],
                    timeout: float = 120) -> Iterator[tuple[float, dict[str, Any]]]:
    """POST to generate_stream: each server-sent event's arrival time (perf_counter) and JSON."""
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data:"):
                yield time.perf_counter(), json.loads(line[5:])
