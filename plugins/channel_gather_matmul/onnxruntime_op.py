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
from typing import Any, Literal

from chmc.cache import cache_root
from chmc.errors import ChmcError, MissingDependencyError

SOURCE = Path(__file__).with_name("ort_kernel.c")
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-pthread",
          "-Wl,-z,nodelete"]  # never unloaded: its per-thread buffers free themselves at exit


# What a build may dispatch to at load time: the widest kernels the CPU has (AVX-512, else AVX2
# + FMA, else plain C), AVX2 at best, or plain C only (the tests run the narrower paths on
# machines that have the wider ones).
Kernels = Literal["best", "avx2", "c"]
KERNEL_FLAGS: dict[Kernels, list[str]] = {"best": [], "avx2": ["-DCHMC_NO_AVX512"],
                                          "c": ["-DCHMC_PORTABLE"]}


def library_path(kernels: Kernels = "best") -> Path:
    """The compiled library, built once per source version and kernel set."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    flags = CFLAGS + KERNEL_FLAGS[kernels]
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


def register(opts: Any, kernels: Kernels = "best") -> None:
    """Give an onnxruntime.SessionOptions the chmc::ChannelGatherMatMul CPU kernel."""
    opts.register_custom_ops_library(str(library_path(kernels)))
