"""ChannelGatherMatMul: the PyTorch reference, the ONNX gather form and the Triton kernels agree.

Kernel tests (marked `gpu`) run on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, small shapes). The interpreter is chosen when kernels.py is imported, so on
a CPU machine `test_kernels_under_interpreter` re-runs the `gpu` tests in a child pytest with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import interpreter
import numpy as np
import pytest

# For mypy: torch's own types, and the kernels' Literal types (at run time the tests import
# kernels.py themselves: it picks the interpreter when imported).
if TYPE_CHECKING:
    import torch

    from chmc.plugins.channel_gather_matmul.kernels import Mode, Variant
else:
    torch = pytest.importorskip("torch")

INTERPRETING, HAS_TRITON = interpreter.INTERPRETING, interpreter.HAS_TRITON
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |y|


def reference(x: Any, bank: Any, index: Any, expert_id: Any) -> Any:
    """y[b, s, c] = x[b, s] . bank[index[expert_id[b], c], c], in fp32 (materialises W_e)."""
    rows = index[expert_id.long()].long()  # [B, out]
    w = bank[rows, torch.arange(bank.shape[1], device=bank.device)[None, :]]  # [B, out, in]
    return torch.einsum("bsi,boi->bso", x.float(), w.float())


def random_op(batch: int, seq: int, groups: int, experts: int, n_out: int, n_in: int, *,
              dtype: Any = torch.float32, device: str = "cpu", seed: int = 0) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, n_in, generator=g).to(dtype)
    bank = torch.randn(groups, n_out, n_in, generator=g).to(dtype)
    index = torch.randint(0, groups, (experts, n_out), generator=g, dtype=torch.int32)
    if groups == experts:  # K = N: every expert its own bank on half the rows, like exact banks
        index[:, ::2] = torch.arange(experts, dtype=torch.int32)[:, None]
    expert_id = torch.randint(0, experts, (batch,), generator=g)
    return tuple(t.to(device) for t in (x, bank, index, expert_id))


def gather_form_onnx(groups: int, experts: int, n_out: int, n_in: int) -> bytes:
    """One gather-form Linear, as chmc export writes it: rows = Gather(rowtable, expert_id),
    W = Gather(bank_flat, rows) [B, out, in], y = MatMul(x, Transpose(W))."""
    from onnx import TensorProto, helper

    def value(name: str, elem: int, shape: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, elem, shape)

    nodes = [
        helper.make_node("Gather", ["rowtable", "expert_id"], ["rows"], axis=0),
        helper.make_node("Gather", ["bank_flat", "rows"], ["w"], axis=0),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "gather_linear",
        [value("x", TensorProto.FLOAT, ["batch", "sequence", n_in]),
         value("bank_flat", TensorProto.FLOAT, [groups * n_out, n_in]),
         value("rowtable", TensorProto.INT64, [experts, n_out]),
         value("expert_id", TensorProto.INT64, ["batch"])],
        [value("y", TensorProto.FLOAT, ["batch", "sequence", n_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("shape", [(1, 1, 2, 4, 37, 50), (3, 5, 1, 4, 16, 9), (2, 3, 4, 4, 33, 20),
                                   (4, 2, 3, 8, 21, 64)])
def test_reference_equals_onnx_gather_form(shape: tuple[int, ...], ort_session: Any) -> None:
    batch, _, groups, experts, n_out, n_in = shape
    x, bank, index, expert_id = random_op(*shape)
    rowtable = index.long() * n_out + torch.arange(n_out)  # [N, out] rows of bank_flat
    session = ort_session(gather_form_onnx(groups, experts, n_out, n_in))
    (y,) = session.run(None, {"x": x.numpy(), "bank_flat": bank.reshape(-1, n_in).numpy(),
                              "rowtable": rowtable.numpy(), "expert_id": expert_id.numpy()})
    expected = reference(x, bank, index, expert_id).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # and the reference is a real per-expert matmul: row b uses expert expert_id[b]'s weight
    for b in range(batch):
        e = int(expert_id[b])
        w = torch.stack([bank[index[e, c], c] for c in range(n_out)])  # [out, in]
        np.testing.assert_allclose(expected[b], (x[b] @ w.T).numpy(), rtol=1e-5, atol=1e-5)


def kernel_device() -> str:
    return interpreter.kernel_device("test_kernels_under_interpreter")


# (batch, seq, groups K, experts N, out, in): odd out/in, K=1, K=N, N up to 8
SMALL = [(1, 1, 2, 4, 37, 50), (1, 1, 1, 1, 20, 33), (5, 1, 3, 5, 70, 33), (3, 2, 4, 4, 33, 129),
         (16, 1, 2, 8, 45, 40), (2, 17, 2, 4, 45, 70), (1, 20, 8, 8, 19, 24)]
LARGE = [(1, 1, 2, 4, 4099, 1031), (16, 1, 2, 4, 1027, 4096), (4, 3, 8, 8, 515, 2050),
         (2, 300, 2, 4, 1031, 515), (1, 2048, 1, 1, 512, 1024), (3, 130, 4, 4, 257, 4099)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["auto", "decode", "mixed", "prefill"])
@pytest.mark.parametrize("shape", SMALL + LARGE, ids=str)
def test_kernel_matches_reference(shape: tuple[int, ...], mode: Mode, dtype: Any) -> None:
    device = kernel_device()
    if device == "cpu" and shape in LARGE:
        pytest.skip("large shapes run on CUDA only (the interpreter is slow)")
    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

    x, bank, index, expert_id = random_op(*shape, dtype=dtype, device=device)
    y = channel_gather_matmul(x, bank, index, expert_id, mode=mode, tuned=False)
    assert y.shape == (shape[0], shape[1], shape[4]) and y.dtype == dtype
    assert_close_to_reference(y, x, bank, index, expert_id, f"{mode} {tuple(shape)}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["one expert", "one expert, then mixed", "mixed, then one"])
def test_mixed_kernel_rows_of_one_expert(rows: str, dtype: Any) -> None:
    """The mixed kernel's one-expert pass (a tile whose rows share an expert) and its per-group
    pass, side by side in one launch (80 rows: tiles of 64 and 16), against the reference."""
    device = kernel_device()
    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul, mixed_block_m

    x, bank, index, _ = random_op(80, 1, 3, 5, 70, 33, dtype=dtype, device=device)
    assert mixed_block_m(80) == 64
    ids = {"one expert": [2] * 80, "one expert, then mixed": [1] * 64 + [0, 3, 4, 1] * 4,
           "mixed, then one": [0, 3, 4, 1] * 16 + [4] * 16}[rows]
    expert_id = torch.tensor(ids, device=device)
    y = channel_gather_matmul(x, bank, index, expert_id, mode="mixed", tuned=False)
    assert_close_to_reference(y, x, bank, index, expert_id, rows)


def assert_close_to_reference(y: Any, x: Any, bank: Any, index: Any, expert_id: Any,
                              what: str) -> None:
    expected = reference(x, bank, index, expert_id)
    err = (y.float() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= TOL[x.dtype] * scale, f"max error {err:.3g} vs max |y| {scale:.3g} ({what})"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "mixed", "prefill"])
def test_every_candidate_launch(mode: Mode) -> None:
    """Autotuning may pick any candidate: each one is right on odd shapes, K=3, mixed experts."""
    device = kernel_device()
    from chmc.plugins.channel_gather_matmul.kernels import CANDIDATES, channel_gather_matmul

    shape = (2, 17, 3, 5, 70, 33) if mode == "prefill" else (3, 2, 3, 5, 70, 33)
    x, bank, index, expert_id = random_op(*shape, dtype=torch.bfloat16, device=device)
    for launch in CANDIDATES[mode]:
        y = channel_gather_matmul(x, bank, index, expert_id, mode=mode, launch=launch)
        assert_close_to_reference(y, x, bank, index, expert_id, f"{mode} {launch}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 2, 4, 4099, 1031), (16, 1, 2, 4, 1027, 4096),
                                   (2, 300, 2, 4, 1031, 515)], ids=str)
def test_autotuned_kernels(shape: tuple[int, ...]) -> None:
    """The production path: triton.autotune over the candidates (CUDA only)."""
    if kernel_device() != "cuda":
        pytest.skip("autotuning times kernels on a GPU")
    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

    x, bank, index, expert_id = random_op(*shape, dtype=torch.bfloat16, device="cuda")
    y = channel_gather_matmul(x, bank, index, expert_id)
    assert_close_to_reference(y, x, bank, index, expert_id, f"tuned {shape}")


@pytest.mark.gpu
def test_kernel_writes_into_out_and_is_capturable() -> None:
    """`out=` reuses a buffer, and on CUDA a decode step replays from a CUDA graph."""
    device = kernel_device()
    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

    x, bank, index, expert_id = random_op(4, 1, 2, 4, 96, 64, device=device)
    out = torch.empty(4, 1, 96, device=device)
    y = channel_gather_matmul(x, bank, index, expert_id, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, reference(x, bank, index, expert_id), rtol=1e-4, atol=1e-4)
    if device != "cuda":
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        channel_gather_matmul(x, bank, index, expert_id, out=out)
    x.copy_(torch.randn_like(x))
    expert_id.copy_(torch.tensor([3, 2, 1, 0], device=device))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, reference(x, bank, index, expert_id), rtol=1e-4, atol=1e-4)


# (batch, seq, groups K, experts N, out, in, experts of the batch): odd out, tiles past S and
# past `in`; in=40/48 lets 16-bit and fp32 x go through the TMA, in=33 falls back to pointer
# loads; seq=150 makes 10 row tiles of 16 under the interpreter, two GROUP_M groups, one partial
PERSISTENT_SMALL = [(2, 17, 3, 5, 70, 40, (4, 1)), (3, 20, 2, 4, 45, 33, (0, 3, 1)),
                    (1, 40, 1, 1, 19, 24, (0,)), (2, 18, 4, 4, 33, 48, (2, 3)),
                    (2, 150, 2, 3, 20, 24, (2, 0))]
PERSISTENT_LARGE = [(2, 300, 2, 4, 1031, 520, (1, 3)), (3, 130, 4, 4, 257, 4099, (3, 0, 2)),
                    (1, 2048, 1, 1, 512, 1024, (0,))]
PERSISTENT = ["persistent", "persistent_tma", "persistent_flat", "persistent_tma_flat"]
# every variant in bf16; fp16 and fp32 through one (each variant and dtype compiles anew on CUDA)
PERSISTENT_CASES = [(v, d) for v in PERSISTENT for d in DTYPES
                    if d == torch.bfloat16 or v == "persistent_tma"]


def persistent_op(shape: tuple[Any, ...], dtype: Any, device: str) -> tuple[Any, ...]:
    """random_op with the batch's experts fixed, so entries differ in expert."""
    batch, seq, groups, experts, n_out, n_in, ids = shape
    x, bank, index, _ = random_op(batch, seq, groups, experts, n_out, n_in, dtype=dtype,
                                  device=device)
    return x, bank, index, torch.tensor(ids, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize(("variant", "dtype"), PERSISTENT_CASES, ids=str)
@pytest.mark.parametrize("shape", PERSISTENT_SMALL + PERSISTENT_LARGE, ids=str)
def test_persistent_prefill_matches_reference(shape: tuple[Any, ...], variant: Variant,
                                              dtype: Any) -> None:
    """The persistent prefill variants equal the reference (in=33 also checks the pointer-load
    fallback of the TMA variant in every dtype). Under the interpreter: small tiles (several per
    program, rows of one entry's last tile spilling into the next entry's), and only the flag
    that changes semantics (X_TMA: the interpreter ignores loop flattening)."""
    device = kernel_device()
    if device == "cpu" and (shape in PERSISTENT_LARGE or variant.endswith("_flat")):
        pytest.skip("large shapes and loop flattening are checked on CUDA only")
    from chmc.plugins.channel_gather_matmul.kernels import Launch, channel_gather_matmul, x_tma_ok

    x, bank, index, expert_id = persistent_op(shape, dtype, device)
    if "tma" in variant:  # the TMA path is taken exactly where its alignment rules allow
        assert x_tma_ok(x) == (shape[5] * x.element_size() % 16 == 0)
    launch = Launch(16, 16, 16, 4, 2) if device == "cpu" else None
    y = channel_gather_matmul(x, bank, index, expert_id, mode="prefill", variant=variant,
                              tuned=False, launch=launch)
    assert y.shape == (shape[0], shape[1], shape[4]) and y.dtype == dtype
    assert_close_to_reference(y, x, bank, index, expert_id, f"{variant} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["persistent", "persistent_tma"])
def test_persistent_candidates_and_capture(variant: Variant) -> None:
    """Every prefill candidate launch is right with the persistent kernel; on CUDA it also
    autotunes, and replays from a CUDA graph (the TMA descriptors' scratch is allocated during
    capture) with new x and experts."""
    device = kernel_device()
    if device == "cuda" and variant == "persistent":  # 11 more compiles for the GPU session
        pytest.skip("on CUDA the TMA variant's launches are checked; the benchmark checks the rest")
    from chmc.plugins.channel_gather_matmul.kernels import CANDIDATES, channel_gather_matmul

    shape = (2, 17, 3, 5, 70, 40, (4, 1))
    x, bank, index, expert_id = persistent_op(shape, torch.bfloat16, device)
    for launch in CANDIDATES["prefill"]:
        y = channel_gather_matmul(x, bank, index, expert_id, mode="prefill", variant=variant,
                                  launch=launch)
        assert_close_to_reference(y, x, bank, index, expert_id, f"{variant} {launch}")
    if device != "cuda":
        return
    x, bank, index, expert_id = persistent_op((2, 300, 2, 4, 1031, 520, (1, 3)),
                                              torch.bfloat16, device)
    out = channel_gather_matmul(x, bank, index, expert_id, mode="prefill", variant=variant)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        channel_gather_matmul(x, bank, index, expert_id, mode="prefill", variant=variant, out=out)
    x.copy_(torch.randn_like(x))
    expert_id.copy_(torch.tensor([2, 0], device=device))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out, x, bank, index, expert_id, f"{variant} graph replay")


class GatherLinear(torch.nn.Module):
    """A merged Linear served by the kernel: W_e's rows read from the bank, never materialised."""

    def __init__(self, bank: Any, index: Any, expert: int, bias: Any | None):
        super().__init__()
        self.bank, self.index, self.bias = bank, index.to(torch.int32).contiguous(), bias
        self.expert = expert

    def forward(self, x: Any) -> Any:  # [B, S, in] -> [B, S, out]
        from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

        expert_id = torch.full((x.shape[0],), self.expert, dtype=torch.int64, device=x.device)
        y = channel_gather_matmul(x.contiguous(), self.bank, self.index, expert_id, tuned=False)
        return y if self.bias is None else y + self.bias


@pytest.mark.gpu
def test_greedy_tokens_match_cpu(random_family: tuple[Path, dict[str, Path]],
                                 tmp_path: Path) -> None:
    """A K=2 artifact served with the kernels (prefill then decode) generates the same greedy
    tokens as its CPU reconstruction, for several experts."""
    device = kernel_device()
    from chmc import build
    from chmc.formats.artifact import Artifact
    from chmc.runtime.torch_backend import reconstruct

    base, experts = random_family
    path = build(base, experts, tmp_path / "k2", groups=2, progress=False)
    artifact = Artifact(path)
    prompt = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    for expert in range(2 if device == "cpu" else len(experts)):
        cpu = reconstruct(path, expert)
        want = cpu.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        model = reconstruct(path, expert).to(device)
        swapped = 0
        for name, module in list(model.named_modules()):
            entry = artifact.manifest.tensors.get(f"{name}.weight")
            if isinstance(module, torch.nn.Linear) and entry and entry.kind == "merged":
                bank = artifact.stored(f"{name}.weight.bank").to(device)
                index = artifact.stored(f"{name}.weight.index").to(device)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr,
                        GatherLinear(bank, index, expert, module.bias))
                swapped += 1
        assert swapped >= 7 * 2, f"only {swapped} Linears were served by the kernel"
        got = model.generate(prompt.to(device), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert got.cpu().tolist() == want.tolist(), f"expert {expert}"


def test_launch_choice() -> None:
    """The dispatcher picks kernels from shapes alone, and grids cover every output element."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (python3 -m pip install --no-deps triton)")
    from chmc.plugins.channel_gather_matmul.kernels import (
        DEFAULTS,
        choose_mode,
        grid,
        mixed_block_m,
    )

    assert choose_mode(1, 1) == "decode"
    assert choose_mode(16, 1) == "mixed" and choose_mode(1, 8) == "mixed"
    assert choose_mode(1, 2048) == "prefill" and choose_mode(4, 16) == "prefill"
    assert [mixed_block_m(m) for m in (1, 16, 17, 64, 500)] == [16, 16, 32, 64, 64]
    for batch, seq, n_out in [(1, 1, 4099), (16, 1, 11008), (3, 130, 257)]:
        for mode, launch in DEFAULTS.items():
            gx, gy, gz = grid(mode, launch, batch, seq, n_out)
            if mode == "prefill":
                assert gx * launch.block_m >= seq and gy * launch.block_n >= n_out and gz == batch
            elif mode == "mixed":
                assert gx * launch.block_n >= n_out and gy * launch.block_m >= batch * seq
            else:
                assert gx * launch.block_n >= n_out and gy == batch * seq


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_aot_kernels_compile_to_ptx(dtype: str) -> None:
    """What the TensorRT plugin embeds: each tactic's kernel compiles to sm_90 PTX with the
    (inputs, int32 scalars, output) parameter order TensorRT's AOT launch passes."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (python3 -m pip install --no-deps triton)")
    if INTERPRETING:
        pytest.skip("under TRITON_INTERPRET=1 kernels are not compilable JIT functions")
    from chmc.plugins.channel_gather_matmul.tensorrt_plugin import (
        AOT_LAUNCH,
        PORTABLE_SHARED_BYTES,
        TACTICS,
        compile_kernel,
        kernel_signature,
    )

    for mode in TACTICS.values():
        compiled = compile_kernel(mode, dtype, AOT_LAUNCH[mode], arch=90,
                                  divisible=("N_OUT", "N_IN"))
        ptx = compiled.asm["ptx"]
        assert "cp.async" in ptx, "the K loop is not pipelined"  # the divisibility hints work
        entry = re.search(rf"\.entry {compiled.metadata.name}\((.*?)\)", ptx, re.DOTALL)
        assert entry is not None, ptx[:500]
        params = re.findall(r"\.param \.(\S+)", entry.group(1))
        ours = [t for t in kernel_signature(mode, dtype).values() if t != "constexpr"]
        # Triton appends its own scratch pointers after ours; ours come first, in order
        assert ([p.startswith("u64") for p in params[:len(ours)]]
                == [t.startswith("*") for t in ours])
        assert "mma" in ptx or dtype == "float32"  # tensor cores for 16-bit inputs
        assert compiled.metadata.num_warps == AOT_LAUNCH[mode].num_warps
        assert 0 < compiled.metadata.shared <= PORTABLE_SHARED_BYTES  # no opt-in launch needed


def test_aot_launch_params_match_the_jit_launch() -> None:
    """The grid and int32 scalars the TensorRT plugin hands TensorRT are the JIT launcher's."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (python3 -m pip install --no-deps triton)")
    import triton

    from chmc.plugins.channel_gather_matmul.kernels import grid
    from chmc.plugins.channel_gather_matmul.tensorrt_plugin import (
        AOT_LAUNCH,
        TACTICS,
        launch_params,
    )

    for mode in TACTICS.values():
        for batch, seq, n_out, n_in, groups in [(1, 1, 4099, 1031, 2), (16, 1, 70, 33, 3),
                                                (3, 300, 1027, 4096, 4)]:
            got, scalars = launch_params(mode, AOT_LAUNCH[mode], batch, seq, n_out, n_in, groups,
                                         triton.cdiv)
            assert got == grid(mode, AOT_LAUNCH[mode], batch, seq, n_out)
            assert scalars == [seq, n_out, n_in] + ([groups, batch * seq] if mode == "mixed"
                                                    else [])


RAW_SHAPES = {"decode": (1, 1, 2, 4, 4099, 1031), "mixed": (16, 1, 3, 5, 1027, 4096),
              "prefill": (3, 130, 4, 4, 257, 4099)}


@pytest.mark.gpu
@pytest.mark.parametrize("regime", list(RAW_SHAPES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_aot_kernel_launched_as_tensorrt_launches_it(dtype: str, regime: str) -> None:
    """Each tactic's embedded kernel exactly as the plugin hands it to TensorRT (PTX, kernel name,
    grid, block, shared memory, our arguments then a null for each pointer Triton appends),
    loaded and launched through the CUDA driver API with raw device pointers: the result equals
    the reference."""
    if not torch.cuda.is_available() or INTERPRETING:
        pytest.skip("needs a CUDA GPU (the driver API launch)")
    cu = pytest.importorskip("cuda.bindings.driver")
    import ctypes

    import triton

    from chmc.plugins.channel_gather_matmul.tensorrt_plugin import (
        AOT_LAUNCH,
        PORTABLE_SHARED_BYTES,
        TACTICS,
        compile_kernel,
        launch_params,
    )

    def check(result: tuple[Any, ...]) -> Any:
        assert result[0] == cu.CUresult.CUDA_SUCCESS, result[0]
        return result[1] if len(result) == 2 else result[1:]

    torch_dtype = getattr(torch, dtype)
    x, bank, index, expert_id = random_op(*RAW_SHAPES[regime], dtype=torch_dtype, device="cuda")
    batch, seq, n_in = x.shape
    n_groups, n_out, _ = bank.shape
    for mode in TACTICS.values():
        launch = AOT_LAUNCH[mode]
        compiled = compile_kernel(mode, dtype, launch, max_shared=PORTABLE_SHARED_BYTES)
        ptx = compiled.asm["ptx"]
        entry = re.search(rf"\.entry {compiled.metadata.name}\((.*?)\)", ptx, re.DOTALL)
        assert entry is not None
        n_params = len(re.findall(r"\.param ", entry.group(1)))
        (gx, gy, gz), scalars = launch_params(mode, launch, batch, seq, n_out, n_in, n_groups,
                                              triton.cdiv)
        y = torch.full((batch, seq, n_out), float("nan"), dtype=torch_dtype, device="cuda")
        pointers = [t.data_ptr() for t in (x, bank, index, expert_id)]
        values = [*pointers, *scalars, y.data_ptr()]
        types = [ctypes.c_void_p] * 4 + [ctypes.c_int32] * len(scalars) + [ctypes.c_void_p]
        values += [0] * (n_params - len(values))  # Triton's scratch pointers: none needed
        types += [ctypes.c_void_p] * (n_params - len(types))
        module = check(cu.cuModuleLoadData(ptx.encode() + b"\0"))
        try:
            function = check(cu.cuModuleGetFunction(module, compiled.metadata.name.encode()))
            stream = cu.CUstream(torch.cuda.current_stream().cuda_stream)
            check((cu.cuLaunchKernel(function, gx, gy, gz, compiled.metadata.num_warps * 32, 1, 1,
                                     compiled.metadata.shared, stream,
                                     (tuple(values), tuple(types)), 0)[0], None))
            torch.cuda.synchronize()
        finally:
            check((cu.cuModuleUnload(module)[0], None))
        assert_close_to_reference(y, x, bank, index, expert_id, f"{mode} tactic, {regime}")


def test_persistent_kernel_compiles_to_tma_and_wgmma() -> None:
    """sm_90 codegen of the persistent kernel (bf16, the benchmark's 128x128x64 tile): wgmma
    tensor cores; x through the TMA (cp.async.bulk.tensor) exactly when X_TMA; W's gathered rows
    through cp.async when the loops are not flattened (flattened, Triton 3.6 stages them through
    registers, so that form is timed, not asserted)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (python3 -m pip install --no-deps triton)")
    if INTERPRETING:
        pytest.skip("under TRITON_INTERPRET=1 kernels are not compilable JIT functions")
    import triton
    from triton.backends.compiler import GPUTarget

    from chmc.plugins.channel_gather_matmul.kernels import (
        PREFILL_VARIANTS,
        _gemm_persistent_kernel,
    )
    from chmc.plugins.channel_gather_matmul.tensorrt_plugin import kernel_signature

    args = kernel_signature("prefill", "bfloat16")  # inputs, int32 scalars, y, constexprs
    names = list(args)
    names.insert(names.index("y"), "B")
    signature = {n: args.get(n, "i32") for n in names}
    for variant in ("persistent_tma", "persistent_flat"):  # TMA on/off, flattening off/on
        consts = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "F32_DOT": False, "GROUP_M": 8,
                  "NUM_SMS": 132, **PREFILL_VARIANTS[variant]}
        hinted = [n for n, t in signature.items() if t.startswith("*")] + ["N_OUT", "N_IN"]
        src = triton.compiler.ASTSource(
            fn=_gemm_persistent_kernel, signature=signature | dict.fromkeys(consts, "constexpr"),
            constexprs=consts, attrs={(names.index(n),): [["tt.divisibility", 16]] for n in hinted})
        options = {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": True}
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        assert "wgmma.mma_async" in ptx, variant
        assert ("cp.async.bulk.tensor" in ptx) == consts["X_TMA"], variant
        assert "cp.async.cg" in ptx or consts["FLATTEN"], f"{variant}: W loads not pipelined"


def test_kernels_under_interpreter() -> None:
    """On a CPU machine: run the `gpu` tests above on CPU tensors under TRITON_INTERPRET=1."""
    out = interpreter.rerun_under_interpreter(__file__, timeout=1800)
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= len(SMALL) * 4 * len(DTYPES) + 5, out[-3000:]
