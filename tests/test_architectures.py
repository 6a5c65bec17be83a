"""Every supported architecture on every path: the three ONNX forms and the merged torch backend
equal transformers (the original experts, K = N) prefill and step by step, greedy generation of a
left-padded mixed batch equals transformers' generate row by row, and `chmc check` passes.

Each case is a tiny random family whose config switches on what the family does differently
(models/tiny/random_family.FEATURES plus the overrides below): RoPE scalings, q/k norms, Gemma's
norms, soft-caps and sliding layers, Phi's fused projections, partial rotary and longrope.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
from architectures import CASES
from graphs import run_with_cache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

ATOL = 1e-4  # float32 logits against transformers eager
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]  # cuda: Triton kernels
PREFILL, TOKENS = 6, 12  # 6 tokens at once, then 6 decode steps (past the sliding windows)
@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    """Three random experts of the case's family with the tiny tokenizer, merged at K = N."""
    from chmc import build
    from chmc.models.tiny.random_family import make_random_family
    from chmc.models.tiny.tokenizer import save_tokenizer

    arch, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(arch)
    base, experts = make_random_family(root / "family", n_experts=3, arch=arch, **overrides)
    save_tokenizer(base)
    artifact = build(base, experts, root / "kn", groups=3, progress=False)
    models = [transformers.AutoModelForCausalLM.from_pretrained(p).eval() for p in experts.values()]
    return {"root": root, "artifact": artifact, "models": models}


def _cache_name(model: Any) -> str:
    """transformers renamed past_key_values to cache (5.2x); take whichever forward() has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_steps(model: Any, ids: np.ndarray) -> np.ndarray:
    """Logits [B, TOKENS, V]: a prefill of PREFILL tokens, then one token per step with the cache,
    as a server runs it (longrope switches on the step's length, not the whole sequence's)."""
    name, t = _cache_name(model), torch.from_numpy(ids)
    with torch.no_grad():
        out = model(t[:, :PREFILL], use_cache=True)
        logits = [out.logits]
        for j in range(PREFILL, TOKENS):
            out = model(t[:, j:j + 1], use_cache=True, **{name: getattr(out, name)})
            logits.append(out.logits)
    return torch.cat(logits, 1).numpy()


def references(case: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    """Row n of `ids` through expert n's transformers model: [3, TOKENS, V]."""
    return np.concatenate([hf_steps(m, ids[n:n + 1]) for n, m in enumerate(case["models"])])


@pytest.mark.parametrize("linear", ["gather", "select", "plugin"])
def test_export_forms_equal_transformers_step_by_step(case, linear, ort_session) -> None:
    """Each row its own expert: prefill and 6 decode steps within ATOL of transformers."""
    import onnxruntime as ort

    from chmc.compiler.export import export
    from chmc.plugins.channel_gather_matmul.onnxruntime_op import register

    options = ort.SessionOptions()
    if linear == "plugin":
        register(options)
    folder = export(case["artifact"], case["root"] / linear, linear=linear)
    session = ort_session(folder / "model.onnx", options)
    ids = np.random.default_rng(0).integers(3, 64, (3, TOKENS))
    got = run_with_cache(session, ids, [0, 1, 2], PREFILL)
    np.testing.assert_allclose(got, references(case, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_merged_backend_equals_transformers_step_by_step(case, device) -> None:
    """The torch runtime reading the banks: last-position logits of the prefill and of every
    decode step, each row its own expert."""
    from chmc import load

    ids = np.random.default_rng(1).integers(3, 64, (3, TOKENS))
    runner = load(case["artifact"], backend="torch", merged=True, device=device)
    state = runner.backend.start(np.arange(3))
    mask = np.ones((3, PREFILL), np.int64)
    got = [state.step(ids[:, :PREFILL], mask, np.tile(np.arange(PREFILL), (3, 1)))]
    for j in range(PREFILL, TOKENS):
        mask = np.ones((3, j + 1), np.int64)
        got.append(state.step(ids[:, j:j + 1], mask, np.full((3, 1), j)))
    want = references(case, ids)[:, PREFILL - 1:]
    np.testing.assert_allclose(np.stack(got, 1), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_mixed_batch_equals_transformers_generate(case, device) -> None:
    """Left-padded prompts of three lengths, each row its own expert, on ONNX Runtime and on the
    merged torch backend: every row's tokens equal transformers' generate of that row alone
    (on CUDA the decode steps replay a CUDA graph)."""
    from chmc import load

    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]
    experts = [2, 0, 1]
    want = []
    for prompt, n in zip(prompts, experts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = case["models"][n].generate(ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=10, do_sample=False, pad_token_id=0)
        want.append(out[0, len(prompt):].tolist())
    ort_export = case["root"] / "gather"
    if not ort_export.exists():
        from chmc.compiler.export import export

        export(case["artifact"], ort_export)
    merged = load(case["artifact"], backend="torch", merged=True, device=device)
    for runner in (load(ort_export), merged):
        assert runner.generate_ids(prompts, experts, max_new_tokens=10) == want
    if device == "cuda":
        assert merged.backend.decoder.replays > 0, "decode steps did not replay the CUDA graph"


def test_chmc_check_passes(case) -> None:
    """`chmc check` (Polygraphy: ONNX Runtime against the rebuilt transformers experts)."""
    pytest.importorskip("polygraphy")
    from chmc.api import check

    line, _, ok = check(case["artifact"])
    assert ok, line
