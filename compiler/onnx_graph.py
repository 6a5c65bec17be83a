"""The decoder graph, built node by node from a declarative spec, weights streamed to external data.

Why build rather than trace: tracing transformers with a KV cache is fragile, and building by
tensor name lets every initializer go straight from the artifact's shard to `model.onnx.data`, one
tensor at a time, so export memory stays at one tensor (the ModelProto holds only offsets).

Three forms of a Linear (`linear=`):
  dense   y = x @ W^T                          plain checkpoint, no expert_id
  gather  rows = Gather(rowtable, expert_id)   [B, out], rowtable[n, c] = index[n, c] * out + c
          W = Gather(bank_flat, rows)          [B, out, in] from bank_flat [K*out, in]
          y = MatMul(x, Transpose(W))          ORT fuses Transpose into FusedMatMul(transB)
  select  Y = x @ bankT                        [B, S, K*out] from bankT [in, K*out]: no copies
          y = GatherElements(Y, rows[expert_id])  each row's channel c from its group's block
  plugin  y = chmc.ChannelGatherMatMul(x, bank [K, out, in], index [N, out] int32, expert_id)
Per-expert 1-D tensors (norms, biases) are Gather(experts [N, D], expert_id) -> [B, 1, D].
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from chmc.errors import ChmcError
from chmc.models.spec import ArchSpec, DecoderConfig

if TYPE_CHECKING:
    import onnx
    import torch

LINEAR_FORMS = ("gather", "select", "plugin")
DTYPES = ("float32", "float16", "bfloat16")
OPSET = 17
PLUGIN_DOMAIN = "chmc"
PLUGIN_OP = "ChannelGatherMatMul"
ALIGN = 4096  # initializers start on page boundaries so runtimes can mmap them


class Weights:
    """A model folder seen by tensor name: a chmc artifact (experts) or a plain HF checkpoint (dense).

    Tensors are read with plain file reads at their header offsets (no mmap), so pages of tensors
    already written do not stay resident in the exporting process.
    """

    def __init__(self, path: Path):
        from chmc.compiler.artifact import MANIFEST, expert_names, read_manifest
        from chmc.compiler.checkpoints import Checkpoint

        self.path = path
        self.manifest: dict[str, Any] | None = None
        self._files: dict[str, Path] = {}
        self._bins: Any = None
        if (path / MANIFEST).is_file():
            self.manifest = read_manifest(path)
            self.experts = expert_names(self.manifest)
            self.config = json.loads((path / "config.json").read_text())
            self._files = {n: path / f for n, f in self.manifest["weight_map"].items()}
            self._kinds = {n: e["kind"] for n, e in self.manifest["tensors"].items()}
            self._shapes = {n: tuple(e["shape"]) for n, e in self.manifest["tensors"].items()}
        else:
            ckpt = Checkpoint(path)
            self.experts = []
            self.config = ckpt.config
            self._kinds = {n: "dense" for n in ckpt.tensors}
            self._shapes = {n: i.shape for n, i in ckpt.tensors.items()}
            self._files = {n: i.file for n, i in ckpt.tensors.items()}
            self._bins = ckpt
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}

    @property
    def merged(self) -> bool:
        return self.manifest is not None

    def has(self, name: str) -> bool:
        return name in self._kinds

    def kind(self, name: str) -> str:
        if name not in self._kinds:
            raise ChmcError(f"{self.path}: has no tensor '{name}' (needed by the graph)")
        return self._kinds[name]

    def shape(self, name: str) -> tuple[int, ...]:
        self.kind(name)
        return self._shapes[name]

    def bank(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(bank [K, out, in], index [N, out]) of a merged or stacked 2-D tensor."""
        import torch

        if self.kind(name) == "merged":
            return self.read(f"{name}.bank"), self.read(f"{name}.index")
        stack = self.read(f"{name}.experts")  # [N, out, in]: a bank with K = N, index[n, c] = n
        n, out = stack.shape[0], stack.shape[1]
        return stack, torch.arange(n).unsqueeze(1).expand(n, out)

    def read(self, stored: str) -> torch.Tensor:
        """One stored tensor ('x.weight', 'x.weight.bank', ...) read into fresh memory."""
        import torch
        from chmc.compiler.checkpoints import SAFETENSORS_DTYPES

        file = self._files.get(stored)
        if file is None:
            raise ChmcError(f"{self.path}: has no stored tensor '{stored}'")
        if file.suffix == ".bin":
            return self._bins.tensor(stored).clone()
        if file not in self._headers:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (8 + n, json.loads(f.read(n)))
        start, header = self._headers[file]
        entry = header[stored]
        begin, end = entry["data_offsets"]
        buf = bytearray(end - begin)
        with open(file, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise ChmcError(f"{file}: truncated while reading tensor '{stored}'")
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]][0])
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


class ExternalData:
    """Appends initializer bytes to one file and returns TensorProtos that point into it."""

    def __init__(self, file: Path):
        self.file = file
        self._f: IO[bytes] = open(file, "wb")  # noqa: SIM115  closed by close()
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> onnx.TensorProto:
        import onnx
        import torch

        t = t.detach().contiguous()
        proto = onnx.TensorProto()
        proto.name = name
        proto.dims.extend(t.shape)
        proto.data_type = _onnx_dtype(str(t.dtype).removeprefix("torch."))
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


def _onnx_dtype(name: str) -> int:
    import onnx

    return {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
            "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
            "int32": onnx.TensorProto.INT32, "uint8": onnx.TensorProto.UINT8,
            "bool": onnx.TensorProto.BOOL}[name]


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output name(s) of the node it adds."""

    def __init__(self, data: ExternalData, dtype: str):
        self.data, self.dtype = data, dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "",
           out: str | None = None, **attrs: Any) -> Any:
        import onnx

        self._count += 1
        outs = [out] if out else [f"{op_type.lower()}_{self._count}" + (f"_{i}" if n_out > 1 else "")
                                  for i in range(n_out)]
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), outs,
                                                name=f"{op_type}_{self._count}", domain=domain,
                                                **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: str = "int64") -> str:
        """A small inline constant (shapes, axes, scalars), shared between uses."""
        import onnx

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


class DecoderGraph:
    """Emits the decoder of `spec`/`cfg` into a GraphBuilder, reading weights from `w`."""

    def __init__(self, b: GraphBuilder, w: Weights, spec: ArchSpec, cfg: DecoderConfig,
                 linear: str):
        self.b, self.w, self.spec, self.cfg, self.linear = b, w, spec, cfg, linear
        self.expert_id = "expert_id"  # an input only when the source is merged
        self._vectors: dict[str, str] = {}
        self._stored: dict[str, tuple[str, str]] = {}
        self._transposed: dict[str, bool] = {}

    # -- weights -------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        import torch

        return t.to(getattr(torch, self.b.dtype))

    def vector(self, name: str) -> str:
        """A 1-D tensor (norm weight, bias): [D] dense, or this row's expert copy [B, 1, D]."""
        if name in self._vectors:
            return self._vectors[name]
        kind = self.w.kind(name)
        if kind == "dense":
            out = self.b.weight(name, self._cast(self.w.read(name)))
        elif kind == "stacked":
            stack = self.b.weight(f"{name}.experts", self._cast(self.w.read(f"{name}.experts")))
            out = self.b.op("Unsqueeze", self.b.op("Gather", stack, self.expert_id, axis=0),
                            self.b.const([1]))
        else:
            raise ChmcError(f"{self.w.path}: 1-D tensor '{name}' is stored as '{kind}', "
                            "expected 'stacked'")
        self._vectors[name] = out
        return out

    def _rows(self, name: str, index: Any, out: int) -> str:
        import torch

        rows = index.long() * out + torch.arange(out)  # [N, out] rows of the flattened bank
        return self.b.weight(f"{name}.rows", rows)

    def matrix_rows(self, name: str, transposed: bool = False) -> tuple[str, str]:
        """(bank, row table [N, out] int64) initializers, once. The bank is flat [K*out, in], or
        [in, K*out] when `transposed` (the select form: a plain MatMul operand ORT prepacks)."""
        if name not in self._stored:
            bank, index = self.w.bank(name)
            k, out, inp = bank.shape
            flat = self._cast(bank).reshape(k * out, inp)
            del bank
            stored = (self.b.weight(f"{name}.bankT", flat.t()) if transposed
                      else self.b.weight(f"{name}.bank", flat))
            self._stored[name] = (stored, self._rows(name, index, out))
            self._transposed[name] = transposed
        return self._stored[name]

    def plugin_bank(self, name: str) -> tuple[str, str]:
        """Plugin form: (bank [K, out, in], index [N, out] int32) initializers, once."""
        import torch

        if name not in self._stored:
            bank, index = self.w.bank(name)
            bank_name = self.b.weight(f"{name}.bank", self._cast(bank))
            del bank
            idx = self.b.weight(f"{name}.index", index.to(torch.int32).contiguous())
            self._stored[name] = (bank_name, idx)
        return self._stored[name]

    def matmul(self, x: str, name: str) -> str:
        """x [B, S, in] @ W^T -> [B, S, out] for the 2-D tensor `name` in this export's form."""
        b = self.b
        if self.w.kind(name) == "dense":
            if name not in self._stored:
                self._stored[name] = (b.weight(f"{name}.T", self._cast(self.w.read(name)).t()), "")
            return b.op("MatMul", x, self._stored[name][0])  # [in, out] initializer
        if self.linear == "plugin":
            bank, idx = self.plugin_bank(name)
            return b.op(PLUGIN_OP, x, bank, idx, self.expert_id, domain=PLUGIN_DOMAIN,
                        plugin_namespace=PLUGIN_DOMAIN)  # TensorRT's parser finds chmc::<op>
        flat, rows = self.matrix_rows(name, transposed=self.linear == "select")
        r = b.op("Gather", rows, self.expert_id, axis=0)  # [B, out]
        if self.linear == "select":  # every bank's outputs, then each row's channel from its group
            y_all = (b.op("MatMul", x, flat) if self._transposed[name]  # [B, S, K*out]
                     else b.op("FusedMatMul", x, flat, domain="com.microsoft", transB=1))
            out = b.op("Concat", b.op("Slice", b.op("Shape", x), b.const([0]), b.const([2])),
                       b.const([self.w.shape(name)[0]]), axis=0)
            r = b.op("Expand", b.op("Unsqueeze", r, b.const([1])), out)  # [B, S, out]
            return b.op("GatherElements", y_all, r, axis=2)
        wb = b.op("Gather", flat, r, axis=0)  # [B, out, in]
        return b.op("MatMul", x, b.op("Transpose", wb, perm=[0, 2, 1]))  # [B, S, out]

    def linear_op(self, x: str, prefix: str) -> str:
        """y = x @ W^T (+ b) for the Linear named `prefix`."""
        y = self.matmul(x, f"{prefix}.weight")
        bias = f"{prefix}.bias"
        return self.b.op("Add", y, self.vector(bias)) if self.w.has(bias) else y

    def embed(self, ids: str) -> str:
        """Token embeddings [B, S, D]: the expert's row of the embedding bank for each token."""
        b, name = self.b, self.spec.embed
        if self.w.kind(name) == "dense":
            return b.op("Gather", b.weight(name, self._cast(self.w.read(name))), ids, axis=0)
        if self.linear == "plugin":  # bank [K, V, D]: GatherND on (group, token) pairs
            bank, idx = self.plugin_bank(name)
            group = b.op("GatherElements", b.op("Gather", idx, self.expert_id, axis=0), ids, axis=1)
            pairs = b.op("Concat", b.op("Unsqueeze", b.op("Cast", group, to=_onnx_dtype("int64")),
                                        b.const([-1])),
                         b.op("Unsqueeze", ids, b.const([-1])), axis=-1)  # [B, S, 2]
            return b.op("GatherND", bank, pairs)
        flat, rows = self.matrix_rows(name)
        r = b.op("GatherElements", b.op("Gather", rows, self.expert_id, axis=0), ids, axis=1)
        return b.op("Gather", flat, r, axis=0)  # [B, S, D]

    def lm_head(self, x: str) -> str:
        b, spec = self.b, self.spec
        if not (self.cfg.tie_word_embeddings or not self.w.has(spec.lm_head)):
            return self.linear_op(x, spec.lm_head.removesuffix(".weight"))
        if self.w.kind(spec.embed) == "dense":  # tied dense: reuse the embedding table
            return b.op("MatMul", x, b.op("Transpose", spec.embed, perm=[1, 0]))
        return self.matmul(x, spec.embed)

    # -- blocks --------------------------------------------------------------------------------
    def rms_norm(self, x: str, weight: str) -> str:
        b = self.b
        h = x if b.dtype == "float32" else b.op("Cast", x, to=_onnx_dtype("float32"))
        var = b.op("ReduceMean", b.op("Mul", h, h), axes=[-1], keepdims=1)
        h = b.op("Div", h, b.op("Sqrt", b.op("Add", var, b.const(self.cfg.eps, "float32"))))
        if b.dtype != "float32":
            h = b.op("Cast", h, to=_onnx_dtype(b.dtype))
        return b.op("Mul", h, self.vector(weight))

    def rotary(self, position_ids: str) -> tuple[str, str]:
        """cos, sin [B, S, 1, hd] for default RoPE, computed in float32 like transformers."""
        b, hd = self.b, self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64)
                                                  .astype(np.float32) / hd))
        pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=_onnx_dtype("float32")),
                   b.const([-1]))  # [B, S, 1]
        freqs = b.op("Mul", pos, b.const(inv_freq.astype(np.float32), "float32"))  # [B, S, hd/2]
        emb = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.const([2]))
        cos, sin = b.op("Cos", emb), b.op("Sin", emb)
        if b.dtype != "float32":
            cos, sin = (b.op("Cast", t, to=_onnx_dtype(b.dtype)) for t in (cos, sin))
        return cos, sin

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x [B, S, H, hd] * cos + rotate_half(x) * sin."""
        b, half = self.b, self.cfg.head_dim // 2
        x1, x2 = b.op("Split", x, b.const([half, half]), axis=-1, n_out=2)
        rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))

    def masks(self, attention_mask: str, ids: str) -> dict[int | None, str]:
        """allowed[b, 1, 1, q, k] (bool) per window size: causal, padding, sliding window."""
        b = self.b
        total = b.op("Gather", b.op("Shape", attention_mask), b.const(1), axis=0)  # T = P + S
        seq = b.op("Gather", b.op("Shape", ids), b.const(1), axis=0)  # S
        kv = b.op("Range", b.const(0), total, b.const(1))  # [T]
        q = b.op("Unsqueeze", b.op("Range", b.op("Sub", total, seq), total, b.const(1)),
                 b.const([1]))  # [S, 1] absolute positions of the queries
        causal = b.op("LessOrEqual", kv, q)  # [S, T]
        pad = b.op("Unsqueeze", b.op("Cast", attention_mask, to=_onnx_dtype("bool")),
                   b.const([1, 2, 3]))  # [B, 1, 1, 1, T]
        out: dict[int | None, str] = {}
        for window in sorted(set(self.cfg.windows), key=lambda w: w or 0):
            allowed = causal
            if window is not None:
                allowed = b.op("And", allowed, b.op("Greater", kv, b.op("Sub", q, b.const(window))))
            out[window] = b.op("And", pad, allowed)  # [B, 1, 1, S, T]
        return out

    def attention(self, x: str, i: int, cos: str, sin: str, allowed: str,
                  past_k: str, past_v: str) -> tuple[str, str, str]:
        b, cfg = self.b, self.cfg
        names = {p: t.format(i=i) for p, t in self.spec.attention.items()}
        groups = cfg.heads // cfg.kv_heads
        q = b.op("Reshape", self.linear_op(x, names["q"]), b.const([0, 0, cfg.heads, cfg.head_dim]))
        k = b.op("Reshape", self.linear_op(x, names["k"]),
                 b.const([0, 0, cfg.kv_heads, cfg.head_dim]))
        v = b.op("Reshape", self.linear_op(x, names["v"]),
                 b.const([0, 0, cfg.kv_heads, cfg.head_dim]))
        q = b.op("Reshape", self.rope(q, cos, sin),
                 b.const([0, 0, cfg.kv_heads, groups, cfg.head_dim]))
        q = b.op("Transpose", q, perm=[0, 2, 3, 1, 4])  # [B, kvh, g, S, hd]
        k = b.op("Transpose", self.rope(k, cos, sin), perm=[0, 2, 1, 3])  # [B, kvh, S, hd]
        v = b.op("Transpose", v, perm=[0, 2, 1, 3])
        present_k = b.op("Concat", past_k, k, axis=2)  # [B, kvh, T, hd]
        present_v = b.op("Concat", past_v, v, axis=2)
        kt = b.op("Unsqueeze", b.op("Transpose", present_k, perm=[0, 1, 3, 2]), b.const([2]))
        scores = b.op("MatMul", q, kt)  # [B, kvh, g, S, T]
        if b.dtype != "float32":
            scores = b.op("Cast", scores, to=_onnx_dtype("float32"))
        scores = b.op("Mul", scores, b.const(cfg.head_dim ** -0.5, "float32"))
        scores = b.op("Where", allowed, scores, b.const(np.finfo(np.float32).min, "float32"))
        probs = b.op("Softmax", scores, axis=-1)
        if b.dtype != "float32":
            probs = b.op("Cast", probs, to=_onnx_dtype(b.dtype))
        ctx = b.op("MatMul", probs, b.op("Unsqueeze", present_v, b.const([2])))  # [B,kvh,g,S,hd]
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 3, 1, 2, 4]), b.const([0, 0, -1]))
        return self.linear_op(ctx, names["o"]), present_k, present_v

    def mlp(self, x: str, i: int) -> str:
        b = self.b
        names = {p: t.format(i=i) for p, t in self.spec.mlp.items()}
        gate = self.linear_op(x, names["gate"])
        act = b.op("Mul", gate, b.op("Sigmoid", gate))  # silu
        return self.linear_op(b.op("Mul", act, self.linear_op(x, names["up"])), names["down"])

    def routed_expert(self) -> str:
        """expert_id [B] as given, or routed by the artifact's router where it is < 0."""
        if not (self.w.manifest or {}).get("router"):
            return "expert_id"
        from chmc.compiler.router import load_router, router_graph

        weights, section = load_router(self.w.path)
        return router_graph(self.b, weights, section["vocab"], section["config"]["buckets"],
                            "input_ids", "attention_mask", "expert_id")

    def build(self) -> None:
        b, cfg, spec = self.b, self.cfg, self.spec
        if self.w.merged:  # every gather reads the resolved id, also returned to the runtime
            self.expert_id = self.routed_expert()
            b.op("Identity", self.expert_id, out="expert_id_used")
        cos, sin = self.rotary("position_ids")
        allowed = self.masks("attention_mask", "input_ids")
        h = self.embed("input_ids")
        for i in range(cfg.layers):
            attn, pk, pv = self.attention(
                self.rms_norm(h, spec.input_norm.format(i=i)), i, cos, sin,
                allowed[cfg.windows[i]], f"past_key_values.{i}.key", f"past_key_values.{i}.value")
            b.op("Identity", pk, out=f"present.{i}.key")
            b.op("Identity", pv, out=f"present.{i}.value")
            h = b.op("Add", h, attn)
            h = b.op("Add", h, self.mlp(self.rms_norm(h, spec.post_attention_norm.format(i=i)), i))
        logits = self.lm_head(self.rms_norm(h, spec.final_norm))
        b.op("Identity", logits, out="logits")


def io_spec(cfg: DecoderConfig, dtype: str, merged: bool) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (symbolic dims as strings) of the graph's inputs/outputs."""
    kv = ["batch", cfg.kv_heads, "past_sequence", cfg.head_dim]
    present = ["batch", cfg.kv_heads, "total_sequence", cfg.head_dim]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    if merged:
        inputs.append({"name": "expert_id", "dtype": "int64", "shape": ["batch"]})
    outputs = [{"name": "logits", "dtype": dtype, "shape": ["batch", "sequence", cfg.vocab]}]
    for i in range(cfg.layers):
        for part in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{part}", "dtype": dtype, "shape": kv})
            outputs.append({"name": f"present.{i}.{part}", "dtype": dtype, "shape": present})
    if merged:  # the id each row ran with (routed where expert_id < 0); fed back at decode steps
        outputs.append({"name": "expert_id_used", "dtype": "int64", "shape": ["batch"]})
    return {"inputs": inputs, "outputs": outputs}


def write_model(w: Weights, spec: ArchSpec, cfg: DecoderConfig, folder: Path, *,
                linear: str, dtype: str, progress: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Write folder/model.onnx + model.onnx.data; returns the io spec."""
    import onnx

    data = ExternalData(folder / "model.onnx.data")
    try:
        b = GraphBuilder(data, dtype)
        DecoderGraph(b, w, spec, cfg, linear if w.merged else "dense").build()
    finally:
        data.close()
    io = io_spec(cfg, dtype, w.merged)

    def info(e: dict[str, Any]) -> Any:
        return onnx.helper.make_tensor_value_info(e["name"], _onnx_dtype(e["dtype"]), e["shape"])

    graph = onnx.helper.make_graph(b.nodes, "chmc_decoder", [info(e) for e in io["inputs"]],
                                   [info(e) for e in io["outputs"]], b.initializers)
    opsets = [onnx.helper.make_opsetid("", OPSET)]
    if linear == "plugin" and w.merged:
        opsets.append(onnx.helper.make_opsetid(PLUGIN_DOMAIN, 1))
    if linear == "select" and w.merged:
        opsets.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="chmc")
    model.ir_version = 8
    with open(folder / "model.onnx", "wb") as f:
        f.write(model.SerializeToString())
    return io
