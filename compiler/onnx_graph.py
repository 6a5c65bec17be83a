"""The decoder graph: chmc.models.decoder's forward pass emitted node by node, weights streamed to
external data.

Why build rather than trace: tracing transformers with a KV cache is fragile, and building by
tensor name lets every initializer go straight from the artifact's shard to `model.onnx.data`, one
tensor at a time, so export memory stays at one tensor (the ModelProto holds only offsets).

Three forms of a channel-merged Linear (`linear=`):
  gather  rows = Gather(rowtable, expert_id)   [B, out], rowtable[n, c] = index[n, c] * out + c
          W = Gather(bank_flat, rows)          [B, out, in] from bank_flat [K*out, in]
          y = MatMul(x, Transpose(W))          ORT fuses Transpose into FusedMatMul(transB)
  select  Y = x @ bankT                        [B, S, K*out] from bankT [in, K*out]: no copies
          y = GatherElements(Y, rows[expert_id])  each row's channel c from its group's block
  plugin  y = chmc.ChannelGatherMatMul(x, bank [K, out, in], index [N, out] int32, expert_id)
A plain checkpoint exports dense (y = x @ W^T, no expert_id). Per-expert 1-D tensors (norms,
biases) are Gather(experts [N, D], expert_id) -> [B, 1, D].
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
import torch

from chmc.formats.export import TensorIO
from chmc.formats.weights import ModelWeights
from chmc.models import decoder
from chmc.models.spec import ArchSpec, DecoderConfig
from chmc.plugins.channel_gather_matmul import schema

OPSET = 17
ALIGN = 4096  # initializers start on page boundaries so runtimes can mmap them
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
               "int32": onnx.TensorProto.INT32, "uint8": onnx.TensorProto.UINT8,
               "bool": onnx.TensorProto.BOOL}


class ExternalData:
    """Appends initializer bytes to one file and returns TensorProtos that point into it."""

    def __init__(self, file: Path):
        self.file = file
        self._f: IO[bytes] = open(file, "wb")  # noqa: SIM115  closed by close()
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> onnx.TensorProto:
        t = t.detach().contiguous()
        proto = onnx.TensorProto()
        proto.name = name
        proto.dims.extend(t.shape)
        proto.data_type = ONNX_DTYPES[str(t.dtype).removeprefix("torch.")]
        pad = -self.offset % ALIGN
        self._f.write(b"\0" * pad)
        self.offset += pad
        data = t.reshape(-1).view(torch.uint8).numpy()
        self._f.write(data.data)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.file.name), ("offset", str(self.offset)),
                     ("length", str(data.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = k, v
        self.offset += data.nbytes
        return proto

    def close(self) -> None:
        self._f.close()


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output name(s) of the node it adds."""

    def __init__(self, data: ExternalData):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "",
           out: str | None = None, **attrs: Any) -> Any:
        self._count += 1
        outs = [out] if out else [
            f"{op_type.lower()}_{self._count}" + (f"_{i}" if n_out > 1 else "")
            for i in range(n_out)]
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), outs,
                                                name=f"{op_type}_{self._count}", domain=domain,
                                                **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: str = "int64") -> str:
        """A small inline constant (shapes, axes, scalars), shared between uses."""
        arr = np.asarray(value, dtype=np.dtype(dtype))
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, t: torch.Tensor) -> str:
        """A large initializer, streamed to the external data file now."""
        self.initializers.append(self.data.add(name, t))
        return name


class OnnxOps:
    """chmc.models.decoder.Ops emitting ONNX nodes: values are the names of graph values."""

    def __init__(self, graph: GraphBuilder, w: ModelWeights, cfg: DecoderConfig, dtype: str,
                 linear: str, expert_id: str):
        self.graph, self.w, self.cfg, self.dtype = graph, w, cfg, dtype
        self.linear = linear if w.merged else "dense"
        self.expert_id = expert_id  # the resolved id [B] every gather reads (merged only)
        self._vectors: dict[tuple[str, int], str] = {}  # (name, rank); 0: stack, 1: dense
        self._stored: dict[str, tuple[str, str]] = {}  # weight -> (bank or W^T, row table)
        self._transposed: dict[str, bool] = {}
        self._dense: dict[str, str] = {}  # dense tensors stored as they are (the embedding)

    # -- weights -------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(getattr(torch, self.dtype))

    def has(self, name: str) -> bool:
        return self.w.has(name)

    def vector(self, name: str, rank: int = 3) -> str:
        """[D] dense, or this row's expert copy [B, 1.., D] (`rank` dims in all)."""
        if (name, rank) not in self._vectors:
            if self.w.kind(name) == "dense":
                stored = self._vectors.get((name, 1)) or self.graph.weight(
                    name, self._cast(self.w.dense(name)))
                self._vectors[(name, 1)] = stored
                out = stored  # [D] broadcasts against any rank
            else:
                stack = self._vectors.get((name, 0)) or self.graph.weight(
                    f"{name}.experts", self._cast(self.w.stacked(name)))  # [N, D]
                self._vectors[(name, 0)] = stack
                g = self.graph
                out = g.op("Unsqueeze", g.op("Gather", stack, self.expert_id, axis=0),
                           g.const(list(range(1, rank - 1))))
            self._vectors[(name, rank)] = out
        return self._vectors[(name, rank)]

    def _rows(self, name: str, index: torch.Tensor, out: int) -> str:
        rows = index.long() * out + torch.arange(out)  # [N, out] rows of the flattened bank
        return self.graph.weight(f"{name}.rows", rows)

    def _matrix_rows(self, name: str, transposed: bool = False) -> tuple[str, str]:
        """(bank, row table [N, out] int64) initializers, once. The bank is flat [K*out, in], or
        [in, K*out] when `transposed` (the select form: a plain MatMul operand ORT prepacks)."""
        if name not in self._stored:
            bank, index = self.w.bank(name)
            k, out, inp = bank.shape
            flat = self._cast(bank).reshape(k * out, inp)
            del bank
            stored = (self.graph.weight(f"{name}.bankT", flat.t()) if transposed
                      else self.graph.weight(f"{name}.bank", flat))
            self._stored[name] = (stored, self._rows(name, index, out))
            self._transposed[name] = transposed
        return self._stored[name]

    def _plugin_bank(self, name: str) -> tuple[str, str]:
        """Plugin form: (bank [K, out, in], index [N, out] int32) initializers, once."""
        if name not in self._stored:
            bank, index = self.w.bank(name)
            bank_name = self.graph.weight(f"{name}.bank", self._cast(bank))
            del bank
            idx = self.graph.weight(f"{name}.index", index.to(torch.int32).contiguous())
            self._stored[name] = (bank_name, idx)
        return self._stored[name]

    def project(self, x: str, name: str) -> str:
        """x [B, S, in] @ W^T -> [B, S, out] for the 2-D tensor `name` in this export's form."""
        g = self.graph
        if self.w.kind(name) == "dense":
            if name in self._dense:  # stored as it is (tied embedding): reuse it transposed
                return g.op("MatMul", x, g.op("Transpose", self._dense[name], perm=[1, 0]))
            if name not in self._stored:
                self._stored[name] = (g.weight(f"{name}.T", self._cast(self.w.dense(name)).t()), "")
            return g.op("MatMul", x, self._stored[name][0])  # [in, out] initializer
        if self.linear == "plugin":
            bank, idx = self._plugin_bank(name)
            return g.op(schema.NAME, x, bank, idx, self.expert_id, domain=schema.DOMAIN,
                        plugin_namespace=schema.DOMAIN)  # TensorRT's parser finds chmc::<op>
        flat, rows = self._matrix_rows(name, transposed=self.linear == "select")
        r = g.op("Gather", rows, self.expert_id, axis=0)  # [B, out]
        if self.linear == "select":  # every bank's outputs, then each row's channel from its group
            y_all = (g.op("MatMul", x, flat) if self._transposed[name]  # [B, S, K*out]
                     else g.op("FusedMatMul", x, flat, domain="com.microsoft", transB=1))
            out = g.op("Concat", g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2])),
                       g.const([self.w.shape(name)[0]]), axis=0)
            r = g.op("Expand", g.op("Unsqueeze", r, g.const([1])), out)  # [B, S, out]
            return g.op("GatherElements", y_all, r, axis=2)
        wb = g.op("Gather", flat, r, axis=0)  # [B, out, in]
        return g.op("MatMul", x, g.op("Transpose", wb, perm=[0, 2, 1]))  # [B, S, out]

    def embed(self, ids: str, name: str) -> str:
        """Token embeddings [B, S, D]: the expert's row of the embedding bank for each token."""
        g = self.graph
        if self.w.kind(name) == "dense":
            self._dense[name] = g.weight(name, self._cast(self.w.dense(name)))
            return g.op("Gather", self._dense[name], ids, axis=0)
        if self.linear == "plugin":  # bank [K, V, D]: GatherND on (group, token) pairs
            bank, idx = self._plugin_bank(name)
            group = g.op("GatherElements", g.op("Gather", idx, self.expert_id, axis=0), ids, axis=1)
            pairs = g.op("Concat", g.op("Unsqueeze", g.op("Cast", group, to=ONNX_DTYPES["int64"]),
                                        g.const([-1])),
                         g.op("Unsqueeze", ids, g.const([-1])), axis=-1)  # [B, S, 2]
            return g.op("GatherND", bank, pairs)
        flat, rows = self._matrix_rows(name)
        r = g.op("GatherElements", g.op("Gather", rows, self.expert_id, axis=0), ids, axis=1)
        return g.op("Gather", flat, r, axis=0)  # [B, S, D]

    # -- the cache layout: past_key_values inputs concatenated with the new keys and values ------
    def masks(self, windows: set[int | None]) -> dict[int | None, str]:
        """allowed[b, 1, 1, q, k] (bool) per window size: causal, padding, sliding window."""
        g = self.graph
        total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0)  # T = P + S
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(1), axis=0)  # S
        kv = g.op("Range", g.const(0), total, g.const(1))  # [T]
        q = g.op("Unsqueeze", g.op("Range", g.op("Sub", total, seq), total, g.const(1)),
                 g.const([1]))  # [S, 1] absolute positions of the queries
        causal = g.op("LessOrEqual", kv, q)  # [S, T]
        pad = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=ONNX_DTYPES["bool"]),
                   g.const([1, 2, 3]))  # [B, 1, 1, 1, T]
        out: dict[int | None, str] = {}
        for window in sorted(windows, key=lambda w: w or 0):
            allowed = causal
            if window is not None:
                allowed = g.op("And", allowed, g.op("Greater", kv, g.op("Sub", q, g.const(window))))
            out[window] = g.op("And", pad, allowed)  # [B, 1, 1, S, T]
        return out

    def cache(self, layer: int, k: str, v: str) -> tuple[str, str]:
        g = self.graph
        present = [g.op("Concat", f"past_key_values.{layer}.{part}", new, axis=2)
                   for part, new in (("key", k), ("value", v))]
        for part, value in zip(("key", "value"), present):
            g.op("Identity", value, out=f"present.{layer}.{part}")
        return present[0], present[1]

    def logit_positions(self, h: str) -> str:
        return h  # every position: chmc check compares them all

    def attend(self, q: str, k: str, v: str, allowed: str, window: int | None,
               scale: float) -> None:
        return None  # composed from standard ONNX ops, so every runtime reads the graph

    # -- arithmetic and layout -----------------------------------------------------------------
    def const(self, value: float | tuple[float, ...]) -> str:
        return self.graph.const(value, "float32")

    def add(self, a: str, b: str) -> str:
        return self.graph.op("Add", a, b)

    def sub(self, a: str, b: str) -> str:
        return self.graph.op("Sub", a, b)

    def mul(self, a: str, b: str) -> str:
        return self.graph.op("Mul", a, b)

    def div(self, a: str, b: str) -> str:
        return self.graph.op("Div", a, b)

    def neg(self, x: str) -> str:
        return self.graph.op("Neg", x)

    def sqrt(self, x: str) -> str:
        return self.graph.op("Sqrt", x)

    def sigmoid(self, x: str) -> str:
        return self.graph.op("Sigmoid", x)

    def tanh(self, x: str) -> str:
        return self.graph.op("Tanh", x)

    def cos(self, x: str) -> str:
        return self.graph.op("Cos", x)

    def sin(self, x: str) -> str:
        return self.graph.op("Sin", x)

    def where(self, cond: str, a: str, b: str) -> str:
        return self.graph.op("Where", cond, a, b)

    def greater(self, a: str, b: str) -> str:
        return self.graph.op("Greater", a, b)

    def max(self, x: str, axis: int) -> str:
        return self.graph.op("ReduceMax", x, axes=[axis], keepdims=1)

    def mean(self, x: str, axis: int) -> str:
        return self.graph.op("ReduceMean", x, axes=[axis], keepdims=1)

    def softmax(self, x: str, axis: int) -> str:
        return self.graph.op("Softmax", x, axis=axis)

    def matmul(self, a: str, b: str) -> str:
        return self.graph.op("MatMul", a, b)

    def upcast(self, x: str) -> str:
        return x if self.dtype == "float32" else self.graph.op("Cast", x, to=ONNX_DTYPES["float32"])

    def downcast(self, x: str) -> str:
        if self.dtype == "float32":
            return x
        return self.graph.op("Cast", x, to=ONNX_DTYPES[self.dtype])

    def int_to_float(self, x: str) -> str:
        return self.graph.op("Cast", x, to=ONNX_DTYPES["float32"])

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.graph.op("Reshape", x, self.graph.const(shape))

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.graph.op("Transpose", x, perm=perm)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.graph.op("Unsqueeze", x, self.graph.const([axis]))

    def concat(self, xs: list[str], axis: int) -> str:
        return self.graph.op("Concat", *xs, axis=axis)

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        return list(self.graph.op("Split", x, self.graph.const(sizes), axis=axis, n_out=len(sizes)))


def io_spec(cfg: DecoderConfig, dtype: str, merged: bool) -> tuple[list[TensorIO], list[TensorIO]]:
    """Names, element types and shapes (symbolic dims as strings) of the graph's inputs/outputs."""
    kv = ("batch", cfg.kv_heads, "past_sequence", cfg.head_dim)
    present = ("batch", cfg.kv_heads, "total_sequence", cfg.head_dim)
    inputs = [TensorIO(name="input_ids", dtype="int64", shape=("batch", "sequence")),
              TensorIO(name="attention_mask", dtype="int64", shape=("batch", "total_sequence")),
              TensorIO(name="position_ids", dtype="int64", shape=("batch", "sequence"))]
    if merged:
        inputs.append(TensorIO(name="expert_id", dtype="int64", shape=("batch",)))
    outputs = [TensorIO(name="logits", dtype=dtype, shape=("batch", "sequence", cfg.vocab))]
    for i in range(cfg.layers):
        for part in ("key", "value"):
            inputs.append(TensorIO(name=f"past_key_values.{i}.{part}", dtype=dtype, shape=kv))
            outputs.append(TensorIO(name=f"present.{i}.{part}", dtype=dtype, shape=present))
    if merged:  # the id each row ran with (routed where expert_id < 0); fed back at decode steps
        outputs.append(TensorIO(name="expert_id_used", dtype="int64", shape=("batch",)))
    return inputs, outputs


Router = Any  # (GraphBuilder, expert_id) -> resolved expert_id, see compiler.router.router_graph


def write_model(w: ModelWeights, spec: ArchSpec, cfg: DecoderConfig, folder: Path, *,
                linear: str, dtype: str, router: Router = None
                ) -> tuple[list[TensorIO], list[TensorIO]]:
    """Write folder/model.onnx + model.onnx.data; returns the graph's inputs and outputs.
    `router` (an artifact's) resolves rows whose expert_id < 0 inside the graph."""
    data = ExternalData(folder / "model.onnx.data")
    try:
        graph = GraphBuilder(data)
        expert_id = "expert_id"
        if w.merged:  # every gather reads the resolved id, also returned to the runtime
            expert_id = router(graph, expert_id) if router is not None else expert_id
            graph.op("Identity", expert_id, out="expert_id_used")
        ops = OnnxOps(graph, w, cfg, dtype, linear, expert_id)
        logits = decoder.logits(ops, spec, cfg, "input_ids", "position_ids")
        graph.op("Identity", logits, out="logits")
    finally:
        data.close()
    inputs, outputs = io_spec(cfg, dtype, w.merged)

    def info(e: TensorIO) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(e.name, ONNX_DTYPES[e.dtype], list(e.shape))

    graph = onnx.helper.make_graph(graph.nodes, "chmc_decoder", [info(e) for e in inputs],
                                   [info(e) for e in outputs], graph.initializers)
    opsets = [onnx.helper.make_opsetid("", OPSET)]
    if ops.linear == "plugin":
        opsets.append(onnx.helper.make_opsetid(schema.DOMAIN, 1))
    if ops.linear == "select":
        opsets.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="chmc")
    model.ir_version = 8
    with open(folder / "model.onnx", "wb") as f:
        f.write(model.SerializeToString())
    return inputs, outputs
