"""The Triton model repository against a real tritonserver (tests/tritonserver.py provisions
it): the repository's layout and configs, `chmc serve`, and the text model with request
scheduling (the dynamic batcher's batches run to completion; test_serving.py tests the
continuous, streaming scheduling).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonserver import STUB_NUMPY_2, generate, triton_env_for

pytestmark = pytest.mark.slow

NAME = "chmc"
PROMPTS = ["1+2=", "abc", "hello world", "7>3|"]
MAX_NEW = 8

@pytest.fixture(scope="module")
def exported(onnx_family: dict[str, Any]) -> Path:
    """random_family (3 experts, tiny tokenizer) -> artifact at K=2 -> ONNX export with
    expert_id."""
    return Path(onnx_family["k2_onnx"])


@pytest.fixture(scope="module")
def repo(exported: Path, chmc_cli: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`chmc triton --scheduling request` on the export folder, through the real CLI."""
    out = tmp_path_factory.mktemp("triton_repo") / "repo"
    done = chmc_cli("triton", exported, "--out", out, "--name", NAME, "--scheduling", "request",
                    cwd=out.parent)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    return out


@pytest.fixture(scope="module")
def runner(exported: Path) -> Any:
    from chmc import load

    return load(exported, backend="onnxruntime")


@pytest.fixture(scope="module")
def expected(runner: Any) -> dict[tuple[str, str], str]:
    """Greedy answers in process, one prompt at a time: what the server must return."""
    return {(p, e): runner.generate([p], [e], max_new_tokens=MAX_NEW)[0]
            for e in runner.experts for p in PROMPTS}


@pytest.fixture(scope="module")
def server(repo: Path, triton_env: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tritonserver on a free loopback port, loading only the text model; stopped by pid."""
    from chmc.runtime.serve import TritonServer, free_port

    log = tmp_path_factory.mktemp("triton_log") / "server.log"
    srv = TritonServer(repo, port=free_port(), executable=triton_env["executable"],
                       models=[NAME], env=triton_env["env"], log=log)
    try:
        srv.start(ready_timeout=180)
        yield f"127.0.0.1:{srv.port}"
    finally:
        srv.stop()


def _client(url: str) -> Any:
    """An HTTP client; use it in `with` so its connection closes (an open one delays shutdown)."""
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url, connection_timeout=60, network_timeout=120)


def _inputs(text: str, expert: str, max_new: int | None = MAX_NEW) -> list[Any]:
    import tritonclient.http as httpclient

    arrays = {"text_input": np.array([[text.encode()]], dtype=object),
              "expert": np.array([[expert.encode()]], dtype=object)}
    if max_new is not None:
        arrays["max_tokens"] = np.array([[max_new]], dtype=np.int32)
    inputs = []
    for name, a in arrays.items():
        i = httpclient.InferInput(name, list(a.shape), "BYTES" if a.dtype == object else "INT32")
        i.set_data_from_numpy(a)
        inputs.append(i)
    return inputs


def _ask(client: Any, text: str, expert: str) -> str:
    result = client.infer(NAME, _inputs(text, expert))
    out = result.as_numpy("text_output")  # [1, 1]
    assert out.shape == (1, 1)
    return out[0, 0].decode()


def _stats(client: Any) -> tuple[int, int]:
    s = client.get_inference_statistics(NAME)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def test_generated_configs_parse_as_model_configs(exported: Path, repo: Path) -> None:
    from chmc.compiler.triton_repo import engine_config, parse_model_config
    from chmc.formats.export import read_export_manifest

    section = read_export_manifest(exported).export
    inputs, outputs = section.inputs, section.outputs
    declared = json.loads((exported / "chmc.json").read_text())["export"]
    for backend, platform in (("onnxruntime", "onnxruntime_onnx"),
                              ("tensorrt", "tensorrt_plan")):
        cfg = parse_model_config(engine_config(f"{NAME}_engine", inputs, outputs, backend))
        assert cfg.platform == platform and cfg.max_batch_size == 0
        assert [i.name for i in cfg.input] == [t["name"] for t in declared["inputs"]]
        assert [o.name for o in cfg.output] == [t["name"] for t in declared["outputs"]]
        assert "expert_id" in [i.name for i in cfg.input]
        expert_id = next(i for i in cfg.input if i.name == "expert_id")
        assert list(expert_id.dims) == [-1] and expert_id.data_type == 9  # TYPE_INT64
    written = parse_model_config((repo / f"{NAME}_engine" / "config.pbtxt").read_text())
    assert written.platform == "onnxruntime_onnx"
    assert (repo / f"{NAME}_engine" / "1" / "model.onnx").is_file()
    text = parse_model_config((repo / NAME / "config.pbtxt").read_text())
    assert text.backend == "python" and text.max_batch_size > 1
    assert text.dynamic_batching.max_queue_delay_microseconds > 0
    assert [i.name for i in text.input] == ["text_input", "expert", "max_tokens", "temperature",
                                            "top_p", "seed", "stop", "stream"]
    assert text.parameters["scheduling"].string_value == "request"
    assert not text.model_transaction_policy.decoupled
    # The text model points at the engine's graph instead of holding a second copy of the weights.
    assert not list((repo / NAME).rglob("*.onnx*"))


def test_bad_config_text_is_a_named_error() -> None:
    from chmc.compiler.triton_repo import parse_model_config
    from chmc.errors import ChmcError

    with pytest.raises(ChmcError, match="bad.pbtxt: not a valid Triton model config"):
        parse_model_config('name: "x"\nmax_batch_size: "many"\n', "bad.pbtxt")


def test_bad_triton_inputs_are_one_line_errors(exported: Path, chmc_cli: Any,
                                               tmp_path: Path) -> None:
    out = tmp_path / "r"
    cases = [
        (["triton", exported, "--out", out, "--backend", "tensorrt"],
         f"{exported}: no model.plan"),
        (["triton", tmp_path, "--out", out], f"{tmp_path}: not a chmc artifact, export or engine"),
        (["triton", exported, "--out", out, "--name", "a b"], "--name 'a b': use letters"),
        (["triton", exported, "--out", out, "--backend", "tpu"], "--backend 'tpu' is not one of"),
        (["triton", exported, "--out", out, "--backend", "torch"],
         f"{exported}: is a chmc export (ONNX) folder; expected a chmc artifact"),
        (["triton", exported, "--out", out, "--scheduling", "eager"],
         "--scheduling 'eager' is not one of"),
        (["triton", exported, "--out", out, "--slots", "0"], "--slots 0: must be >= 1"),
        (["serve", tmp_path / "missing"], "missing: no such file or directory"),
        (["serve", exported, "--tritonserver", tmp_path],
         f"--tritonserver {tmp_path}: not an exec"),
    ]
    for args, message in cases:
        done = chmc_cli(*args, cwd=tmp_path)
        assert done.returncode == 1, args
        assert done.stderr.startswith("chmc: error: ") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_trt_repository_from_an_engine_folder(exported: Path, tmp_path: Path) -> None:
    """Layout and configs only: no TensorRT here, so the plan is a placeholder the writer copies."""
    from chmc.compiler.triton_repo import parse_model_config, write_triton_repo
    from chmc.formats.engine import EngineManifest, write_engine_manifest

    engine_dir = tmp_path / "engine"  # what `chmc engine` writes: plan, engine.json, manifest...
    engine_dir.mkdir()
    for f in ("chmc.json", "tokenizer.json", "config.json"):
        shutil.copy2(exported / f, engine_dir / f)
    (engine_dir / "model.plan").write_bytes(b"placeholder: TensorRT cannot build engines here")
    write_engine_manifest(engine_dir, EngineManifest(onnx=str(exported / "model.onnx"),
                                                     tensorrt="none", profiles=[], bindings=[]))
    repo = write_triton_repo(engine_dir, tmp_path / "repo", backend="tensorrt")
    graph = parse_model_config((repo / "chmc_engine" / "config.pbtxt").read_text())
    assert graph.platform == "tensorrt_plan" and graph.max_batch_size == 0
    assert "expert_id" in [i.name for i in graph.input]
    assert (repo / "chmc_engine" / "1" / "model.plan").read_bytes().startswith(b"placeholder")
    assert not (repo / "chmc_engine" / "1" / "model.onnx").exists()
    text = parse_model_config((repo / "chmc" / "config.pbtxt").read_text())
    assert text.parameters["backend"].string_value == "tensorrt"


def test_server_answers_each_expert_like_runner(server: str, runner: Any,
                                                expected: dict[tuple[str, str], str]) -> None:
    with _client(server) as client:
        assert client.is_server_ready() and client.is_model_ready(NAME)
        assert len(runner.experts) == 3
        for expert in runner.experts:
            for prompt in PROMPTS[:2]:
                assert _ask(client, prompt, expert) == expected[(prompt, expert)], (prompt, expert)
        answers = {e: _ask(client, PROMPTS[2], e) for e in runner.experts}
        # One request may carry several rows, each with its own expert and length limit.
        rows = _inputs("", "")
        arrays = [np.array([[b"abc"], [b"1+2="]], dtype=object),  # text [2, 1]
                  np.array([[b"expert_2"], [b"expert_0"]], dtype=object),  # expert [2, 1]
                  np.array([[3], [5]], dtype=np.int32)]  # max_tokens [2, 1]
        for i, array in zip(rows, arrays):
            i.set_shape(list(array.shape))
            i.set_data_from_numpy(array)
        got = client.infer(NAME, rows).as_numpy("text_output")  # [2, 1]
        assert [g.decode() for g in got[:, 0]] == [
            runner.generate(["abc"], ["expert_2"], max_new_tokens=3)[0],
            runner.generate(["1+2="], ["expert_0"], max_new_tokens=5)[0]]
    assert len(set(answers.values())) > 1, "every expert answered alike: expert_id has no effect"


def test_concurrent_mixed_experts_are_batched(server: str, runner: Any,
                                             expected: dict[tuple[str, str], str]) -> None:
    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS), rng.choice(runner.experts)) for _ in range(64)]
    with _client(server) as client:
        before = _stats(client)

    def work(share: list[tuple[str, str]]) -> list[str]:
        with _client(server) as c:
            return [_ask(c, p, e) for p, e in share]

    shares = [jobs[i::8] for i in range(8)]  # 8 clients, 8 requests each
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, shares))
    seconds = time.perf_counter() - start
    for share, answers in zip(shares, results):
        for (p, e), got in zip(share, answers):
            assert got == expected[(p, e)], (p, e)
    with _client(server) as client:
        inferences, executions = (a - b for a, b in zip(_stats(client), before))
    print(json.dumps({"requests": 64, "clients": 8, "seconds": round(seconds, 3),
                      "requests_per_s": round(64 / seconds, 1), "executions": executions}))
    assert inferences == 64
    assert executions < inferences, (f"{executions} executions for {inferences} requests: "
                                     "no batching")


def test_bad_requests_get_errors_and_server_keeps_serving(
        server: str, runner: Any, expected: dict[tuple[str, str], str]) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    good = (PROMPTS[0], runner.experts[1])
    wrong = httpclient.InferInput("text_input", [1, 1], "INT32")
    wrong.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    bad = [
        ([wrong, *_inputs("x", runner.experts[0])[1:]],
         "data-type is 'INT32', but model 'chmc' expects 'BYTES'"),
        (_inputs("1+2=", runner.experts[0])[:1], "missing input 'expert': this model serves"),
        (_inputs("1+2=", "nobody"), "[400] unknown expert 'nobody'"),
        (_inputs("1+2=", "auto"), "expert 'auto' needs a router, and this model has none"),
        (_inputs("1+2=", runner.experts[0], max_new=0), "'max_tokens' must be positive"),
    ]
    with _client(server) as client:
        for inputs, message in bad:
            with pytest.raises(InferenceServerException) as err:
                client.infer(NAME, inputs)
            assert message in str(err.value)
            assert _ask(client, *good) == expected[good]  # the next good request is served


def _request(rows: list[tuple[bytes, bytes]], limits: list[int] | None) -> list[Any]:
    """A request of raw rows (text, expert) and optional max_tokens values."""
    import tritonclient.http as httpclient

    inputs = []
    for i, name in enumerate(("text_input", "expert")):
        a = np.array([[r[i]] for r in rows], dtype=object)
        inputs.append(httpclient.InferInput(name, list(a.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(a)
    if limits is not None:
        a = np.array([[v] for v in limits], dtype=np.int32)
        inputs.append(httpclient.InferInput("max_tokens", list(a.shape), "INT32"))
        inputs[-1].set_data_from_numpy(a)
    return inputs


@st.composite
def malformed_requests(draw: Any, experts: list[str]) -> tuple[list[Any], Any]:
    """A request the text model must refuse: a row with an unknown expert or with bytes that are
    not UTF-8, or a max_tokens below 1 (the other rows are good)."""
    good = st.tuples(st.sampled_from([p.encode() for p in PROMPTS]),
                     st.sampled_from([e.encode() for e in experts]))
    rows = draw(st.lists(good, min_size=0, max_size=3))
    defect = draw(st.sampled_from(["expert", "text utf8", "expert utf8", "limit"]))
    limits = None
    if defect == "expert":
        name = draw(st.text(min_size=1, max_size=8).filter(lambda t: t not in experts))
        rows.append((b"1+2=", name.encode()))
    elif defect.endswith("utf8"):
        junk = draw(st.binary(min_size=1, max_size=6)) + b"\xff"
        rows.append((junk, experts[0].encode()) if defect == "text utf8" else (b"1+2=", junk))
    else:
        rows.append((b"1+2=", experts[0].encode()))
        limits = [1] * (len(rows) - 1) + [draw(st.integers(min_value=-(2**31), max_value=0))]
    order = draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in order]
    if limits is not None:
        limits = [limits[i] for i in order]
    return _request(rows, limits), (rows, limits)


def test_generated_malformed_requests_are_refused_and_serving_goes_on(
        server: str, runner: Any, expected: dict[tuple[str, str], str], rejected: Any) -> None:
    from tritonclient.utils import InferenceServerException

    good = (PROMPTS[0], runner.experts[1])

    @settings(max_examples=40)
    @given(request=malformed_requests(runner.experts))
    def check(request: tuple[list[Any], Any]) -> None:
        inputs, content = request
        with _client(server) as client:
            with pytest.raises(InferenceServerException) as err:
                client.infer(NAME, inputs)
            assert "[400]" in str(err.value) or "INVALID_ARG" in str(err.value), str(err.value)
            rejected("Triton request", content)

    check()
    with _client(server) as client:
        assert _ask(client, *good) == expected[good]  # and the server still serves


def test_artifact_is_exported_first(onnx_family: dict[str, Any], exported: Path,
                                    tmp_path: Path) -> None:
    from chmc.compiler.triton_repo import parse_model_config, write_triton_repo

    repo = write_triton_repo(onnx_family["k2"], tmp_path / "repo", name="m")
    graph = repo / "m_engine" / "1"
    assert (graph / "model.onnx").is_file() and (graph / "model.onnx.data").is_file()
    declared = json.loads((exported / "chmc.json").read_text())["export"]
    assert (json.loads((repo / "m" / "1" / "chmc.json").read_text())["export"]["inputs"]
            == declared["inputs"])
    assert parse_model_config((repo / "m" / "config.pbtxt").read_text()).name == "m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging leftovers


def _pids_with(text: str) -> list[int]:
    """Processes whose command line contains `text` (read from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_chmc_serve_binds_loopback_and_stops_on_ctrl_c(exported: Path, triton_env: dict[str, Any],
                                                       tmp_path: Path, stop: str) -> None:
    """`chmc serve EXPORT` writes a temporary repository, serves it, and cleans up on Ctrl-C
    (SIGINT) or `kill` (SIGTERM), even when started with SIGINT ignored, as a background job of
    a script is."""
    import select
    import signal
    import urllib.request

    from chmc.runtime.serve import free_port

    port = free_port(count=2)  # serve puts gRPC on port + 1
    # started with SIGINT ignored, as a script's background job is (serve hung there in full runs
    # until it reset the signal itself): `trap '' INT` survives the exec
    cmd = ["sh", "-c", "trap '' INT; exec \"$0\" \"$@\"", sys.executable, "-m", "chmc", "serve",
           str(exported), "--port", str(port), "--tritonserver", str(triton_env["executable"]),
           "--model", NAME]
    # stderr kept, and faulthandler on, so that a serve still alive after the signal can be made
    # to print where it is stuck (SIGABRT) before the test fails
    stderr = (tmp_path / "serve.stderr").open("w")
    proc = subprocess.Popen(cmd, env={**triton_env["env"], "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)
    servers: list[int] = []
    try:
        assert proc.stdout is not None
        started, _, _ = select.select([proc.stdout], [], [], 300)  # serve prints once it is ready
        line = proc.stdout.readline() if started else ""
        if f"at http://127.0.0.1:{port} " not in line:
            tail = (tmp_path / "serve.stderr").read_text(errors="replace")[-3000:]
            raise AssertionError(f"chmc serve printed {line!r} (exit status {proc.poll()}); "
                                 f"stderr:\n{tail}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{NAME}/ready",
                                    timeout=10) as r:
            assert r.status == 200
        servers = _pids_with(f"--http-port={port}")
        assert servers, "no tritonserver process for this port"
        assert _listen_addresses(port) == {"0100007F"}  # 127.0.0.1 only, no 0.0.0.0 or ::
        proc.send_signal(getattr(signal, stop))  # SIGINT: what Ctrl-C sends
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
            proc.wait(timeout=10)
            tail = (tmp_path / "serve.stderr").read_text(errors="replace")[-3000:]
            raise AssertionError(f"chmc serve still running 60 s after {stop}; stderr:\n{tail}") \
                from None
        assert proc.returncode == 0 and "stopping tritonserver" in out
        assert not [p for p in servers if Path(f"/proc/{p}").exists()], (
            "tritonserver outlived serve")
        assert not _listen_addresses(port)
        temp_repo = Path(line.split()[1])  # "serving <repo> at http://..."
        assert temp_repo.name == "repo" and not temp_repo.exists(), (
            "temporary repository left behind")
    finally:  # on any failure: Ctrl-C first (serve cleans up), then kill whatever is left
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for pid in {proc.pid, *servers, *_pids_with(f"--http-port={port}")}:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stderr.close()


def test_a_numpy2_stub_fails_at_load_with_one_line(
        repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Triton 2.51's Python stub was built against numpy 1: with numpy 2 in its environment the
    text model must refuse to load, saying what to install, instead of failing every request."""
    from chmc.errors import ChmcError
    from chmc.runtime.serve import TritonServer, free_port

    env = triton_env_for(tmp_path_factory.mktemp("stub_src"), STUB_NUMPY_2)
    log = tmp_path_factory.mktemp("triton_numpy2") / "server.log"
    srv = TritonServer(repo, port=free_port(), executable=env["executable"], models=[NAME],
                       env=env["env"], log=log)
    with pytest.raises(ChmcError, match="exited with status"):
        srv.start(ready_timeout=180)
    assert "install numpy<2 in the model's Python environment" in log.read_text()


@pytest.mark.parametrize("case", ["gemma3", "phi-4-mini (longrope, partial rotary)"])
def test_other_architectures_serve_and_route_like_the_runner(
        case: str, triton_env: dict[str, Any], chmc_cli: Any, tmp_path: Path) -> None:
    """A Gemma 3 and a Phi-4-mini family (K=2 of 3, a router trained at build): the repository
    answers each expert, and `auto`, with the in-process runner's greedy text, through the
    generate endpoint of the default (continuous) text model."""
    from architectures import CASES

    from chmc import build, load
    from chmc.compiler.export import export
    from chmc.models.tiny.random_family import make_random_family
    from chmc.models.tiny.tasks import DISTINCT_TASKS, make_splits, write_jsonl
    from chmc.models.tiny.tokenizer import save_tokenizer
    from chmc.runtime.serve import TritonServer, free_port

    arch, overrides = CASES[case]
    names = ("add", "rev", "sort")
    base, folders = make_random_family(tmp_path / "family", n_experts=3, arch=arch, **overrides)
    save_tokenizer(base)
    data = {}
    for name in names:
        data[name] = tmp_path / f"{name}.jsonl"
        write_jsonl(make_splits(DISTINCT_TASKS[name], seed=7, sizes={"train": 100})["train"],
                    data[name])
    artifact = build(base, dict(zip(names, folders.values())), tmp_path / "k2", groups=2,
                     router_data=data, progress=False)
    folder = export(artifact, tmp_path / "onnx")
    repo = tmp_path / "repo"
    done = chmc_cli("triton", folder, "--out", repo, "--name", NAME, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runner = load(folder)
    prompts = ["12+34=", "rev:abc>", "sort:dcb>"]
    srv = TritonServer(repo, port=free_port(), executable=triton_env["executable"],
                       models=[NAME], env=triton_env["env"], log=tmp_path / "server.log")
    try:
        srv.start(ready_timeout=180)
        for expert in (*names, "auto"):
            for prompt in prompts:
                want = runner.generate([prompt], [expert], max_new_tokens=MAX_NEW)[0]
                status, got = generate(f"127.0.0.1:{srv.port}", NAME, {
                    "text_input": prompt, "expert": expert, "max_tokens": MAX_NEW})
                assert (status, got.get("text_output")) == (200, want), (expert, prompt, got)
    finally:
        srv.stop()
