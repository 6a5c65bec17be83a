"""Stage: ONNX graph -> TensorRT engine (`model.plan` + `engine.json`), built through Polygraphy.

TensorRT 11 builds only strongly typed networks, so precision comes from the ONNX graph itself
(no FP16/BF16 builder flags). Dynamic dimensions are named in the graph (dim_param); each name
is classified as batch, sequence, past or total (= past + sequence) length and given a range.
Two optimisation profiles: 0 "prefill" (any sequence length) and 1 "decode" (sequence length 1),
so TensorRT tunes the ChannelGatherMatMul tactics for each regime. engine.json records the
profiles and the engine's bindings for the runner. TensorRT is detected by its API before any
work, and the output is staged, so a missing TensorRT writes nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from google.protobuf.message import DecodeError

from chmc.errors import ChmcError
from chmc.formats import engine as engine_format
from chmc.formats.artifact import MANIFEST
from chmc.formats.checkpoint import copy_side_files
from chmc.formats.engine import (
    PLAN,
    PROFILES,
    Binding,
    EngineManifest,
    Profile,
    write_engine_manifest,
)
from chmc.formats.outputs import check_output_path, staged_output
from chmc.plugins.channel_gather_matmul import schema
from chmc.plugins.tensorrt import require_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


@dataclass(frozen=True)
class Ranges:
    """(min, opt, max) of every kind of dynamic dimension."""

    batch: tuple[int, int, int] = (1, 1, 8)
    sequence: tuple[int, int, int] = (1, 128, 2048)
    past: tuple[int, int, int] = (0, 256, 2048)

    @property
    def total(self) -> tuple[int, int, int]:
        return (max(1, self.past[0] + self.sequence[0]), self.past[1] + self.sequence[1],
                self.past[2] + self.sequence[2])

    def decode(self) -> Ranges:
        """The decode profile: one new token per step."""
        return Ranges(self.batch, (1, 1, 1), (max(self.past[0], 1), self.past[1], self.past[2]))

    def check(self) -> None:
        for kind, (lo, opt, hi) in asdict(self).items():
            if not 0 <= lo <= opt <= hi or hi < 1:
                raise ChmcError(f"{kind} range min={lo} opt={opt} max={hi}: "
                                "need 0 <= min <= opt <= max")


def dim_kind(name: str) -> str | None:
    """Classify a dim_param by name: 'batch_size' -> batch, 'past_sequence_length' -> past, ..."""
    n = name.lower()
    if "batch" in n:
        return "batch"
    if "past" in n or "cache" in n:
        return "past"
    if "total" in n or "attention" in n or "kv" in n:
        return "total"
    if "seq" in n or "len" in n or "token" in n:
        return "sequence"
    return None


def find_onnx(onnx_dir: str | Path) -> Path:
    """The graph file: ONNX_DIR/model.onnx, the folder's only .onnx file, or a file path."""
    p = Path(onnx_dir)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ChmcError(f"{p}: no such ONNX file or folder")
    if (p / "model.onnx").is_file():
        return p / "model.onnx"
    found = sorted(p.glob("*.onnx"))
    if len(found) != 1:
        raise ChmcError(f"{p}: expected model.onnx (or exactly one .onnx file), found {len(found)}")
    return found[0]


def load_graph(onnx_path: Path) -> Any:
    """The ModelProto without its weights (external data stays on disk)."""
    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as e:
        raise ChmcError(f"{onnx_path}: cannot read ONNX graph ({e})") from None


def check_plugin_nodes(model: Any, onnx_path: Path) -> None:
    """TensorRT's ONNX parser finds a plugin by op type plus a `plugin_namespace` attribute."""
    for node in model.graph.node:
        if node.op_type != schema.NAME:
            continue
        attrs = {a.name: a.s.decode() for a in node.attribute if a.type == a.STRING}
        if attrs.get("plugin_namespace") != schema.DOMAIN:
            raise ChmcError(
                f"{onnx_path}: node '{node.name or node.output[0]}' ({schema.NAME}) has "
                f"plugin_namespace={attrs.get('plugin_namespace')!r}; TensorRT needs "
                f"'{schema.DOMAIN}' to match the plugin (re-export with a newer chmc)")


def input_shapes(model: Any, ranges: Ranges, onnx_path: Path) -> dict[str, ShapeRange]:
    """(min, opt, max) shape of every graph input, from its dims' names."""
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, ShapeRange] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                r = (d.dim_value,) * 3
            else:
                kind = dim_kind(d.dim_param)
                if kind is None:
                    raise ChmcError(
                        f"{onnx_path}: input '{inp.name}' axis {axis} has dynamic dim "
                        f"'{d.dim_param}', which is not a batch/sequence/past/total length")
                r = getattr(ranges, kind)
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        shapes[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def profiles(onnx_path: Path, ranges: Ranges) -> list[dict[str, ShapeRange]]:
    """Profile 0: prefill (any sequence length); profile 1: decode (sequence length 1)."""
    ranges.check()
    model = load_graph(onnx_path)
    check_plugin_nodes(model, onnx_path)
    return [input_shapes(model, ranges, onnx_path), input_shapes(model, ranges.decode(), onnx_path)]


def bindings(engine: trt.ICudaEngine) -> list[Binding]:
    """Name, direction, dtype and (profile-free) shape of every I/O tensor of the engine."""
    import tensorrt  # only where an engine exists: TensorRT is optional

    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        out.append(Binding(name=name,
                           mode="input" if mode == tensorrt.TensorIOMode.INPUT else "output",
                           dtype=str(engine.get_tensor_dtype(name)).removeprefix("DataType."),
                           shape=tuple(dims_list(engine.get_tensor_shape(name)))))
    return out


def dims_list(dims: trt.Dims) -> list[int]:
    """A TensorRT Dims as a list (-1 for a dynamic axis)."""
    return [dims[i] for i in range(len(dims))]


def _build(onnx_path: Path, shapes: list[dict[str, ShapeRange]]) -> trt.ICudaEngine:
    # polygraphy's TensorRT backend imports tensorrt: only on the machines that build engines
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath
    from polygraphy.backend.trt import Profile as TrtProfile
    from rich.console import Console

    trt_profiles = []
    for profile in shapes:
        p = TrtProfile()
        for name, (lo, opt, hi) in profile.items():
            p.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(p)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    with Console(stderr=True).status(f"building TensorRT engine from {onnx_path.name}"):
        engine: trt.ICudaEngine = EngineFromNetwork(
            network, config=CreateConfig(profiles=trt_profiles))()
    return engine


def build_engine(onnx_dir: str | Path, out: str | Path, *, ranges: Ranges | None = None,
                 force: bool = False) -> Path:
    """Build `out/model.plan` and `out/engine.json` from an exported ONNX folder."""
    trt_mod = require_tensorrt()  # before anything else: without TensorRT nothing is written
    # the plugin compiles Triton kernels: imported only where TensorRT (and a GPU stack) is
    from chmc.plugins.channel_gather_matmul.tensorrt_plugin import register_plugin

    ranges = ranges or Ranges()
    onnx_path = find_onnx(onnx_dir)
    out_path = check_output_path(out, force, inputs=[onnx_path.parent])
    shapes = profiles(onnx_path, ranges)
    register_plugin()
    with staged_output(out_path, force, inputs=[onnx_path.parent]) as tmp:
        engine = _build(onnx_path, shapes)
        if engine is None:
            raise ChmcError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
        (tmp / PLAN).write_bytes(bytes(engine.serialize()))
        write_engine_manifest(tmp, EngineManifest(
            onnx=str(onnx_path.resolve()), tensorrt=getattr(trt_mod, "__version__", "unknown"),
            profiles=[Profile(name=n, shapes={k: engine_format.ShapeRange(min=v[0], opt=v[1],
                                                                          max=v[2])
                                              for k, v in p.items()})
                      for n, p in zip(PROFILES, shapes)],
            bindings=bindings(engine)))
        copy_side_files(onnx_path.parent, tmp)
        shutil.copy2(onnx_path.parent / MANIFEST, tmp / MANIFEST)  # the export's: experts, I/O
    return out_path
