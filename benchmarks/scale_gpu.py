"""chmc's torch CUDA runtime end to end at real sizes (attention, KV cache, logits included),
against what users would otherwise run, on one GPU. Prints one JSON line per section as it
finishes (a time-limited device run keeps what it got), then a summary object.

Per shape (default tinyllama-1.1b and llama-3.1-8b; models.synth's hub configs): a K=2 merged
model of 4 experts is made in GPU memory (random banks, random index tables: speed and memory do
not depend on the values; building it from checkpoints would cost the device time in disk writes)
and served by chmc.runtime.torch_merged (Triton kernels, the decode step compiled by Inductor
(--compile; `none`: op by op) and replayed from a CUDA graph; decode attention by
runtime.decode_attention over the filled slots (--decode-attention sdpa: SDPA over the cache's
capacity), prefill attention by SDPA), prompt 128:
  decode at batch 1, 8, 32, 64 with the experts mixed per row (row r serves expert r % 4):
    `step_ms`, the runtime's whole step as a generation loop calls it (inputs in, logits out to
    the host), `graph_ms`, the captured graph's replay alone (CUDA events), and `first_s`, the
    first decode step of the batch (compiling and capturing);
  prefill of 2048 tokens at batch 1.
Against:
  (a) transformers on the dense model, bf16, a StaticCache and torch.compile(mode=
      "reduce-overhead") of the forward for decode (the greedy token stays on the GPU), eager SDPA
      for prefill (compute-bound: compiling it gains little and costs minutes of device time);
  (b) the ensemble of 4 such models, each serving its B/4 rows: 4 sequential steps of (a) at B/4
      (the same shapes and bytes as 4 distinct models; its memory is 4x (a)'s weights);
  (c) the HBM limit: the bytes a step must read (for chmc: per merged row, every bank row the
      batch's experts use, from the index tables; the filled KV cache) over the measured copy
      bandwidth.
Goals (issue 17): decode b1 <= 1.0x (a) and, at 8B, <= 1.5x (c); b32 mixed <= 1.4x (a) and
>= 2.5x (b)'s throughput; prefill <= 1.2x (a); weights <= K/N of the ensemble + 10%.
Also: `chmc build --calibration --device cuda`'s per-expert cost, collect_grams on one synthetic
tinyllama-1.1b expert for 256 x 128 = 32k tokens.

    python3 benchmarks/scale_gpu.py [--shapes tinyllama-1.1b,llama-3.1-8b] [--budget-s 420]
    python3 benchmarks/scale_gpu.py --device cpu --layers 1 --no-compile --compile none  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chmc.models.synth import shape_config, tensor_shapes
from chmc.runtime.torch_merged import MergedDecoder, MergedState

EXPERTS, GROUPS, PROMPT = 4, 2, 128
BATCHES = (1, 8, 32, 64)
GOALS = {"decode_b1_vs_dense": 1.0, "decode_b1_vs_hbm_8b": 1.5, "decode_b32_vs_dense": 1.4,
         "throughput_b32_vs_ensemble": 2.5, "prefill_vs_dense": 1.2,
         "weights_vs_ensemble": GROUPS / EXPERTS + 0.1}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall ms of fn() over reps calls, each synchronised, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves (read + write), 1 GiB buffers."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, 3, 10)
    return 2 * src.numel() / (ms / 1e3)


def merged_model(config: dict[str, Any], device: torch.device,
                 compile_: str | None) -> MergedDecoder:
    g = torch.Generator(device=device).manual_seed(0)
    banks, vectors = {}, {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 2:
            bank = torch.randn((GROUPS, *shape), generator=g, device=device,
                               dtype=torch.bfloat16).mul_(0.02)
            index = torch.randint(0, GROUPS, (EXPERTS, shape[0]), generator=g, device=device)
            banks[name] = (bank, index)
        else:
            vectors[name] = 1 + 0.05 * torch.randn((EXPERTS, *shape), generator=g, device=device)
    return MergedDecoder(config, banks, vectors, EXPERTS, str(device), "bfloat16",
                         compile=compile_)


def weight_bytes(d: MergedDecoder) -> int:
    tensors = [t for pair in d.banks.values() for t in pair] + list(d.vectors.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes(config: dict[str, Any], batch: int, tokens: int) -> int:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * batch * kv * tokens * head_dim * 2


def step_bytes_merged(d: MergedDecoder, experts: np.ndarray) -> int:
    """Bank rows the batch's experts use (each distinct (row, group) once), the index rows, and
    the per-expert vectors; the embedding reads one row per token (not counted)."""
    ids = torch.as_tensor(np.unique(experts), device=d.device)
    total = 0
    for name, (bank, index) in d.banks.items():
        if name.endswith("embed_tokens.weight") and "lm_head.weight" in d.banks:
            continue
        used = index[ids]  # [E, out]
        rows = sum(int((used == k).any(0).sum()) for k in range(bank.shape[0]))
        total += rows * bank.shape[2] * bank.element_size() + used.numel() * 4
    return total + sum(v[ids].numel() * v.element_size() for v in d.vectors.values())


def dense_weight_bytes(config: dict[str, Any]) -> int:
    return sum(int(np.prod(s)) * 2 for s in tensor_shapes(config).values())


def dense_step_bytes(config: dict[str, Any]) -> int:
    shapes = tensor_shapes(config)
    skip = "model.embed_tokens.weight" if "lm_head.weight" in shapes else ""
    return sum(int(np.prod(s)) * 2 for n, s in shapes.items() if n != skip)


def chmc_decode(d: MergedDecoder, config: dict[str, Any], batch: int, steps: int,
                ) -> dict[str, Any]:
    rng = np.random.default_rng(batch)
    vocab = config["vocab_size"]
    experts = np.arange(batch) % EXPERTS
    state = MergedState(d, experts, lambda e, i, m: e)
    ids = rng.integers(0, vocab, (batch, PROMPT))
    state.step(ids, np.ones_like(ids), np.tile(np.arange(PROMPT), (batch, 1)))
    pos = [PROMPT]

    def step() -> None:
        token = rng.integers(0, vocab, (batch, 1))
        t = pos[0]
        state.step(token, np.ones((batch, t + 1), np.int64), np.full((batch, 1), t))
        pos[0] += 1

    sync(d.device)
    began = time.perf_counter()
    step()
    sync(d.device)
    first_s = round(time.perf_counter() - began, 2)
    step_ms = timed(step, d.device, 3, steps)
    out = {"step_ms": step_ms, "first_s": first_s, "bytes": step_bytes_merged(d, experts)}
    if state.graph is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            state.graph.replay()
        end.record()
        torch.cuda.synchronize()
        out["graph_ms"] = round(start.elapsed_time(end) / steps, 3)
    out["kv_bytes"] = kv_bytes(config, batch, pos[0])
    return out


def chmc_prefill(d: MergedDecoder, config: dict[str, Any], tokens: int) -> float:
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], (1, tokens))

    def prefill() -> None:
        MergedState(d, np.zeros(1, np.int64), lambda e, i, m: e).step(
            ids, np.ones_like(ids), np.arange(tokens)[None])

    return timed(prefill, d.device, 1, 3)


class Dense:
    """transformers' own model of the shape, bf16, greedy decode over a StaticCache with the
    compiled forward (HF's documented recipe), prefill eager."""

    def __init__(self, config: dict[str, Any], device: torch.device, compile_: bool):
        import transformers

        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device(device):
            self.model = transformers.AutoModelForCausalLM.from_config(
                cfg, dtype=torch.bfloat16).eval()
        self.device = device
        self.forward = (torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True,
                                      dynamic=True) if compile_ else self.model.forward)

    @torch.inference_mode()
    def decode(self, batch: int, steps: int) -> float:
        import transformers

        cfg = self.model.config
        cache = transformers.StaticCache(config=cfg, max_cache_len=PROMPT + steps + 8)
        ids = torch.randint(0, cfg.vocab_size, (batch, PROMPT), device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                         cache_position=torch.arange(PROMPT, device=self.device))
        token = [out.logits[:, -1:].argmax(-1)]
        pos = [PROMPT]

        def step() -> None:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.forward(input_ids=token[0], past_key_values=cache, use_cache=True,
                                  cache_position=torch.tensor([pos[0]], device=self.device)).logits
            token[0] = logits[:, -1:].argmax(-1)
            pos[0] += 1

        return timed(step, self.device, 3, steps)

    @torch.inference_mode()
    def prefill(self, tokens: int) -> float:
        ids = torch.randint(0, self.model.config.vocab_size, (1, tokens), device=self.device)
        return timed(lambda: self.model(input_ids=ids, use_cache=False), self.device, 1, 3)


def calibration_cost(device: torch.device, sequences: int) -> dict[str, Any]:
    """collect_grams on one synthetic tinyllama-1.1b expert, on `device`."""
    from chmc.compiler.calibration import collect_grams
    from chmc.compiler.plan import plan_tasks
    from chmc.formats.checkpoint import Checkpoint
    from chmc.models.synth import write_model

    config = shape_config("tinyllama-1.1b")
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, config["vocab_size"], (sequences, 128)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "expert"
        write_model(folder, config, 0, seed=0)
        merged = {t.name for t in plan_tasks(Checkpoint(folder), GROUPS, None)
                  if t.kind == "merged"}
        sync(device)
        start = time.perf_counter()
        collect_grams(folder, seqs, Path(tmp) / "grams", merged, progress=False,
                      device=str(device))
        sync(device)
        wall = time.perf_counter() - start
    return {"shape": "tinyllama-1.1b", "tokens": sequences * 128, "seconds": round(wall, 2)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def met(value: float, goal: float, higher: bool = False) -> str:
    ok = value >= goal if higher else value <= goal
    return f"{'met' if ok else 'NOT met'} ({value} {'>=' if higher else '<='} {goal})"


def measure_chmc(config: dict[str, Any], args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    d = merged_model(config, device, None if args.compile == "none" else args.compile)
    if args.decode_attention == "sdpa":
        d.decode_attention = None
    res: dict[str, Any] = {"compile": args.compile,
                           "decode_attention": "kernel" if d.decode_attention else "sdpa",
                           "weights_gb": round(weight_bytes(d) / 1e9, 3),
                           "weights_vs_ensemble": ratio(weight_bytes(d),
                                                        EXPERTS * dense_weight_bytes(config))}
    for b in args.batches:
        try:
            res[f"b{b}"] = chmc_decode(d, config, b, args.steps)
        except Exception as e:  # noqa: BLE001  a compile failure must not lose the section
            res["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"  # op by op, and say so
            d.compiled = None
            res[f"b{b}"] = chmc_decode(d, config, b, args.steps)
        print(f"chmc b{b}: {res[f'b{b}']}", file=sys.stderr, flush=True)  # if time runs out
    res["prefill_ms"] = chmc_prefill(d, config, args.prefill)
    return res


def measure_dense(config: dict[str, Any], args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    """(a) at every batch, and at B/4 for (b)."""
    dense = Dense(config, device, not args.no_compile)
    need = sorted(set(args.batches) | {max(1, b // EXPERTS) for b in args.batches})
    res: dict[str, Any] = {}
    for b in need:
        try:
            res[f"b{b}"] = {"step_ms": dense.decode(b, args.steps)}
        except Exception as e:  # noqa: BLE001  a compile failure must not lose the section
            res["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"  # eager, and say so
            dense.forward = dense.model.forward
            res[f"b{b}"] = {"step_ms": dense.decode(b, args.steps)}
        print(f"dense b{b}: {res[f'b{b}']}", file=sys.stderr, flush=True)  # if time runs out
    res["prefill_ms"] = dense.prefill(args.prefill)
    return res


def compare(shape: str, config: dict[str, Any], chmc: dict[str, Any], dense: dict[str, Any],
            bandwidth: float) -> dict[str, Any]:
    """Ratios and goals from one shape's chmc and dense sections (of one run or two)."""
    res: dict[str, Any] = {"shape": shape, "layers": config["num_hidden_layers"],
                           "dense_weights_gb": round(dense_weight_bytes(config) / 1e9, 3),
                           "chmc": chmc, "dense": dense}
    for key, c in chmc.items():
        if not key.startswith("b"):
            continue
        c["hbm_limit_ms"] = round((c["bytes"] + c["kv_bytes"]) / bandwidth * 1e3, 3)
        c["vs_hbm"] = ratio(c["step_ms"], c["hbm_limit_ms"])
        if key not in dense:
            continue
        b, a = int(key[1:]), dense[key]
        quarter = dense.get(f"b{max(1, b // EXPERTS)}")
        c["vs_dense"] = ratio(c["step_ms"], a["step_ms"])
        if quarter is not None:  # the ensemble: 4 models in turn, B/4 rows each (b1: one model)
            ens = a["step_ms"] if b == 1 else EXPERTS * quarter["step_ms"]
            c["throughput_vs_ensemble"] = ratio(ens, c["step_ms"])
        a["hbm_limit_ms"] = round((dense_step_bytes(config) + c["kv_bytes"]) / bandwidth * 1e3, 3)
        a["vs_hbm"] = ratio(a["step_ms"], a["hbm_limit_ms"])
    b1, b32 = chmc["b1"], chmc.get("b32", {})
    goals = {"decode_b1_vs_dense": met(b1["vs_dense"], GOALS["decode_b1_vs_dense"]),
             "weights_vs_ensemble": met(chmc["weights_vs_ensemble"],
                                        GOALS["weights_vs_ensemble"])}
    if "prefill_ms" in dense:  # a run that ran out of time may lack it (and b32)
        res["prefill_vs_dense"] = ratio(chmc["prefill_ms"], dense["prefill_ms"])
        goals["prefill_vs_dense"] = met(res["prefill_vs_dense"], GOALS["prefill_vs_dense"])
    if "vs_dense" in b32:
        goals["decode_b32_vs_dense"] = met(b32["vs_dense"], GOALS["decode_b32_vs_dense"])
    if "throughput_vs_ensemble" in b32:
        goals["throughput_b32_vs_ensemble"] = met(
            b32["throughput_vs_ensemble"], GOALS["throughput_b32_vs_ensemble"], higher=True)
    if "8b" in shape:
        goals["decode_b1_vs_hbm"] = met(b1["vs_hbm"], GOALS["decode_b1_vs_hbm_8b"])
    return {**res, "goals": goals}


def run_shape(shape: str, args: argparse.Namespace, device: torch.device, bandwidth: float,
              emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    config = shape_config(shape, args.layers)
    got = {}
    for side, fn in (("chmc", measure_chmc), ("dense", measure_dense)):
        if side in args.sides:
            got[side] = fn(config, args, device)
            emit({"section": f"{shape} {side}", side: got[side]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if len(got) < 2:
        return got
    done = compare(shape, config, got["chmc"], got["dense"], bandwidth)
    emit({"section": f"{shape} done", **done})
    return done


def combine(files: list[Path]) -> dict[str, Any]:
    """Compare the chmc and dense sections of one or more runs' JSON lines (the first
    bandwidth measured)."""
    sections = [json.loads(line) for f in files for line in f.read_text().splitlines()
                if line.startswith("{")]
    bandwidth = next(s["copy_bandwidth_gb_s"] for s in sections if s["section"] == "bandwidth")
    sides: dict[str, dict[str, Any]] = {}  # shape -> {"chmc": ..., "dense": ...}, last wins
    out: dict[str, Any] = {"copy_bandwidth_gb_s": bandwidth, "runs": [str(f) for f in files]}
    for s in sections:
        shape = s["section"].split(" ")[0]
        sides.setdefault(shape, {}).update({k: s[k] for k in ("chmc", "dense") if k in s})
        if "chmc" in s and "weights_vs_ensemble" in s:  # the first H200 run's layout
            s["chmc"] |= {k: s[k] for k in ("weights_gb", "weights_vs_ensemble")}
        if s["section"] == "calibration":
            out["calibration"] = {k: v for k, v in s.items() if k not in ("section", "elapsed_s")}
    for shape, got in sides.items():
        if len(got) == 2:
            out[shape] = compare(shape, shape_config(shape), got["chmc"], got["dense"],
                                 bandwidth * 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="tinyllama-1.1b,llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per case")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--calibration", type=int, default=256, help="sequences (0: skip)")
    p.add_argument("--no-compile", action="store_true", help="(a) and (b) eager")
    p.add_argument("--compile", default="inductor",
                   help="chmc's decode step: a torch.compile backend, or none")
    p.add_argument("--decode-attention", choices=("kernel", "sdpa"), default="kernel",
                   help="chmc's decode attention on CUDA: runtime.decode_attention (the filled "
                        "slots) or SDPA (the whole capacity)")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="skip sections that start after this many seconds")
    p.add_argument("--sides", default="chmc,dense", help="chmc, dense or both")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--combine", nargs="+", type=Path, metavar="JSONL",
                   help="only compare the sections of earlier runs' output")
    args = p.parse_args()
    if args.combine:
        print(json.dumps(combine(args.combine), indent=1))
        return
    args.batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                               else "cpu", "torch": torch.__version__}

    def emit(section: dict[str, Any]) -> None:
        print(json.dumps({**section, "elapsed_s": round(time.perf_counter() - t0, 1)}),
              flush=True)

    bandwidth = copy_bandwidth(device)
    summary["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    emit({"section": "bandwidth", **summary})
    shapes = args.shapes.split(",")
    jobs: list[tuple[str, Callable[[], Any]]] = [
        (s, partial(run_shape, s, args, device, bandwidth, emit)) for s in shapes[:1]]
    if args.calibration:
        jobs.append(("calibration", lambda: calibration_cost(device, args.calibration)))
    jobs += [(s, partial(run_shape, s, args, device, bandwidth, emit)) for s in shapes[1:]]
    for name, job in jobs:
        if time.perf_counter() - t0 > args.budget_s:
            summary[name] = "skipped: over --budget-s"
            continue
        try:
            summary[name] = job()
        except Exception as e:  # noqa: BLE001  one failed section must not lose the others' figures
            summary[name] = f"failed: {type(e).__name__}: {e}"
        if name == "calibration":
            emit({"section": "calibration", **summary[name]} if isinstance(summary[name], dict)
                 else {"section": "calibration", "error": summary[name]})
    emit({"section": "summary", **summary})


if __name__ == "__main__":
    main()
