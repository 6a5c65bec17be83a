"""The merged torch path (one model reading the banks, experts per row) equals the ONNX graph and
the per-expert reconstruction; on CUDA it runs the Triton kernels with a CUDA-graph decode step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

# left-padded, mixed experts; the long prompt plus new tokens outgrows the first cache block (64)
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [t % 50 + 10 for t in range(60)]]  # vocab 64
EQUAL = [[t % 50 + 10 + r for t in range(12)] for r in range(3)]  # no padding


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def artifact(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """K=2 of 3 random experts: llama (tied embeddings), mistral (sliding window 8, shorter than
    the prompts), qwen2 (q/k/v biases)."""
    from chmc import build
    from chmc.models.tiny.random_family import make_random_family
    from chmc.models.tiny.tokenizer import save_tokenizer

    arch = request.param
    extra: dict[str, Any] = {"sliding_window": 8} if arch == "mistral" else {}
    root = tmp_path_factory.mktemp(f"merged_{arch}")
    base, experts = make_random_family(root / "family", n_experts=3, arch=arch, **extra)
    save_tokenizer(base)
    return build(base, experts, root / "k2", groups=2, progress=False)


@pytest.mark.parametrize("prompts", [PROMPTS, EQUAL], ids=["padded", "equal"])
def test_merged_logits_equal_the_onnx_graph(artifact: Path, prompts: list[list[int]]) -> None:
    """Prefill and 12 decode steps: last-position logits within 1e-4 of max |logit| (fp32). The
    torch path's attention is SDPA: under the mask (padded prompts, or mistral's window shorter
    than the prompt), or plain causal where the prefill has neither; the graph composes it."""
    from chmc import load
    from chmc.runtime.generation import left_pad, positions

    merged = load(artifact, backend="torch", merged=True).backend
    graph = load(artifact).backend
    ids, mask = left_pad(prompts, 0)
    pos = positions(mask)
    experts = np.array([0, 1, 2])
    a, b = merged.start(experts), graph.start(experts)
    for step in range(12):
        la, lb = a.step(ids, mask, pos), b.step(ids, mask, pos)
        err = np.abs(la - lb).max() / np.abs(lb).max()
        assert err < 1e-4, f"step {step}: relative error {err:.2g}"
        ids = lb.argmax(-1)[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)


def test_compiled_decode_equals_the_eager_one(artifact: Path) -> None:
    """compile="inductor": decode steps through torch.compile (the gather-matmul one opaque op,
    the rest fused by Inductor's C++ on CPU) give the eager step's logits within 1e-5 of max
    |logit|, for a mixed batch past three cache capacities (64, 128, 256: one recompile, then the
    capacity is a symbolic dim); the compiled step really ran."""
    from torch._dynamo.utils import counters

    from chmc import load
    from chmc.runtime.generation import left_pad, positions

    torch._dynamo.reset()
    counters.clear()
    eager = load(artifact, backend="torch", merged=True).backend
    compiled = load(artifact, backend="torch", merged=True, compile="inductor").backend
    ids, mask = left_pad(PROMPTS, 0)
    pos = positions(mask)
    experts = np.array([2, 0, 1])
    a, b = eager.start(experts), compiled.start(experts)
    for step in range(72):  # the 60-token prompt outgrows 64 slots, then 128
        la, lb = a.step(ids, mask, pos), b.step(ids, mask, pos)
        err = np.abs(la - lb).max() / np.abs(la).max()
        assert err < 1e-5, f"step {step}: relative error {err:.2g}"
        ids = la.argmax(-1)[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(PROMPTS), 1), dtype=np.int64)], axis=1)
    assert b.capacity == 256
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_compiled_scheduler_gives_the_eager_tokens(artifact: Path) -> None:
    """Continuous batching over the compiled step: 8 requests through 3 slots join and leave
    the running batch (batch 1, 2 and 3, capacities 64 and 128: at least three graphs, the batch
    and capacity made symbolic), with the tokens of the op-by-op step."""
    from torch._dynamo.utils import counters

    from chmc import load
    from chmc.runtime.scheduler import Limits, Scheduler

    if "llama" not in artifact.parent.name:  # one architecture: each shape compiles for seconds
        pytest.skip("run for llama only")
    prompts = ["abc", "hello world", "x" * 30, "the quick", "zz", "q" * 70, "ab", "lorem ipsum"]

    def serve(compile_: str | None) -> list[list[int]]:
        runner = load(artifact, backend="torch", merged=True, compile=compile_)
        sched = Scheduler(runner.backend, eos_ids=runner.eos_ids, pad_id=runner.pad_id,
                          limits=Limits(slots=3))
        seqs = []
        for i, prompt in enumerate(prompts):
            seqs.append(sched.submit(runner.sequence(prompt, i % 3, 40)))
            sched.step()
        sched.run_until_idle()
        return [s.new for s in seqs]

    torch._dynamo.reset()
    counters.clear()
    assert serve("inductor") == serve(None)
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])


def test_cli_run_compiled(artifact: Path, chmc_cli: Any, tmp_path: Path) -> None:
    """`chmc run --backend torch --compile inductor` serves the merged model (on CPU too) and
    streams ONNX Runtime's greedy text; compile with merged=False is a one-line error."""
    from chmc import load
    from chmc.errors import ChmcError

    with pytest.raises(ChmcError, match="compiles the merged model's decode step"):
        load(artifact, backend="torch", merged=False, compile="inductor")
    if "llama" not in artifact.parent.name:  # one architecture: each run compiles for seconds
        return
    args = ("run", artifact, "abc", "--expert", "expert_1", "-n", "4")
    want = chmc_cli(*args, cwd=tmp_path)
    got = chmc_cli(*args, "--backend", "torch", "--compile", "inductor", cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout == want.stdout and want.returncode == 0


def test_merged_generates_what_each_expert_generates(artifact: Path) -> None:
    """Greedy tokens of a mixed batch, past the first cache block, equal the reconstructed
    experts'."""
    from chmc import load

    experts = [2, 0, 1]
    want = load(artifact, backend="torch", merged=False).generate_ids(PROMPTS, experts, 20)
    got = load(artifact, backend="torch", merged=True).generate_ids(PROMPTS, experts, 20)
    assert got == want


def test_projections_sharing_an_input_are_fused(artifact: Path, tmp_path: Path) -> None:
    """q/k/v and gate/up are one bank each per layer (fewer kernel launches per step), biases
    included (qwen2), with the logits of the unfused model; a budget build whose parts got
    different K keeps those apart."""
    from chmc.formats.artifact import Artifact
    from chmc.runtime.torch_merged import MergedDecoder, MergedState, fuse_projections

    def decoder(source: Path, fuse: bool) -> MergedDecoder:
        return MergedDecoder.from_artifact(Artifact(source), fuse=fuse)

    fused, plain = decoder(artifact, True), decoder(artifact, False)
    layer = "model.layers.0"
    assert f"{layer}.self_attn.qkv_proj.weight" in fused.banks
    assert f"{layer}.mlp.gate_up_proj.weight" in fused.banks
    assert f"{layer}.self_attn.q_proj.weight" not in fused.banks
    assert len(fused.banks) == len(plain.banks) - 3 * fused.cfg.layers
    assert (f"{layer}.self_attn.qkv_proj.bias" in fused.vectors) == \
        (f"{layer}.self_attn.q_proj.bias" in plain.vectors)
    from chmc.runtime.generation import left_pad, positions

    ids, mask = left_pad(PROMPTS, 0)
    experts = np.array([0, 1, 2])
    a = MergedState(fused, experts, lambda e, *_: e).step(ids, mask, positions(mask))
    b = MergedState(plain, experts, lambda e, *_: e).step(ids, mask, positions(mask))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())

    # layer 1's k_proj with one group (as a budget may leave it): q/k/v stay apart everywhere
    banks, vectors = dict(plain.banks), dict(plain.vectors)
    bank, index = banks["model.layers.1.self_attn.k_proj.weight"]
    banks["model.layers.1.self_attn.k_proj.weight"] = (bank[:1], torch.zeros_like(index))
    spec = fuse_projections(plain.spec, plain.cfg.layers, banks, vectors)
    assert "qkv" not in spec.attention and "gate_up" in spec.mlp
    assert f"{layer}.self_attn.q_proj.weight" in banks
    assert f"{layer}.mlp.gate_up_proj.weight" in banks


def test_merged_needs_an_artifact(random_family: tuple[Path, dict[str, Path]]) -> None:
    from chmc import load
    from chmc.errors import ChmcError

    base, _ = random_family
    with pytest.raises(ChmcError, match="merged=True serves a chmc artifact"):
        load(base, backend="torch", merged=True)


def test_cli_run_device_errors_are_one_line(artifact: Path, chmc_cli: Any, tmp_path: Path) -> None:
    """--device belongs to the torch backend; a CUDA device torch cannot see is named."""
    res = chmc_cli("run", artifact, "abc", "--expert", "expert_0", "--device", "cuda", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "chmc: error: --device is an option of --backend torch, not onnxruntime"]
    res = chmc_cli("run", artifact, "abc", "--compile", "inductor", cwd=tmp_path)
    assert res.stderr.strip().splitlines() == [
        "chmc: error: --compile is an option of --backend torch, not onnxruntime"]
    if torch.cuda.is_available():
        return
    res = chmc_cli("run", artifact, "abc", "--expert", "expert_0", "--backend", "torch",
                   "--device", "cuda", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        (f"chmc: error: --device cuda: torch sees no CUDA device here (torch {torch.__version__}); "
         "use --device cpu")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (Triton kernels, CUDA graphs)")
@pytest.mark.parametrize("compile_", [None, "inductor"])
def test_cuda_generates_the_cpu_runtimes_tokens(distinct_family: Any, tmp_path: Path,
                                                compile_: str | None) -> None:
    """The tiny `distinct` family merged at K=2: the torch backend on CUDA (Triton kernels, decode
    steps replayed from a CUDA graph, compiled by Inductor or op by op) generates the same greedy
    tokens as the CPU runtime (ONNX Runtime), for a batch mixing all four experts."""
    from chmc import build, load
    from chmc.jsonl import read_jsonl

    artifact = build(distinct_family.base, distinct_family.experts, tmp_path / "k2", groups=2,
                     progress=False)
    prompts, experts = [], []
    for task, splits in distinct_family.tasks.items():
        rows = read_jsonl(splits["eval"], "eval prompts")[:8]
        prompts += [r["prompt"] for _, r in rows]
        experts += [task] * len(rows)
    cpu = load(artifact).generate(prompts, experts, max_new_tokens=12)
    cuda = load(artifact, backend="torch", device="cuda", compile=compile_)
    assert cuda.generate(prompts, experts, max_new_tokens=12) == cpu
    assert cuda.backend.decoder.replays >= 10, "decode steps did not replay the CUDA graph"
    # Per decode step (chmc.runtime.scheduler): requests joining and leaving the running batch
    # regroup the static cache and recapture the graph; each gets the CPU runtime's tokens.
    from chmc.runtime.scheduler import Limits, Scheduler

    sched = Scheduler(cuda.backend, eos_ids=cuda.eos_ids, pad_id=cuda.pad_id,
                      limits=Limits(slots=5))
    seqs = []
    for prompt, expert in zip(prompts, experts):
        seqs.append(sched.submit(cuda.sequence(prompt, expert, 12)))
        sched.step()
    sched.run_until_idle()
    texts = [cuda.generate([p], [e], max_new_tokens=12)[0] for p, e in zip(prompts, experts)]
    assert [cuda.tokenizer.decode([t for t in s.new if t not in cuda.eos_ids]) for s in seqs] \
        == texts == cpu
