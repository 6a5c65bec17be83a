"""The ONNX Runtime ChannelGatherMatMul kernel alone, per kernel set the CPU can run (AVX-512,
AVX2 + FMA, plain C), against ONNX Runtime's own MatMul on the dense weight (MLAS), on a
llama-3.2-1b MLP's shapes: one graph of --layers linears alternating up (2048 -> 8192) and
down (8192 -> 2048), fp32, N=4 experts on K=2 banks with both groups used in every channel (the
weights exceed the L3 cache, as a real model's do). Cases: decode at batch 1, batch 8 of one
expert, batch 8 with the experts mixed, and a prefill of --prefill tokens; the graphs are timed
in turn each round, medians over rounds; each decode case also against its memory floor (the
passes over the weights it must make, at the fastest batch-1 step's rate). Prints JSON and
writes --json.

    python3 benchmarks/ort_kernel.py [--layers 4 --rounds 9 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from chmc.plugins.channel_gather_matmul.onnxruntime_op import KERNEL_FLAGS, Kernels, register

HIDDEN, INTERMEDIATE, EXPERTS, GROUPS = 2048, 8192, 4, 2


def graph(layers: int, plugin: bool, rng: np.random.Generator) -> bytes:
    """Linears chained x -> y0 -> y1 ...: ChannelGatherMatMul nodes, or MatMul on dense weights."""
    nodes, weights = [], []
    x = "x"
    for i in range(layers):
        fan_in, fan_out = (HIDDEN, INTERMEDIATE) if i % 2 == 0 else (INTERMEDIATE, HIDDEN)
        if plugin:
            bank = rng.standard_normal((GROUPS, fan_out, fan_in), dtype=np.float32) * 0.02
            index = rng.integers(0, GROUPS, (EXPERTS, fan_out)).astype(np.int32)
            index[0], index[1] = 0, 1  # experts 0 and 1 disagree everywhere
            weights += [numpy_helper.from_array(bank, f"bank{i}"),
                        numpy_helper.from_array(index, f"index{i}")]
            nodes.append(helper.make_node("ChannelGatherMatMul",
                                          [x, f"bank{i}", f"index{i}", "expert_id"], [f"y{i}"],
                                          domain="chmc"))
        else:
            w = rng.standard_normal((fan_in, fan_out), dtype=np.float32) * 0.02
            weights.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])]
    if plugin:
        inputs.append(helper.make_tensor_value_info("expert_id", TensorProto.INT64, ["B"]))
    g = helper.make_graph(nodes, "linears", inputs,
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], weights)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("chmc", 1)]).SerializeToString()


def session(model: bytes, threads: int, kernels: Kernels | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle pools off
    if kernels:
        register(opts, kernels)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def cpu() -> dict[str, Any]:
    """The CPU's model name and the vector extensions the kernel sets dispatch on."""
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
                if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return {"model": info.get("model name", platform.machine()),
            "vector_flags": sorted(f for f in info.get("flags", "").split()
                                   if f.startswith(("avx", "fma")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path,
                   default=Path(__file__).parent / "results" / "ort_kernel_cpu.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    plugin_model = graph(args.layers, True, rng)
    sessions = {"dense MatMul": session(graph(args.layers, False, rng), args.threads, None)}
    sessions |= {f"chmc {k}": session(plugin_model, args.threads, k)
                 for k in KERNEL_FLAGS}
    cases = {"decode b1": (1, 1, [0]), "decode b8, one expert": (8, 1, [1] * 8),
             "decode b8, 4 experts mixed": (8, 1, [0, 1, 2, 3] * 2),
             f"prefill {args.prefill}": (1, args.prefill, [0])}
    ms: dict[str, dict[str, float]] = {}
    for case, (batch, seq, experts) in cases.items():
        x = rng.standard_normal((batch, seq, HIDDEN), dtype=np.float32)
        expert_id = np.array(experts, np.int64)
        want = None
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, s in sessions.items():
                feeds = {"x": x} | ({"expert_id": expert_id} if name != "dense MatMul" else {})
                start = time.perf_counter()
                y = s.run(None, feeds)[0]
                if r:
                    times[name].append(time.perf_counter() - start)
                elif name != "dense MatMul":  # every kernel set computes the same thing
                    want = y if want is None else want
                    np.testing.assert_allclose(y, want, rtol=0, atol=1e-4 * np.abs(want).max())
        ms[case] = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
        print(f"{case}: {ms[case]}", flush=True)
    # The decode steps' memory floor: the fastest batch-1 step is one pass over the weights that
    # does little else; a mixed batch must make two (both banks' row in every channel).
    one_pass = min(ms["decode b1"].values())
    weights = args.layers * HIDDEN * INTERMEDIATE * 4
    floor = {case: {"dense MatMul": one_pass, "chmc": one_pass * (2 if "mixed" in case else 1)}
             for case in cases if case.startswith("decode")}
    result: dict[str, Any] = {
        "cpu": cpu(), "threads": args.threads, "layers": args.layers,
        "read_gb_per_s": round(weights / one_pass / 1e6, 1), "ms": ms,
        "vs_dense": {case: {name: round(t / row["dense MatMul"], 3) for name, t in row.items()
                            if name != "dense MatMul"} for case, row in ms.items()},
        "memory_floor_ms": {case: {k: round(v, 2) for k, v in f.items()}
                            for case, f in floor.items()},
        "vs_memory_floor": {case: {name: round(t / floor[case]["dense MatMul" if name ==
                                                                "dense MatMul" else "chmc"], 2)
                                   for name, t in ms[case].items()} for case in floor},
        "measured": time.strftime("%Y-%m-%d %H:%M")}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
