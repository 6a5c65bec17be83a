"""Where chmc keeps what it can rebuild: `$CHMC_CACHE`, else `$XDG_CACHE_HOME/chmc`, else
`~/.cache/chmc`.

Inside: families/ (trained tiny families), onnx/ (exports `load` makes of artifacts), ort_kernel/
(the compiled ONNX Runtime op), hashes/ (inputs' sha256, formats/digest.py), demo/, bench/,
and the test tritonserver. Only os and pathlib
here, because the ONNX Runtime path (no torch) needs it too.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("CHMC_CACHE"):
        return Path(os.environ["CHMC_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chmc"
