"""The TensorRT glue type-checks (mypy --strict) against tensorrt-stubs.

tensorrt-stubs installs `tensorrt/__init__.pyi` without a py.typed marker, and a few generated
signatures are not valid Python (a parameter named `in`, a required parameter after defaulted
ones), so mypy cannot use the installed files directly. The test copies the stubs into a temp
folder, repairs exactly those two patterns, and points MYPYPATH at it. Install the stubs with
`python3 -m pip install --no-deps tensorrt-stubs` (their dependency is TensorRT itself).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "compiler/engine.py",
    "runtime/tensorrt_backend.py",
    "plugins/channel_gather_matmul/tensorrt_plugin.py",
]
CONFIG = """[mypy]
strict = True
python_version = 3.11
# tensorrt.plugin (Python plugins) is not covered by the stubs: its decorators are untyped
allow_untyped_decorators = True
# report only the modules under test, not the (separately owned) modules they import
follow_imports = silent
[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
[mypy-tensorrt.plugin]
ignore_missing_imports = True
[mypy-polygraphy.*,triton.*,onnx.*,google.*]
ignore_missing_imports = True
"""


def repaired_stubs(dest: Path) -> Path:
    """Copy tensorrt-stubs' .pyi files under dest, fixing the two invalid generated patterns."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed "
                    "(python3 -m pip install --no-deps tensorrt-stubs)")
    for f in dist.files or []:
        if not str(f).endswith(".pyi"):
            continue
        text = Path(str(dist.locate_file(f))).read_text()
        text = re.sub(r"(\(self(?:: \w+)?, )in:", r"\1in_:", text)  # `in` is a keyword
        text = re.sub(r"(= None, )(channel_axis: int)\)", r"\1\2 = ...)", text)
        out = dest / str(f)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return dest


def run_mypy(files: list[str], stubs: Path, cwd: Path,
             config: Path) -> subprocess.CompletedProcess[str]:
    env = {"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental", *files],
        check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def mypy_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("mypy")
    stubs = repaired_stubs(tmp / "stubs")
    config = tmp / "mypy.ini"
    config.write_text(CONFIG)
    return stubs, config


def test_stubs_are_used(mypy_setup: tuple[Path, Path], tmp_path: Path) -> None:
    """A wrong use of the TensorRT API is caught: the check is real, not an all-Any pass."""
    stubs, config = mypy_setup
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f() -> int:\n"
                   "    logger = trt.Logger(trt.Logger.WARNING)\n"
                   "    return trt.Runtime(logger).deserialize_cuda_engine(b'')\n")
    result = run_mypy([str(bad)], stubs, tmp_path, config)
    assert result.returncode != 0
    assert "ICudaEngine" in result.stdout, result.stdout


def test_tensorrt_glue_type_checks(mypy_setup: tuple[Path, Path], tmp_path: Path) -> None:
    stubs, config = mypy_setup
    # The checkout root is the `chmc` package (an editable install mypy cannot follow):
    # expose it as tmp/chmc so that `chmc.*` imports resolve to this tree.
    (tmp_path / "chmc").symlink_to(ROOT, target_is_directory=True)
    search = Path(f"{stubs}:{tmp_path}")
    result = run_mypy([f"chmc/{m}" for m in MODULES], search, tmp_path, config)
    assert result.returncode == 0, result.stdout + result.stderr
