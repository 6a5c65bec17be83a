"""The plugin form on ONNX Runtime (CPU): `chmc::ChannelGatherMatMul` as a native custom-op
library (ort_kernel.c), registered on the session so the exported graph runs as it is.

The library is compiled on first use with the machine's C compiler (as Triton and
torch.utils.cpp_extension build their stubs), cached by the hash of its source and flags under
$CHMC_CACHE/ort_kernel/, and written to a temporary name then renamed, so concurrent first uses
never load a half-written file. It needs no ONNX Runtime headers and links nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from chmc.cache import cache_root
from chmc.errors import ChmcError, MissingDependencyError

SOURCE = Path(__file__).with_name("ort_kernel.c")
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-pthread",
          "-Wl,-z,nodelete"]  # never unloaded: its per-thread buffers free themselves at exit


def library_path(portable: bool = False) -> Path:
    """The compiled library, built once per source version. `portable`: plain C only, the path
    CPUs without AVX-512 take (tests check it on machines that have AVX-512)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    flags = CFLAGS + ["-DCHMC_PORTABLE"] * portable
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    lib = cache_root() / "ort_kernel" / f"chmc_ort_kernel-{digest}.so"
    if lib.exists():
        return lib
    if not cc:
        raise MissingDependencyError("the plugin form on ONNX Runtime compiles its CPU kernel "
                                     f"({SOURCE.name}) with a C compiler: install gcc or set CC")
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([cc, *flags, "-o", str(tmp), str(SOURCE)], capture_output=True,
                             check=False, text=True)
    except OSError as e:  # CC names no program, or the cache folder is not writable
        raise ChmcError(
            f"{SOURCE}: cannot compile the ONNX Runtime kernel with {cc} ({e})") from None
    if res.returncode:
        tmp.unlink(missing_ok=True)
        first = (res.stderr.strip().splitlines() or ["no output"])[0]
        raise ChmcError(f"{SOURCE}: {cc} failed to compile the ONNX Runtime kernel ({first})")
    os.replace(tmp, lib)
    return lib


def register(opts: Any, portable: bool = False) -> None:
    """Give an onnxruntime.SessionOptions the chmc::ChannelGatherMatMul CPU kernel."""
    opts.register_custom_ops_library(str(library_path(portable)))
