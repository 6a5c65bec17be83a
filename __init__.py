"""chmc: a deployment compiler for channel-merged experts (Channel Merging, arXiv 2412.15283).

`chmc.build(...)` and `chmc.load(...)` (chmc.api) are the Python API; they import torch and the
compiler on first use, so `import chmc` stays light for the ONNX Runtime serving path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chmc.errors import ChmcError

if TYPE_CHECKING:
    from chmc.api import build, load

__version__ = "0.1.0"
__all__ = ["ChmcError", "__version__", "build", "load"]


def __getattr__(name: str) -> Any:
    if name in ("build", "load"):
        from chmc import api  # the compiler's torch: only when the API is used

        return getattr(api, name)
    raise AttributeError(f"module 'chmc' has no attribute '{name}'")
