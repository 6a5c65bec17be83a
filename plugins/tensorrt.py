"""Whether TensorRT is here: one check and one error for every stage that needs it. Light on
purpose (no triton, no torch): `chmc build --target trt` asks before any work."""

from __future__ import annotations

from typing import Any

from chmc.errors import MissingDependencyError


def tensorrt_available() -> bool:
    """TensorRT's builder API is present (tensorrt-stubs alone installs an empty namespace)."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def require_tensorrt() -> Any:
    """The tensorrt module, or a one-line MissingDependencyError saying how to get it."""
    if not tensorrt_available():
        raise MissingDependencyError(
            "TensorRT is not installed (no tensorrt.Builder): install TensorRT >= 10.9 with "
            "`pip install tensorrt` on a CUDA machine")
    import tensorrt

    return tensorrt
