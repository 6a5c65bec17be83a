"""TensorRT plugin `chmc::ChannelGatherMatMul`, compiled ahead of time from the Triton kernels.

The ONNX parser maps the plugin form's node (op `ChannelGatherMatMul`, domain `chmc`, attribute
plugin_namespace="chmc") onto this Python-defined plugin. Its `aot_impl` returns PTX compiled from
kernels.py, so the engine carries the kernel and later loads where there is no Python (trtexec,
Triton's TensorRT backend). Two tactics, timed by TensorRT at each profile's shapes: the
mixed-expert kernel (decode, any batch) and the gather-GEMM (prefill).

No import-time side effects: `register_plugin()` registers once, on demand. PTX compilation is
separate (`compile_kernel`) so it can be checked on machines without TensorRT or a GPU.
NOTE: no `from __future__ import annotations` here: tensorrt.plugin reads the annotations of the
registered functions at decoration time and needs them evaluated.
"""

from typing import Any, List, Tuple, Union  # noqa: UP035  tensorrt.plugin checks these hints

from chmc.plugins.channel_gather_matmul.kernels import KERNELS, Launch, fixed_launch
from chmc.plugins.channel_gather_matmul.schema import PLUGIN_ID
from chmc.plugins.tensorrt import require_tensorrt

TACTICS = {1: "mixed", 2: "prefill"}  # custom tactic ids (0 means "default" to TensorRT)
TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
TRT_TYPES = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32"}  # AutoTuneCombination names
# Fixed launches for the embedded PTX. They stay within the 48 KiB of shared memory a kernel may
# use without the launcher opting in to more, since we cannot rely on TensorRT doing so.
AOT_LAUNCH = {"mixed": fixed_launch("mixed", 16), "prefill": Launch(128, 128, 32, 8, 2)}
PORTABLE_SHARED_BYTES = 48 * 1024
_registered = False


def kernel_signature(mode: str, dtype: str) -> dict[str, str]:
    """Triton signature of one kernel: inputs, int32 scalars, output, then constexprs
    (AOT order)."""
    ptr = f"*{TRITON_TYPES[dtype]}"
    sig = {"x": ptr, "bank": ptr, "index": "*i32", "expert_id": "*i64",
           "S": "i32", "N_OUT": "i32", "N_IN": "i32"}
    if mode == "mixed":
        sig |= {"N_GROUPS": "i32", "M": "i32"}
    sig["y"] = ptr
    return sig | {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                  "F32_DOT": "constexpr"}


def compile_kernel(mode: str, dtype: str, launch: Launch, arch: int | None = None,
                   divisible: tuple[str, ...] = (), max_shared: int | None = None) -> Any:
    """Compile one kernel with Triton; `arch` (e.g. 90) targets a GPU absent from this machine.

    Pointers are declared 16-byte aligned (TensorRT's buffers are) and the int arguments named in
    `divisible` multiples of 16, as Triton's JIT would specialise them: without these hints the
    loads are not vectorised, so the K loop is not pipelined (no cp.async).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = {"BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n,
                  "BLOCK_K": launch.block_k, "F32_DOT": dtype == "float32"}
    signature = kernel_signature(mode, dtype)
    names = list(signature)
    hinted = [n for n, t in signature.items() if t.startswith("*")] + list(divisible)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    src = triton.compiler.ASTSource(fn=KERNELS[mode], signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    target = GPUTarget("cuda", arch, 32) if arch is not None else None
    compiled = triton.compile(src, target=target,
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages,
                                       "enable_fp_fusion": True})  # explicit: the default moves
    if max_shared is not None and compiled.metadata.shared > max_shared:
        raise RuntimeError(f"{mode} kernel needs {compiled.metadata.shared} bytes of shared memory")
    if getattr(compiled.metadata, "global_scratch_size", 0):
        raise RuntimeError(f"{mode} kernel needs Triton global scratch, which TensorRT cannot pass")
    return compiled


def launch_params(mode: str, launch: Launch, batch: Any, seq: Any, n_out: Any, n_in: Any,
                  n_groups: Any, cdiv: Any) -> Tuple[Tuple[Any, Any, Any], List[Any]]:  # noqa: UP006
    """The grid (as kernels.grid) and the int32 scalars after the pointers, for plain ints or
    TensorRT's symbolic shape expressions (with their `cdiv`)."""
    if mode == "mixed":  # grid (cdiv(out, BN), cdiv(B * S, BM))
        grid = (cdiv(n_out, launch.block_n), cdiv(batch * seq, launch.block_m), 1)
        return grid, [seq, n_out, n_in, n_groups, batch * seq]
    return (cdiv(seq, launch.block_m), cdiv(n_out, launch.block_n), batch), [seq, n_out, n_in]


def divisible_dims(**dims: Any) -> tuple[str, ...]:
    """Names of the build-time constant dims (e.g. the bank's out and in) that are multiples of
    16."""
    out = []
    for name, expr in dims.items():
        try:
            if expr.is_constant and expr.constant_value() % 16 == 0:
                out.append(name)
        except RuntimeError:  # a "fake" expression outside shape calculation: no hint
            pass
    return tuple(out)


def register_plugin() -> None:
    """Register chmc::ChannelGatherMatMul with TensorRT's plugin registry (once per process)."""
    global _registered
    if _registered:
        return
    require_tensorrt()
    _define()
    _registered = True


def _define() -> None:
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtypes = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32"}

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, bank: trtp.TensorDesc, index: trtp.TensorDesc,
              expert_id: trtp.TensorDesc) -> trtp.TensorDesc:
        # y [B, S, out] in x's dtype
        shape = trtp.ShapeExprs.from_tuple((x.shape_expr[0], x.shape_expr[1], bank.shape_expr[1]))
        return trtp.from_shape_expr(shape, dtype=x.dtype)

    @trtp.autotune(PLUGIN_ID)
    def _tune(x: trtp.TensorDesc, bank: trtp.TensorDesc, index: trtp.TensorDesc,
              expert_id: trtp.TensorDesc,
              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
        return [trtp.AutoTuneCombination(f"{t},{t},INT32,INT64,{t}", "LINEAR", list(TACTICS))
                for t in TRT_TYPES.values()]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(x: trtp.TensorDesc, bank: trtp.TensorDesc, index: trtp.TensorDesc,
             expert_id: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
             tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes],  # noqa: UP006, UP007
                                   trtp.KernelLaunchParams, trtp.SymExprs]:
        mode = TACTICS.get(tactic, "mixed")
        launch = AOT_LAUNCH[mode]
        batch, seq, n_in = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        n_groups, n_out = bank.shape_expr[0], bank.shape_expr[1]
        divisible = divisible_dims(N_OUT=n_out, N_IN=bank.shape_expr[2])
        compiled = compile_kernel(mode, dtypes[x.dtype], launch, divisible=divisible,
                                  max_shared=PORTABLE_SHARED_BYTES)
        params = trtp.KernelLaunchParams()
        (params.grid_x, params.grid_y, grid_z), scalars = launch_params(
            mode, launch, batch, seq, n_out, n_in, n_groups, trtp.cdiv)
        if mode == "prefill":
            params.grid_z = grid_z
        params.block_x = compiled.metadata.num_warps * 32
        params.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs(len(scalars))
        for i, s in enumerate(scalars):
            extra[i] = trtp.SymInt32(s)
        return compiled.metadata.name, compiled.asm["ptx"], params, extra
