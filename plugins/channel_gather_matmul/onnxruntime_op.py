"""The plugin form on ONNX Runtime (CPU): `chmc::ChannelGatherMatMul` as an onnxruntime-extensions
Python op running the NumPy reference. It verifies the graph TensorRT consumes; it is not fast.

onnxruntime-extensions serves Python ops from its own domain, so the session loads a copy of
model.onnx (graph only, a few MB at most) whose plugin nodes are moved into that domain; the
weights stay in the export folder's model.onnx.data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chmc.errors import MissingDependencyError

PLUGIN_DOMAIN, PLUGIN_OP = "chmc", "ChannelGatherMatMul"
_registered = False


def register() -> str:
    """Register the Python op once per process; returns the extensions library path."""
    global _registered
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise MissingDependencyError("the plugin form on ONNX Runtime needs "
                                     "`pip install onnxruntime-extensions`") from None
    if not _registered:
        from chmc.plugins.channel_gather_matmul.reference import channel_gather_matmul

        dt = PyCustomOpDef
        onnx_op(op_type=PLUGIN_OP, inputs=[dt.dt_float, dt.dt_float, dt.dt_int32, dt.dt_int64],
                outputs=[dt.dt_float], attrs={"plugin_namespace": dt.dt_string})(
            lambda x, bank, index, expert_id, **_: channel_gather_matmul(x, bank, index, expert_id))
        _registered = True
    return str(get_library_path())


def plugin_session_model(folder: Path, opts: Any) -> bytes:
    """The graph, plugin nodes moved to the extensions' domain, for InferenceSession(bytes, opts);
    `opts` gets the op library and the folder that holds model.onnx.data."""
    import onnx
    from onnxruntime_extensions import default_opset_domain

    opts.register_custom_ops_library(register())
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(folder.resolve()))
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.domain == PLUGIN_DOMAIN:
            node.domain = default_opset_domain()
    model.opset_import.append(onnx.helper.make_opsetid(default_opset_domain(), 1))
    return bytes(model.SerializeToString())
