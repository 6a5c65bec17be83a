"""The runtime: greedy generation equals transformers, mixed-expert batches equal single rows,
and the ONNX Runtime path runs without torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

PROMPTS = ["1+2=", "abc:", "x", "hello world|"]


@pytest.fixture(scope="module")
def runner(onnx_family):
    from chmc import load

    return load(onnx_family["k2_onnx"])


def test_greedy_generation_is_token_identical_to_transformers(onnx_family, runner):
    from chmc.models.tiny.tokenizer import encode
    from chmc.runtime.torch_backend import reconstruct

    assert runner.experts == ["expert_0", "expert_1", "expert_2"]
    for n, name in enumerate(runner.experts):
        model = reconstruct(onnx_family["k2"], n)
        for prompt in PROMPTS:
            ids = torch.tensor([encode(prompt)])
            with torch.no_grad():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                     do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
            got = runner.generate_ids([encode(prompt)], [name], max_new_tokens=10)[0]
            assert got == ref, (name, prompt)


def test_mixed_expert_batch_equals_rows_alone(runner):
    """Left-padded rows of different lengths and experts in one call == each row on its own."""
    from chmc.models.tiny.tokenizer import encode

    prompts = [encode(p) for p in PROMPTS]
    experts = ["expert_2", 0, "expert_1", "expert_0"]
    batched = runner.generate_ids(prompts, experts, max_new_tokens=8)
    alone = [runner.generate_ids([p], [e], max_new_tokens=8)[0] for p, e in zip(prompts, experts)]
    assert batched == alone
    texts = runner.generate(PROMPTS, experts, max_new_tokens=8)
    assert texts == [runner.generate([p], [e], max_new_tokens=8)[0]
                     for p, e in zip(PROMPTS, experts)]


def test_torch_backend_generates_the_same_tokens(onnx_family, runner):
    from chmc import load
    from chmc.models.tiny.tokenizer import encode

    torch_runner = load(onnx_family["k2"], backend="torch")
    prompts = [encode(p) for p in PROMPTS[:3]]
    experts = ["expert_1", "expert_0", "expert_1"]
    assert torch_runner.generate_ids(prompts, experts, max_new_tokens=6) == \
        runner.generate_ids(prompts, experts, max_new_tokens=6)


def test_stream_sampling_and_stop(runner):
    streamed = "".join(runner.stream("abc:", "expert_1", max_new_tokens=12))
    assert streamed == runner.generate(["abc:"], ["expert_1"], max_new_tokens=12)[0]
    a = runner.generate(["abc:"] * 2, [0, 0], max_new_tokens=12, temperature=1.0, seed=7)
    b = runner.generate(["abc:"] * 2, [0, 0], max_new_tokens=12, temperature=1.0, seed=7)
    assert a == b
    assert a != runner.generate(["abc:"] * 2, [0, 0], max_new_tokens=12, temperature=1.0, seed=8)
    full = runner.generate(["1+2="], [2], max_new_tokens=12)[0]
    if len(full) >= 3:  # cut at the first occurrence of a stop string taken from the output
        stop = full[1:3]
        assert runner.generate(["1+2="], [2], max_new_tokens=12, stop=[stop])[0] == \
            full[:full.index(stop)]


def test_bad_experts_fail_before_compute(runner):
    from chmc.errors import ChmcError

    with pytest.raises(ChmcError, match="unknown expert 'physics'"):
        runner.generate(["a"], ["physics"])
    with pytest.raises(ChmcError, match="expert id 3 is out of range"):
        runner.generate(["a"], [3])
    with pytest.raises(ChmcError, match="2 prompts but 1 experts"):
        runner.generate(["a", "b"], ["expert_0"])
    with pytest.raises(ChmcError, match="name one per prompt"):
        runner.generate(["a"])
    assert runner.generate([], []) == []


def test_onnxruntime_path_imports_neither_torch_nor_transformers(onnx_family):
    code = textwrap.dedent(f"""
        import sys
        from chmc.runtime import load
        runner = load({str(onnx_family["k2_onnx"])!r})
        out = runner.generate(["1+2=", "ab"], ["expert_0", "expert_2"], max_new_tokens=4)
        assert len(out) == 2, out
        bad = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_cli_run_streams_and_names_bad_expert(onnx_family, runner):
    base = [sys.executable, "-m", "chmc", "run", str(onnx_family["k2_onnx"]), "abc:", "-n", "6"]
    res = subprocess.run([*base, "--expert", "expert_1"], check=False, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == runner.generate(["abc:"], ["expert_1"], max_new_tokens=6)[0] + "\n"
    res = subprocess.run([*base, "--expert", "nope"], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        ("chmc: error: unknown expert 'nope': this artifact has "
         "['expert_0', 'expert_1', 'expert_2']")]


def test_left_pad_and_positions():
    from chmc.runtime.generation import left_pad, positions

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert np.asarray(positions(mask)).dtype == np.int64


def test_cli_check_passes_per_expert(onnx_family):
    res = subprocess.run([sys.executable, "-m", "chmc", "check", str(onnx_family["k2_onnx"])],
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("expert_0", "expert_1", "expert_2"):
        assert any(name in line and "pass" in line for line in res.stdout.splitlines()), res.stdout


def test_load_artifact_exports_once_into_cache(onnx_family, runner, tmp_path, monkeypatch):
    from chmc import load

    monkeypatch.setenv("CHMC_CACHE", str(tmp_path))
    first = load(onnx_family["k2"])
    cached = list((tmp_path / "onnx").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.onnx").is_file()
    mtime = (cached[0] / "model.onnx.data").stat().st_mtime_ns
    load(onnx_family["k2"])  # reused, not exported again
    assert (cached[0] / "model.onnx.data").stat().st_mtime_ns == mtime
    assert first.generate(["ab"], [1], max_new_tokens=5) == \
        runner.generate(["ab"], [1], max_new_tokens=5)


@pytest.mark.parametrize("compiler", ["machine's", "failing"])
def test_load_artifact_picks_the_native_plugin_form_when_it_builds(onnx_family, runner, compiler,
                                                                   tmp_path, monkeypatch):
    """`load(artifact)` exports the plugin form (native CPU kernel, about dense speed) when the
    kernel compiles, and the portable gather form when it cannot; both generate the same tokens."""
    import json
    import shutil

    from chmc import load

    if compiler == "machine's" and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CHMC_CACHE", str(tmp_path))  # empty: no kernel built before
    if compiler == "failing":
        monkeypatch.setenv("CC", "false")
    loaded = load(onnx_family["k2"])
    (export,) = (tmp_path / "onnx").iterdir()
    form = json.loads((export / "chmc.json").read_text())["export"]["linear"]
    assert form == ("plugin" if compiler == "machine's" else "gather")
    prompts, experts = ["ab", "12+3=", "xyz"], [1, 0, 2]
    assert loaded.generate(prompts, experts, max_new_tokens=6) == \
        runner.generate(prompts, experts, max_new_tokens=6)
