"""ONNX Runtime backend: one session serves every expert; the KV cache stays in ORT values.

Imports neither torch nor transformers (a serving image needs onnxruntime, numpy, tokenizers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from chmc.errors import ChmcError, MissingDependencyError, NotSupportedError
from chmc.formats.export import ExportFolder
from chmc.plugins.channel_gather_matmul.onnxruntime_op import library_path, register
from chmc.runtime.graph_state import NUMPY_DTYPES, GraphState


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """`providers`: ONNX Runtime's, in order (default: CUDA where available, then CPU);
    `threads`: intra-op threads (default $CHMC_ORT_THREADS, else ORT's: every core);
    `spinning=False` stops idle pool threads from busy-waiting, so sessions timed in turn on a
    few shared cores do not slow each other down."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None
    spinning: bool = True


def env_threads(var: str) -> int | None:
    """A thread count from the environment (None when unset); anything else is a one-line error."""
    value = os.environ.get(var, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ChmcError(f"{var}={value!r}: expected a positive integer")
    return int(value)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("the ONNX Runtime backend needs `pip install onnxruntime`") \
            from None
    return onnxruntime


def preferred_linear(dtype: str) -> str:
    """The linear form to export for this ONNX Runtime: 'plugin' where its native CPU kernel
    serves (float32, CPU-only ORT, a C compiler that builds it: about dense speed), else 'gather'
    (portable, standard ops, slower per step)."""
    if dtype != "float32" or "CUDAExecutionProvider" in _ort().get_available_providers():
        return "gather"
    try:
        library_path()
    except ChmcError:  # no compiler, or it failed: the gather form needs none
        return "gather"
    return "plugin"


def session_for(folder: ExportFolder, options: OnnxRuntimeOptions | None = None) -> Any:
    """An InferenceSession on the folder's graph (plugin-form graphs get the custom op)."""
    options = options or OnnxRuntimeOptions()
    ort = _ort()
    opts = ort.SessionOptions()
    threads = options.threads or env_threads("CHMC_ORT_THREADS")
    if threads:
        opts.intra_op_num_threads = threads
    if not options.spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = list(options.providers or [p for p in ("CUDAExecutionProvider",
                                                       "CPUExecutionProvider") if p in available])
    section = folder.section
    if section.linear == "plugin":
        if section.dtype != "float32":
            raise NotSupportedError(
                f"{folder.path}: not supported: a {section.dtype} plugin-form graph on "
                "ONNX Runtime "
                "(its chmc::ChannelGatherMatMul CPU kernel is float32; export with --dtype "
                "float32, or build a TensorRT engine from this graph)")
        register(opts)
    try:
        return ort.InferenceSession(str(folder.graph), opts, providers=providers)
    except Exception as e:  # noqa: BLE001  ORT raises its own exception types
        raise ChmcError(f"{folder.graph}: ONNX Runtime cannot load it ({e})") from None


class OnnxRuntimeBackend:
    """Runs the exported decoder; `start` begins a generation with one expert id per row."""

    continuous = True  # its states drop and take in rows between steps (runtime.scheduler)

    def __init__(self, folder: ExportFolder, options: OnnxRuntimeOptions | None = None):
        self.folder = folder
        dtype = folder.section.dtype
        if dtype not in NUMPY_DTYPES:
            raise NotSupportedError(f"not supported: dtype {dtype} on the ONNX Runtime backend "
                                    "(export with --dtype float32 or float16)")
        self.np_dtype = NUMPY_DTYPES[dtype]
        self.session = session_for(folder, options)

    def start(self, expert_ids: np.ndarray) -> GraphState:
        return GraphState(self.session.run, self.folder.section,
                          self.folder.manifest.router is not None, self.folder.path, expert_ids,
                          self.np_dtype)
