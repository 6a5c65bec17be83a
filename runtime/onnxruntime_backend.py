"""ONNX Runtime backend: one session serves every expert; the KV cache stays in ORT values.

Imports neither torch nor transformers (a serving image needs onnxruntime, numpy, tokenizers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from chmc.errors import ChmcError, MissingDependencyError, NotSupportedError

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


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
    (portable, standard ops, 1.3-2.6x slower per step)."""
    if dtype != "float32" or "CUDAExecutionProvider" in _ort().get_available_providers():
        return "gather"
    from chmc.plugins.channel_gather_matmul.onnxruntime_op import library_path

    try:
        library_path()
    except ChmcError:  # no compiler, or it failed: the gather form needs none
        return "gather"
    return "plugin"


def session_for(folder: Path, export: dict[str, Any], providers: list[str] | None = None,
                threads: int | None = None, spinning: bool = True) -> Any:
    """An InferenceSession on folder/model.onnx (plugin-form graphs get the custom op).
    `spinning=False` stops idle pool threads from busy-waiting, so several sessions timed in
    turn on a few cores do not slow each other down (benchmarks)."""
    ort = _ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if export.get("linear") == "plugin":
        from chmc.plugins.channel_gather_matmul.onnxruntime_op import register

        if export["dtype"] != "float32":
            raise NotSupportedError(
                f"{folder}: not supported: a {export['dtype']} plugin-form graph on ONNX Runtime "
                "(its chmc::ChannelGatherMatMul CPU kernel is float32; export with --dtype "
                "float32, or build a TensorRT engine from this graph)")

        register(opts)
    try:
        return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=providers)
    except Exception as e:  # noqa: BLE001  ORT raises its own exception types
        raise ChmcError(f"{folder / 'model.onnx'}: ONNX Runtime cannot load it ({e})") from None


class OnnxRuntimeBackend:
    """Runs the exported decoder; `start` begins a generation with one expert id per row."""

    def __init__(self, folder: str | Path, export: dict[str, Any],
                 providers: list[str] | None = None, threads: int | None = None,
                 session: Any = None, spinning: bool = True):
        """`session`: anything with InferenceSession's run(output_names, feed) -> list of arrays
        (the TensorRT runner), used instead of an ONNX Runtime session."""
        self.folder, self.export = Path(folder), export
        dtype = export["dtype"]
        if dtype not in _NP_DTYPES:
            raise NotSupportedError(f"not supported: dtype {dtype} on the ONNX Runtime backend "
                                    "(export with --dtype float32 or float16)")
        self.np_dtype = _NP_DTYPES[dtype]
        self.session = session or session_for(self.folder, export, providers, threads, spinning)
        self.merged = any(i["name"] == "expert_id" for i in export["inputs"])
        self.reports_expert = any(o["name"] == "expert_id_used" for o in export["outputs"])
        self.layers = int(export["num_layers"])

    def start(self, expert_ids: np.ndarray) -> OrtState:
        return OrtState(self, expert_ids)


class OrtState:
    """One generation: the expert per row and the cache carried from step to step."""

    def __init__(self, backend: OnnxRuntimeBackend, expert_ids: np.ndarray):
        self.b = backend
        e = backend.export
        batch = len(expert_ids)
        empty = np.zeros((batch, e["num_kv_heads"], 0, e["head_dim"]), dtype=backend.np_dtype)
        self.feed: dict[str, Any] = {}
        for i in range(backend.layers):
            self.feed[f"past_key_values.{i}.key"] = empty
            self.feed[f"past_key_values.{i}.value"] = empty
        self.expert_ids = np.ascontiguousarray(expert_ids, dtype=np.int64)  # [B]
        if (self.expert_ids < 0).any() and not e.get("router"):
            from chmc.compiler.router import no_router

            raise no_router(backend.folder)  # a graph without a router would read -1 as N-1
        if backend.merged:
            self.feed["expert_id"] = self.expert_ids
        self.outputs = ["logits"] + [f"present.{i}.{p}" for i in range(backend.layers)
                                     for p in ("key", "value")]
        if backend.reports_expert:
            self.outputs.append("expert_id_used")

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        self.feed.update(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids)
        out = self.b.session.run(self.outputs, self.feed)
        for i in range(self.b.layers):
            self.feed[f"past_key_values.{i}.key"] = out[1 + 2 * i]
            self.feed[f"past_key_values.{i}.value"] = out[2 + 2 * i]
        if self.b.reports_expert:  # routed rows keep the expert the router gave them
            self.expert_ids = self.feed["expert_id"] = out[-1]
        return np.asarray(out[0][:, -1], dtype=np.float32)  # [B, V]
