"""runtime.decode_attention: the split-KV decode kernel equals softmax attention over the filled,
unpadded (windowed) slots, and the merged decoder gives the same logits with it as with SDPA.

Marked `gpu`: on CUDA, or on the CPU under Triton's interpreter, which must be chosen before
triton is imported, so on a CPU machine `test_decode_attention_under_interpreter` re-runs them
in a child pytest with TRITON_INTERPRET=1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import interpreter
import numpy as np
import pytest

torch = pytest.importorskip("torch")

INTERPRETING, HAS_TRITON = interpreter.INTERPRETING, interpreter.HAS_TRITON
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max |out|


def kernel_device() -> str:
    return interpreter.kernel_device("test_decode_attention_under_interpreter")


def reference(q: Any, k: Any, v: Any, mask: Any, slot: int, scale: float,
              window: int) -> Any:
    """float64 softmax(q k^T * scale) v over slots t <= slot with mask[b, t] set and, with a
    window, t > slot - window."""
    t = torch.arange(k.shape[2])
    allowed = mask.bool() & (t <= slot)[None, :]
    if window:
        allowed &= (t > slot - window)[None, :]
    scores = torch.einsum("bgrd,bgtd->bgrt", q.double(), k.double()) * scale
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.einsum("bgrt,bgtd->bgrd", scores.softmax(-1), v.double())


# (batch, kv heads G, heads per kv head R, head dim, capacity, filled, window)
CASES = [(3, 2, 4, 8, 320, 300, 0),  # two splits, both used; hd < 16 (padded)
         (2, 1, 3, 64, 320, 200, 0),  # the second split empty; R not a power of two
         (2, 2, 2, 32, 600, 530, 40),  # a window: most splits skipped
         (1, 4, 8, 16, 64, 1, 0)]  # one filled slot


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_attention_equals_the_reference(case: tuple[int, ...], dtype: Any) -> None:
    device = kernel_device()
    from chmc.runtime.decode_attention import decode_attention

    batch, groups, r, hd, cap, filled, window = case
    g = torch.Generator().manual_seed(sum(case))
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in
               ((batch, groups, r, hd), (batch, groups, cap, hd), (batch, groups, cap, hd)))
    k[:, :, filled:] = float("nan")  # slots past the filled ones are never read
    v[:, :, filled:] = float("nan")
    mask = torch.zeros(batch, cap, dtype=torch.int64)
    mask[:, :filled] = 1
    mask[0, : min(7, filled - 1)] = 0  # row 0 left-padded
    slot = torch.tensor([filled - 1])
    scale = hd ** -0.5
    on = [t.to(device) for t in (q, k, v, mask, slot)]
    got = decode_attention(on[0], on[1], on[2], on[3], on[4], scale, window)
    want = reference(q, k[:, :, :filled], v[:, :, :filled], mask[:, :filled], filled - 1,
                     scale, window)
    err = (got.cpu().double() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], f"relative error {err:.2g}"


@pytest.mark.gpu
def test_merged_decoder_with_the_kernel_equals_sdpa(tmp_path: Path) -> None:
    """A mistral family (sliding window 8) merged at K=2: 70 decode steps of a mixed, left-padded
    batch with the kernel, eager and in an Inductor-compiled step, give SDPA's logits (fp32,
    1e-5 of max |logit|), past cache capacity 64 and 128."""
    device = kernel_device()
    from chmc import build
    from chmc.formats.artifact import Artifact
    from chmc.models.tiny.random_family import make_random_family
    from chmc.runtime.decode_attention import decode_attention_op
    from chmc.runtime.generation import left_pad, positions
    from chmc.runtime.torch_merged import MergedDecoder, MergedState

    base, experts = make_random_family(tmp_path / "family", n_experts=3, arch="mistral",
                                       sliding_window=8)
    artifact = Artifact(build(base, experts, tmp_path / "k2", groups=2, progress=False))
    kernel, compiled, sdpa = (MergedDecoder.from_artifact(artifact, device=device, compile=c)
                              for c in (None, "inductor", None))
    kernel.decode_attention = compiled.decode_attention = decode_attention_op()
    sdpa.decode_attention = None
    prompts = [[5, 6, 7, 8, 9], [3, 4], [t % 50 + 10 for t in range(60)]]
    ids, mask = left_pad(prompts, 0)
    pos = positions(mask)
    states = [MergedState(d, np.array([2, 0, 1]), lambda e, *_: e)
              for d in (kernel, compiled, sdpa)]
    for step in range(70):
        *got, want = (state.step(ids, mask, pos) for state in states)
        for name, logits in zip(("eager", "compiled"), got):
            err = np.abs(logits - want).max() / np.abs(want).max()
            assert err < 1e-5, f"{name}, step {step}: relative error {err:.2g}"
        ids = want.argmax(-1)[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=1)
    assert states[0].capacity == 256 and compiled.compiled is not None


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype: str) -> None:
    """Both kernels compile to sm_90 PTX (the interpreter runs Python, so it misses what only the
    compiler rejects), bf16 with tensor-core mma."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (python3 -m pip install --no-deps triton)")
    if INTERPRETING:
        pytest.skip("under TRITON_INTERPRET=1 kernels are not compilable JIT functions")
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    from chmc.runtime.decode_attention import BLOCK_T, CHUNK, _combine_kernel, _split_kernel

    pointers = {"q": dtype, "k": dtype, "v": dtype, "out": dtype, "mask": "i64", "slot": "i64",
                "part_acc": "fp32", "part_ml": "fp32"}
    for kernel, consts in ((_split_kernel, {"CHUNK": CHUNK, "BLOCK_T": BLOCK_T,
                                            "F32_DOT": dtype == "fp32"}), (_combine_kernel, {})):
        consts = {"R_PAD": 16, "HD_PAD": 128, **consts}
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {n: "constexpr" if n in consts else f"*{pointers[n]}" if n in pointers
                     else "fp32" if n == "scale" else "i32" for n in names}
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4}).asm["ptx"]
        assert ".entry" in ptx
        if kernel is _split_kernel and dtype == "bf16":
            assert "mma.sync" in ptx


def test_decode_attention_under_interpreter() -> None:
    """On a CPU machine: run the `gpu` tests above on CPU tensors under TRITON_INTERPRET=1."""
    out = interpreter.rerun_under_interpreter(__file__, timeout=1200)
    assert f"{len(CASES) * 2 + 1} passed" in out, out[-3000:]
