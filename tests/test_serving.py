"""Step-level scheduling: requests join and leave the running batch at every decode step, in
process (chmc.runtime.scheduler on every backend whose batch can change) and through a real
tritonserver (the text model decoupled: tokens stream over HTTP generate_stream and gRPC)."""

from __future__ import annotations

import concurrent.futures
import queue
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonserver import generate, generate_stream

pytest.importorskip("onnxruntime")

NAME = "chmc"
PROMPTS = ["1+2=", "abc:", "x", "hello world|", "7>3|", "sort:dcb>"]


@pytest.fixture(scope="module")
def runner(onnx_family: dict[str, Any]) -> Any:
    from chmc import load

    return load(onnx_family["k2_onnx"])


@pytest.fixture(scope="module", params=["onnxruntime gather", "onnxruntime plugin",
                                        "torch merged"])
def any_runner(request: pytest.FixtureRequest, onnx_family: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> Any:
    from chmc import load
    from chmc.compiler.export import export

    if request.param == "torch merged":
        return load(onnx_family["k2"], backend="torch", merged=True)
    if request.param == "onnxruntime plugin":
        return load(export(onnx_family["k2"], tmp_path_factory.mktemp("plugin") / "onnx",
                           linear="plugin"))
    return load(onnx_family["k2_onnx"])


def _scheduler(runner: Any, **limits: int) -> Any:
    from chmc.runtime.scheduler import Limits, Scheduler

    return Scheduler(runner.backend, eos_ids=runner.eos_ids, pad_id=runner.pad_id,
                     limits=Limits(**limits), rope_switch=runner.info.rope_switch)


def test_greedy_tokens_do_not_depend_on_what_shares_the_batch(any_runner: Any) -> None:
    """Requests arriving one per step, at most 3 running, experts and lengths mixed: each gets
    exactly the tokens it gets alone, and the batch really held several rows at once."""
    runner = any_runner
    jobs = [(p, runner.experts[i % 3], n) for i, (p, n) in
            enumerate(zip(PROMPTS * 2, [5, 17, 9, 30, 3, 12, 1, 8, 20, 2, 11, 6]))]
    alone = [runner.generate_ids([runner.tokenizer.encode(p)], [e], max_new_tokens=n)[0]
             for p, e, n in jobs]
    sched = _scheduler(runner, slots=3)
    seqs, widths = [], []
    for p, e, n in jobs:
        seqs.append(sched.submit(runner.sequence(p, e, n)))
        sched.step()
        widths.append(len(sched.rows))
    sched.run_until_idle()
    assert [s.new for s in seqs] == alone
    assert all(s.finish in ("eos", "length") for s in seqs)
    assert max(widths) == 3 and not sched.rows and sched.state is None


def test_sampled_tokens_follow_the_request_seed_alone_or_batched(runner: Any) -> None:
    def tokens(others: int) -> list[int]:
        sched = _scheduler(runner)
        for i in range(others):
            sched.submit(runner.sequence(PROMPTS[i], runner.experts[i % 3], 12,
                                         temperature=1.0, seed=100 + i))
        seq = sched.submit(runner.sequence("abc:", "expert_1", 12, temperature=0.9, top_p=0.8,
                                           seed=7))
        sched.run_until_idle()
        return list(seq.new)

    alone = tokens(0)
    assert tokens(3) == alone == tokens(5)
    # one row alone: the same draws as `generate` with the same seed
    assert alone == runner.generate_ids([runner.tokenizer.encode("abc:")], ["expert_1"], 12,
                                        temperature=0.9, top_p=0.8, seed=7)[0]


def test_limits_queue_budget_and_cancel(runner: Any) -> None:
    from chmc.errors import ChmcError
    from chmc.runtime.scheduler import BusyError

    sched = _scheduler(runner, slots=1, tokens=64, queue=1)
    long = sched.submit(runner.sequence("abc:", "expert_0", 40))
    sched.step()
    assert sched.rows == [long]
    waiting = sched.submit(runner.sequence("1+2=", "expert_2", 4))
    with pytest.raises(BusyError, match="server busy: 1 requests are waiting"):
        sched.submit(runner.sequence("x", "expert_1", 4))
    with pytest.raises(ChmcError, match="needs 104 cache tokens .* budget of 64"):
        sched.submit(runner.sequence("abcd", "expert_1", 100))
    sched.step()
    assert sched.rows == [long] and not waiting.new  # one slot: the second waits
    long.cancel()
    sched.step()  # the cancelled row leaves and the waiting request is admitted at once
    assert long.finish == "cancelled" and sched.rows == [waiting] and len(waiting.new) == 1
    sched.run_until_idle()
    assert waiting.new == runner.generate_ids([runner.tokenizer.encode("1+2=")], ["expert_2"],
                                              4)[0]
    # the KV budget: two requests of 40 tokens do not fit in 64 together, so they run in turn
    sched = _scheduler(runner, slots=4, tokens=64)
    a, b = (sched.submit(runner.sequence(p, "expert_0", 36)) for p in ("abc:", "1+2="))
    sched.step()
    assert sched.rows == [a]
    sched.run_until_idle()
    assert len(b.new) == 36 or b.finish == "eos"


@pytest.mark.parametrize("bad, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"temperature": float("nan")}, "temperature must be >= 0, got nan"),
    ({"prompt": ""}, "a prompt encodes to no tokens"),
    ({"expert": "physics"}, "unknown expert 'physics'"),
])
def test_bad_requests_are_refused_before_they_queue(runner: Any, bad: dict[str, Any],
                                                    message: str) -> None:
    from chmc.errors import ChmcError

    args = {"prompt": "abc", "expert": "expert_0", "max_new_tokens": 4, **bad}
    with pytest.raises(ChmcError, match=message):
        runner.sequence(**args)


def test_stream_runs_on_the_shared_scheduler_and_cancels_when_left(runner: Any) -> None:
    want = runner.generate(["abc:"], ["expert_1"], max_new_tokens=12)[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streamed = list(pool.map(
            lambda _: "".join(runner.stream("abc:", "expert_1", max_new_tokens=12)), range(4)))
    assert streamed == [want] * 4
    pieces = runner.stream("hello world|", "expert_0", max_new_tokens=200)
    next(pieces)
    pieces.close()  # the caller stops reading: the request is cancelled, its slot freed
    sched = runner.loop().scheduler
    deadline = time.monotonic() + 10
    while sched.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sched.has_work()


def test_a_backend_failure_fails_its_requests_and_serving_goes_on(runner: Any) -> None:
    """A step that raises finishes every request in the batch with the error; the loop keeps
    serving the next ones."""
    from chmc.runtime.scheduler import Scheduler, Sequence, ServingLoop

    class Flaky:
        continuous = True

        def __init__(self) -> None:
            self.fail = True

        def start(self, expert_ids: np.ndarray) -> Any:
            if self.fail:
                self.fail = False
                raise RuntimeError("device lost")
            return runner.backend.start(expert_ids)

    loop = ServingLoop(Scheduler(Flaky(), eos_ids=runner.eos_ids, pad_id=runner.pad_id))
    try:
        done: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        prompt = runner.tokenizer.encode("abc:")

        def listen(s: Sequence, t: int | None) -> None:
            if t is None:
                done.put(s)

        first = loop.submit(Sequence(prompt, 0, 4, listener=listen))
        assert done.get(timeout=30) is first
        assert first.finish == "error" and "RuntimeError: device lost" in (first.error or "")
        second = loop.submit(Sequence(prompt, 0, 4, listener=listen))
        assert done.get(timeout=30) is second and second.finish in ("eos", "length")
    finally:
        loop.close()


# -- through a real tritonserver (tests/tritonserver.py) ------------------------------------------

def _repo(source: Path, out: Path, chmc_cli: Any, *args: str) -> Path:
    done = chmc_cli("triton", source, "--out", out, "--name", NAME, *args, cwd=out.parent)
    assert done.returncode == 0, done.stderr
    return out


def _server(repo: Path, env: dict[str, Any], log: Path, grpc: bool = False) -> Any:
    from chmc.runtime.serve import TritonServer, free_port

    return TritonServer(repo, port=free_port(), grpc_port=free_port() if grpc else None,
                        executable=env["executable"], models=[NAME], env=env["env"], log=log)


@pytest.fixture(scope="module")
def server(onnx_family: dict[str, Any], chmc_cli: Any, triton_env: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The default repository (continuous scheduling, a queue of 64) with 8 slots and a response
    per text piece, on a free port."""
    root = tmp_path_factory.mktemp("serving")
    repo = _repo(Path(onnx_family["k2_onnx"]), root / "repo", chmc_cli, "--slots", "8",
                 "--stream-interval-ms", "0")
    srv = _server(repo, triton_env, root / "server.log", grpc=True)
    try:
        srv.start(ready_timeout=180)
        yield srv
    finally:
        srv.stop()


def _url(srv: Any) -> str:
    return f"{srv.host}:{srv.port}"


@pytest.mark.slow
def test_config_is_decoupled_with_the_generate_inputs(server: Any) -> None:
    from chmc.compiler.triton_repo import parse_model_config

    text = parse_model_config((server.repository / NAME / "config.pbtxt").read_text())
    assert text.model_transaction_policy.decoupled and text.max_batch_size == 0
    assert [i.name for i in text.input][:3] == ["text_input", "expert", "max_tokens"]
    assert text.parameters["scheduling"].string_value == "continuous"
    assert text.parameters["backend"].string_value == "onnxruntime"


@pytest.mark.slow
def test_tokens_stream_before_the_request_ends(server: Any, runner: Any) -> None:
    prompt, expert = max(((p, e) for p in PROMPTS for e in runner.experts),
                         key=lambda pe: len(runner.generate_ids(
                             [runner.tokenizer.encode(pe[0])], [pe[1]], 48)[0]))
    want = runner.generate([prompt], [expert], max_new_tokens=48)[0]
    start = time.perf_counter()
    events = list(generate_stream(_url(server), NAME, {
        "text_input": prompt, "expert": expert, "max_tokens": 48, "stream": True}))
    assert len(events) >= 10, events
    assert "".join(e["text_output"] for _, e in events) == want
    first, last = events[0][0] - start, events[-1][0] - start
    assert first < 0.5 * last, f"first piece at {first:.3f} s, last at {last:.3f} s"
    # without `stream`, one answer with the whole text (what /generate needs)
    assert generate(_url(server), NAME, {"text_input": prompt, "expert": expert,
                                         "max_tokens": 48}) == (200, {
        "model_name": NAME, "model_version": "1", "text_output": want})
    # stop strings and sampling parameters reach the scheduler (0.5 and 0.75 are exact in the
    # FP32 inputs, so the draws match the in-process ones)
    stop = want[2:4]
    assert generate(_url(server), NAME, {"text_input": prompt, "expert": expert,
                                         "max_tokens": 48, "stop": [stop]})[1][
        "text_output"] == want[:want.index(stop)]
    sampled = runner.generate([prompt], [expert], max_new_tokens=48, temperature=0.5,
                              top_p=0.75, seed=11)[0]
    assert generate(_url(server), NAME, {"text_input": prompt, "expert": expert,
                                         "max_tokens": 48, "temperature": 0.5, "top_p": 0.75,
                                         "seed": 11})[1]["text_output"] == sampled


@pytest.mark.slow
def test_64_concurrent_streaming_clients_get_the_in_process_answers(server: Any,
                                                                    runner: Any) -> None:
    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS), rng.choice(runner.experts), rng.randint(1, 24))
            for _ in range(64)]
    want = {j: runner.generate([j[0]], [j[1]], max_new_tokens=j[2])[0] for j in set(jobs)}

    def ask(job: tuple[str, str, int]) -> str:
        body = {"text_input": job[0], "expert": job[1], "max_tokens": job[2], "stream": True}
        return "".join(e["text_output"] for _, e in generate_stream(_url(server), NAME, body))

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [want[j] for j in jobs]


@pytest.mark.slow
def test_grpc_streams_with_tritonclient(server: Any, runner: Any) -> None:
    import tritonclient.grpc as grpcclient

    want = runner.generate(["abc:"], ["expert_2"], max_new_tokens=16)[0]
    responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(NAME, _grpc_inputs("abc:", "expert_2", 16),
                                  enable_empty_final_response=True)
        text = ""
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            if not final:
                text += result.as_numpy("text_output")[0].decode()
            else:
                break
        assert text == want
    finally:
        client.stop_stream()
        client.close()


def _grpc_inputs(text: str, expert: str, max_tokens: int) -> list[Any]:
    import tritonclient.grpc as grpcclient

    arrays = {"text_input": np.array([text.encode()], dtype=object),
              "expert": np.array([expert.encode()], dtype=object),
              "max_tokens": np.array([max_tokens], dtype=np.int32),
              "stream": np.array([True])}
    inputs = []
    for name, a in arrays.items():
        kind = {"O": "BYTES", "i": "INT32", "b": "BOOL"}[a.dtype.kind]
        inputs.append(grpcclient.InferInput(name, list(a.shape), kind))
        inputs[-1].set_data_from_numpy(a)
    return inputs


@pytest.mark.slow
def test_malformed_requests_get_errors_and_serving_goes_on(server: Any, runner: Any) -> None:
    import urllib.error
    import urllib.request

    good = {"text_input": "1+2=", "expert": "expert_0", "max_tokens": 6}
    want = (200, {"model_name": NAME, "model_version": "1",
                  "text_output": runner.generate(["1+2="], ["expert_0"], max_new_tokens=6)[0]})
    bad = [
        ({**good, "expert": "nobody"}, 400, "unknown expert 'nobody'"),
        ({**good, "max_tokens": -3}, 400, "'max_tokens' must be positive, got [-3]"),
        ({**good, "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
        ({**good, "temperature": -1}, 400, "'temperature' must be >= 0"),
        ({"text_input": "1+2="}, 400, "missing input 'expert'"),
        # bad JSON types: Triton's own parser refuses them (with a 500) before the model
        ({**good, "text_input": 5}, 500, "Unable to parse JSON bytes array"),
        ({**good, "max_tokens": "many"}, 500, "non-signed-integer as signed-integer"),
    ]
    for body, status, message in bad:
        code, answer = generate(_url(server), NAME, body)
        assert code == status and message in answer.get("error", ""), (body, code, answer)
        assert generate(_url(server), NAME, good) == want
    raw = b'{"text_input": "\xff\xfe", "expert": "expert_0"}'  # not UTF-8
    request = urllib.request.Request(f"http://{_url(server)}/v2/models/{NAME}/generate", raw)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400 and b"is not valid UTF-8" in err.value.read()
    assert generate(_url(server), NAME, good) == want


def _endless(runner: Any, tokens: int = 300) -> tuple[str, str]:
    """A prompt and expert whose greedy continuation runs `tokens` tokens without an EOS (the
    tiny random model falls into a loop: such a request runs to its max_tokens)."""
    for prompt in PROMPTS:
        for expert in runner.experts:
            new = runner.generate_ids([runner.tokenizer.encode(prompt)], [expert], tokens)[0]
            if len(new) == tokens and not set(new) & set(runner.eos_ids):
                return prompt, expert
    pytest.skip(f"every prompt reaches an EOS within {tokens} tokens")


@pytest.mark.slow
def test_cancel_frees_the_slot_and_a_full_queue_answers_busy(
        onnx_family: dict[str, Any], chmc_cli: Any, triton_env: dict[str, Any],
        tmp_path: Path, runner: Any) -> None:
    """One slot, a queue of one: a long request cancelled midway (gRPC stream closed with
    cancel_requests) lets the next request in at once; with the slot and the queue full, a
    third request is answered 'server busy' at once."""
    import tritonclient.grpc as grpcclient

    repo = _repo(Path(onnx_family["k2_onnx"]), tmp_path / "repo", chmc_cli, "--slots", "1",
                 "--queue", "1")
    srv = _server(repo, triton_env, tmp_path / "server.log", grpc=True)
    try:
        srv.start(ready_timeout=180)
        address = f"{srv.host}:{srv.grpc_port}"
        first: queue.SimpleQueue[Any] = queue.SimpleQueue()
        client = grpcclient.InferenceServerClient(address)
        client.start_stream(callback=lambda result, error: first.put((result, error)))
        endless = _endless(runner)
        client.async_stream_infer(NAME, _grpc_inputs(*endless, 4000))
        for _ in range(3):  # it is running
            result, error = first.get(timeout=60)
            assert error is None, error
        client.stop_stream(cancel_requests=True)
        client.close()
        start = time.perf_counter()
        code, answer = generate(_url(srv), NAME, {"text_input": "abc:", "expert": "expert_0",
                                                  "max_tokens": 4})
        waited = time.perf_counter() - start
        assert code == 200, answer
        assert waited < 5, f"the next request waited {waited:.1f} s: the cancelled slot was kept"

        second: queue.SimpleQueue[Any] = queue.SimpleQueue()
        client = grpcclient.InferenceServerClient(address)
        client.start_stream(callback=lambda result, error: second.put((result, error)))
        client.async_stream_infer(NAME, _grpc_inputs(*endless, 4000), request_id="running")
        result, error = second.get(timeout=60)
        assert error is None and result.get_response().id == "running", error
        client.async_stream_infer(NAME, _grpc_inputs(*endless, 4000), request_id="waiting")
        time.sleep(0.5)
        heard = []
        while not second.empty():
            result, error = second.get()
            heard.append(error or result.get_response().id)
        assert set(heard) == {"running"}, heard  # the other is neither refused nor started
        start = time.perf_counter()
        code, answer = generate(_url(srv), NAME, {"text_input": "abc:", "expert": "expert_0",
                                                  "max_tokens": 4})
        # Triton 2.51's generate endpoint answers 400 for a model's errors whatever their code
        assert code == 400 and "server busy" in answer["error"], (code, answer)
        assert time.perf_counter() - start < 5
        client.stop_stream(cancel_requests=True)
        client.close()
    finally:
        srv.stop()


@pytest.mark.slow
def test_torch_backend_repository_serves_the_artifact(
        onnx_family: dict[str, Any], chmc_cli: Any, triton_env: dict[str, Any],
        tmp_path: Path, runner: Any) -> None:
    """`--backend torch` links the artifact into the text model and serves it with the merged
    torch model (on CPU here, with torch from this Python put on the stub's path); without torch
    in the stub's environment the model fails at load with one line."""
    import site

    from chmc.compiler.triton_repo import parse_model_config
    from chmc.errors import ChmcError

    artifact = Path(onnx_family["k2"])
    repo = _repo(artifact, tmp_path / "repo", chmc_cli, "--backend", "torch", "--device", "cpu")
    text = parse_model_config((repo / NAME / "config.pbtxt").read_text())
    assert text.parameters["backend"].string_value == "torch"
    assert not (repo / f"{NAME}_engine").exists()
    for f in artifact.glob("*.safetensors"):  # linked, not copied
        assert (repo / NAME / "1" / "artifact" / f.name).stat().st_ino == f.stat().st_ino

    srv = _server(repo, triton_env, tmp_path / "bare.log")
    with pytest.raises(ChmcError, match="exited with status"):
        srv.start(ready_timeout=180)
    lines = [line for line in (tmp_path / "bare.log").read_text().splitlines()
             if "chmc: the torch backend needs torch" in line]
    assert lines, "no one-line reason in the server log"

    import torch
    import transformers

    # where this Python finds them: a venv's own site-packages may not hold them (system-site)
    found = [str(Path(m.__file__ or "").parents[1]) for m in (torch, transformers)]
    stub_path = ":".join([triton_env["env"]["CHMC_STUB_PATH"],
                          *dict.fromkeys(found + site.getsitepackages())])
    env = {**triton_env, "env": {**triton_env["env"], "CHMC_STUB_PATH": stub_path}}
    srv = _server(repo, env, tmp_path / "torch.log")
    try:
        srv.start(ready_timeout=180)
        for expert in runner.experts:
            want = runner.generate(["abc:"], [expert], max_new_tokens=8)[0]
            assert generate(_url(srv), NAME, {"text_input": "abc:", "expert": expert,
                                              "max_tokens": 8}) == (200, {
                "model_name": NAME, "model_version": "1", "text_output": want})
    finally:
        srv.stop()
