"""TensorRT backend: an engine folder (chmc.formats.engine) run as the exported graph is.

`TensorRTRunner.run(output_names, feed)` has an ONNX Runtime session's contract (host arrays in,
a list out), so the graph's step state (runtime.graph_state) drives an engine as it drives a
session; bf16 tensors cross the host boundary as float32. `run_torch` keeps everything on the
GPU. Device buffers are torch CUDA tensors (torch is on every GPU machine this path runs on).
Profile 1 (decode) serves steps with one new token, profile 0 (prefill) everything else.
TensorRT, torch and the plugin's Triton kernels are imported when an engine is opened, never at
module import (a CPU machine imports this module to say that TensorRT is missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from chmc.errors import ChmcError
from chmc.formats.engine import EngineFolder
from chmc.plugins.tensorrt import require_tensorrt
from chmc.runtime.graph_state import NUMPY_DTYPES, GraphState

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class TensorRTOptions:
    """The TensorRT backend has no options yet: the engine fixed its profiles at build time."""


class TensorRTRunner:
    """Load model.plan once; `run_torch` feeds torch CUDA tensors, `run` host arrays."""

    def __init__(self, folder: EngineFolder):
        trt_mod = require_tensorrt()
        import torch  # GPU machines only (see the module docstring)

        from chmc.plugins.channel_gather_matmul.tensorrt_plugin import register_plugin

        if not torch.cuda.is_available():
            raise ChmcError("the TensorRT backend needs a CUDA GPU, and torch sees none")
        self.dir = folder.path
        self.meta = folder.manifest
        register_plugin()  # the plugin creator must be known before deserialising
        self.logger = trt_mod.Logger(trt_mod.Logger.WARNING)
        runtime = trt_mod.Runtime(self.logger)
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(folder.plan.read_bytes())
        if engine is None:
            raise ChmcError(f"{folder.plan}: TensorRT could not deserialise the engine")
        self.engine: trt.ICudaEngine = engine
        context = engine.create_execution_context()
        if context is None:
            raise ChmcError(f"{folder.plan}: TensorRT could not create an execution context")
        self.context: trt.IExecutionContext = context
        self.inputs = [b.name for b in self.meta.bindings if b.mode == "input"]
        self.outputs = [b.name for b in self.meta.bindings if b.mode == "output"]
        self.stream = torch.cuda.current_stream()
        self.profile = -1

    def _select_profile(self, feeds: dict[str, torch.Tensor]) -> None:
        ids = feeds.get("input_ids")
        want = DECODE if ids is not None and ids.ndim == 2 and ids.shape[1] == 1 else PREFILL
        if self.engine.num_optimization_profiles < 2:
            want = PREFILL
        if want != self.profile:
            self.context.set_optimization_profile_async(want, self.stream.cuda_stream)
            self.profile = want

    def run_torch(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward pass on CUDA tensors (inputs must already be on the GPU, contiguous)."""
        import torch

        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ChmcError(f"TensorRT engine {self.dir}: missing input '{missing[0]}' "
                            f"(expects {self.inputs})")
        self._select_profile(feeds)
        for name in self.inputs:
            t = feeds[name].contiguous()
            feeds[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        results: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = [dims[i] for i in range(len(dims))]
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            results[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ChmcError(f"TensorRT engine {self.dir}: execution failed (see the log above)")
        self.stream.synchronize()
        return results

    def run(self, output_names: list[str] | None,
            feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like onnxruntime's InferenceSession.run: host arrays in, the named outputs out."""
        import torch

        def device(name: str, value: np.ndarray) -> torch.Tensor:
            want = _torch_dtype(self.engine.get_tensor_dtype(name))
            return torch.from_numpy(np.ascontiguousarray(value)).cuda().to(want)

        out = self.run_torch({k: device(k, v) for k, v in feed.items()})
        names = output_names or self.outputs
        return [(out[n].float() if out[n].dtype == torch.bfloat16 else out[n]).cpu().numpy()
                for n in names]


def _torch_dtype(dtype: Any) -> torch.dtype:
    import tensorrt
    import torch

    table = {tensorrt.float32: torch.float32, tensorrt.float16: torch.float16,
             tensorrt.bfloat16: torch.bfloat16, tensorrt.int32: torch.int32,
             tensorrt.int64: torch.int64, tensorrt.int8: torch.int8, tensorrt.bool: torch.bool}
    if dtype not in table:
        raise ChmcError(f"TensorRT output dtype {dtype} is not supported by the chmc runner")
    return table[dtype]


class TensorRTBackend:
    """Runs an engine folder; `start` begins a generation with one expert id per row."""

    continuous = True  # its states drop and take in rows between steps (runtime.scheduler)

    def __init__(self, folder: EngineFolder, options: TensorRTOptions | None = None):
        self.folder = folder
        self.runner = TensorRTRunner(folder)  # checks TensorRT and the GPU first
        # bf16 engines exchange float32 host arrays (see TensorRTRunner.run)
        self.cache_dtype = NUMPY_DTYPES.get(folder.export.export.dtype, np.float32)

    def start(self, expert_ids: np.ndarray) -> GraphState:
        return GraphState(self.runner.run, self.folder.export.export,
                          self.folder.export.router is not None, self.folder.path, expert_ids,
                          self.cache_dtype)
