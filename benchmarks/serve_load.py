"""Load test: a real tritonserver on loopback serving the distinct tiny family (4 experts, K=2,
plugin-form graph on ONNX Runtime), continuous scheduling against request-level batching at the
same offered load. Prints JSON and writes --json (default benchmarks/results/serve_load_cpu.json).

  load    --requests requests arrive open-loop (Poisson, at each of --rates per second), each
          for an expert drawn uniformly, its prompt drawn from the distinct family's eval split
          (task prompts of 5-20 bytes), max_tokens uniform in --max-tokens (the random family's
          answers mostly run to it); the same arrivals for both schedulers, through HTTP
          generate_stream, the continuous one streaming a response at most every
          --stream-interval-ms. Reported per scheduler: throughput (tokens
          generated / time from the first arrival to the last answer), time to first token and
          inter-token latency (p50, p99), end-to-end latency, errors, and answers that differ
          from the in-process greedy answer. Goals: continuous >= 2x the throughput of request
          batching or <= 0.5x its p99 time to first token; 0 errors; 0 differing answers.
  memory  --memory-requests requests, 16 at a time, against the continuous server: the Python
          stub's RSS after the first 100 and at the end (flat: a leak per request shows here).

    python3 benchmarks/serve_load.py [--family random|distinct] [--rates 150,300,600]
    python3 benchmarks/serve_load.py --artifact DIR --device cuda   # on a GPU, the torch backend

The tritonserver is the one the tests use (tests/tritonserver.py: the nvidia-pytriton wheel's).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import site
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shared with the tests
from tritonserver import generate_stream, triton_env_for  # noqa: E402

from chmc.api import build, load  # noqa: E402
from chmc.cache import cache_root  # noqa: E402
from chmc.compiler.export import export  # noqa: E402
from chmc.compiler.triton_repo import TextModelOptions, write_triton_repo  # noqa: E402
from chmc.models.tiny import family as tiny  # noqa: E402
from chmc.models.tiny.random_family import make_random_family  # noqa: E402
from chmc.models.tiny.tokenizer import save_tokenizer  # noqa: E402
from chmc.runtime.evaluate import read_examples  # noqa: E402
from chmc.runtime.serve import TritonServer, free_port  # noqa: E402

NAME = "chmc"
GOALS = {"throughput_vs_request": 2.0, "p99_ttft_vs_request": 0.5}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def model_folder(work: Path, family: str) -> Path:
    """A 4-expert family at K=2, exported in the plugin form (cached under `work`): the trained
    `distinct` family (answers end at EOS after a few tokens) or `random` (the tests' random
    Llama family with the tiny tokenizer: answers mostly run to max_tokens)."""
    onnx = work / f"{family}-k2-plugin"
    if (onnx / "chmc.json").is_file():
        return onnx
    if family == "distinct":
        fam = tiny.family("distinct")
        base, experts = fam.base, fam.experts
    else:
        base, experts = make_random_family(work / "random", n_experts=4, arch="llama")
        save_tokenizer(base)
    artifact = build(base, experts, work / f"{family}-k2", groups=2, force=True, progress=False)
    export(artifact, onnx, linear="plugin", force=True)
    return onnx


def stub_rss_mb(repo: Path) -> float:
    """Resident memory of the Python backend stub serving `repo` (from /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            cmdline = (status.parent / "cmdline").read_bytes()
            if b"triton_python_backend_stub" in cmdline and str(repo).encode() in cmdline:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            continue
    raise RuntimeError(f"no Python backend stub serving {repo}")


def ask(url: str, job: dict[str, Any], start: float) -> dict[str, Any]:
    """One request at its arrival time (seconds after `start`): event times and the text."""
    time.sleep(max(0.0, start + job["arrival"] - time.perf_counter()))
    sent = time.perf_counter()
    body = {"text_input": job["prompt"], "expert": job["expert"],
            "max_tokens": job["max_tokens"], "stream": True}
    times, text = [], ""
    try:
        for at, event in generate_stream(url, NAME, body, timeout=600):
            if "error" in event:
                return {"error": event["error"], "sent": sent}
            times.append(at)
            text += event.get("text_output", "")
    except Exception as e:  # noqa: BLE001  an HTTP error or a dropped connection: counted
        return {"error": f"{type(e).__name__}: {e}", "sent": sent}
    return {"sent": sent, "times": times, "text": text}


def run_load(url: str, jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    start = time.perf_counter() + 0.5
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: ask(url, j, start), jobs))
    return results, start


def summarise(jobs: list[dict[str, Any]], results: list[dict[str, Any]],
              start: float) -> dict[str, Any]:
    ok = [(j, r) for j, r in zip(jobs, results) if "error" not in r and r["times"]]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["times"][0] - r["sent"] for _, r in ok]
    e2e = [r["times"][-1] - r["sent"] for _, r in ok]
    gaps = [b - a for _, r in ok for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(j["tokens"] for j, _ in ok)
    makespan = max(r["times"][-1] for _, r in ok) - start
    return {
        "requests": len(jobs), "errors": len(errors), "error_examples": errors[:3],
        "answers_differing_from_in_process": sum(r["text"] != j["want"] for j, r in ok),
        "tokens": tokens, "seconds": round(makespan, 3),
        "throughput_tokens_per_s": round(tokens / makespan, 1),
        "ttft_s": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
        "inter_token_s": {"p50": pct(gaps, 0.5), "p99": pct(gaps, 0.99)},
        "latency_s": {"p50": pct(e2e, 0.5), "p99": pct(e2e, 0.99)},
    }


def serve(repo: Path, env: dict[str, Any], log: Path) -> TritonServer:
    return TritonServer(repo, port=free_port(), executable=env["executable"], models=[NAME],
                        env=env["env"], log=log).start(ready_timeout=180)


def make_jobs(runner: Any, requests: int, rate: float, max_tokens: tuple[int, int],
              seed: int) -> list[dict[str, Any]]:
    """Poisson arrivals over the experts; each with the answer the server must give (greedy, in
    process, the request alone) and its token count."""
    tasks = tiny.family("distinct").tasks  # the prompts, for either family's experts
    prompts = {e: [x["prompt"] for x in read_examples(files["eval"])]
               for e, files in zip(runner.experts, tasks.values())}
    rng = random.Random(seed)
    jobs, arrival = [], 0.0
    for _ in range(requests):
        expert = rng.choice(runner.experts)
        arrival += rng.expovariate(rate)
        prompt, limit = rng.choice(prompts[expert]), rng.randint(*max_tokens)
        ids = runner.generate_ids([runner.tokenizer.encode(prompt)], [expert], limit)[0]
        jobs.append({"expert": expert, "prompt": prompt, "max_tokens": limit, "arrival": arrival,
                     "tokens": len(ids),
                     "want": runner.generate([prompt], [expert], limit)[0]})
    return jobs


def compare(c: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """Continuous against request scheduling at one offered load, with the goals marked."""
    ratios = {"throughput_vs_request": round(c["throughput_tokens_per_s"]
                                             / r["throughput_tokens_per_s"], 2),
              "p99_ttft_vs_request": round(c["ttft_s"]["p99"] / r["ttft_s"]["p99"], 3)}
    met = (ratios["throughput_vs_request"] >= GOALS["throughput_vs_request"]
           or ratios["p99_ttft_vs_request"] <= GOALS["p99_ttft_vs_request"])
    return {**ratios, "goals": {
        "throughput >= 2x or p99 TTFT <= 0.5x request batching": "met" if met else "not met",
        "0 errors": "met" if c["errors"] == 0 else "not met",
        "answers equal in-process": ("met" if c["answers_differing_from_in_process"] == 0
                                     else "not met")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rates", default="150,300,600", help="arrivals per second (Poisson)")
    ap.add_argument("--max-tokens", default="8:64", help="LO:HI, uniform")
    ap.add_argument("--family", choices=["random", "distinct"], default="random")
    ap.add_argument("--artifact", default=None,
                    help="serve this artifact with --backend torch instead of a tiny family "
                         "(on a GPU: e.g. a `chmc family synth` family built at K=2)")
    ap.add_argument("--device", default="cuda", help="with --artifact: the torch device")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--stream-interval-ms", type=float, default=20.0)
    ap.add_argument("--memory-requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None,
                    help="default benchmarks/results/serve_load_cpu_FAMILY.json")
    args = ap.parse_args()
    work = cache_root() / "bench" / "serve"
    work.mkdir(parents=True, exist_ok=True)
    if args.artifact:  # the torch backend on the artifact itself
        source, backend = Path(args.artifact), "torch"
        runner = load(source, backend="torch", device=args.device, merged=True)
    else:
        source, backend = model_folder(work, args.family), "onnxruntime"
        runner = load(source)
    lo, hi = (int(v) for v in args.max_tokens.split(":"))
    rates = [float(r) for r in args.rates.split(",")]
    loads = [make_jobs(runner, args.requests, rate, (lo, hi), args.seed) for rate in rates]
    env = triton_env_for(Path(tempfile.mkdtemp(prefix="chmc-stub-")))
    if args.artifact:  # the stub's small environment has no torch: this Python's packages too
        env["env"]["CHMC_STUB_PATH"] += os.pathsep + site.getsitepackages()[0]
    report: dict[str, Any] = {
        "model": (f"{source} on torch ({args.device}) in Triton's Python backend" if args.artifact
                  else f"{args.family} tiny family: K=2 of {len(runner.experts)} experts, plugin "
                  "form, fp32, ONNX Runtime in Triton's Python backend"),
        "offered": {"requests": args.requests, "max_tokens_uniform": [lo, hi],
                    "prompt_bytes": [min(len(j["prompt"]) for j in loads[0]),
                                     max(len(j["prompt"]) for j in loads[0])],
                    "generated_tokens_mean": round(
                        statistics.mean(j["tokens"] for j in loads[0]), 1)},
        "settings": {"continuous": {"slots": args.slots,
                                    "stream_interval_ms": args.stream_interval_ms},
                     "request": {"max_batch_size": 16, "preferred": [4, 8, 16],
                                 "queue_delay_us": 20000}},
        "loads": [{"rate_per_s": rate} for rate in rates],
    }
    for scheduling in ("request", "continuous"):
        repo = write_triton_repo(source, work / f"repo-{scheduling}", backend=backend,
                                 force=True, options=TextModelOptions(
                                     scheduling=scheduling, slots=args.slots,
                                     queue=args.requests, device=args.device,
                                     stream_interval_ms=args.stream_interval_ms))
        srv = serve(repo, env, work / f"server-{scheduling}.log")
        try:
            url = f"{srv.host}:{srv.port}"
            run_load(url, [{**j, "arrival": 0.0} for j in loads[0][:8]])  # warm-up
            for jobs, entry in zip(loads, report["loads"]):
                results, start = run_load(url, jobs)
                entry[scheduling] = summarise(jobs, results, start)
                print(json.dumps({"rate": entry["rate_per_s"], scheduling: entry[scheduling]}),
                      flush=True)
            if scheduling == "continuous" and args.memory_requests:
                report["memory"] = memory(url, repo, loads[0], args.memory_requests)
        finally:
            srv.stop()
    for entry in report["loads"]:
        entry["continuous_vs_request"] = compare(entry["continuous"], entry["request"])
    report["date"] = time.strftime("%Y-%m-%d")
    name = "gpu_torch" if args.artifact else f"cpu_{args.family}"
    out = args.json or Path(__file__).parent / "results" / f"serve_load_{name}.json"
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"ratios": [{"rate": e["rate_per_s"], **e["continuous_vs_request"]}
                                 for e in report["loads"]], "memory": report.get("memory")}))


def memory(url: str, repo: Path, jobs: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """`total` requests, 16 at a time, cycling through the jobs: the stub's RSS early and late."""
    def one(i: int) -> bool:
        j = jobs[i % len(jobs)]
        r = ask(url, {**j, "arrival": 0.0}, time.perf_counter())
        return "error" not in r and r["text"] == j["want"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        first = list(pool.map(one, range(100)))
        early = stub_rss_mb(repo)
        rest = list(pool.map(one, range(100, total)))
        late = stub_rss_mb(repo)
    return {"requests": total, "concurrency": 16, "stub_rss_mb_after_100": early,
            "stub_rss_mb_at_end": late, "growth_mb": round(late - early, 1),
            "wrong_or_failed": (first + rest).count(False)}


if __name__ == "__main__":
    main()
