"""GPU benchmark: ChannelGatherMatMul kernels vs dense cuBLAS on Llama-2-7B linear shapes.

Random bf16 weights, N=4 experts merged into K=2 banks, every layer's q,k,v,o (4096x4096),
gate/up (11008x4096) and down (4096x11008); each step runs all layers' linears inside one CUDA
graph and is timed with CUDA events (median of --iters replays). Goals, as ratios measured in this
run: decode step <= 1.03x dense (<= 1.0x with q/k/v and gate/up fused into one launch each, as
the torch runtime runs them), prefill of 2048 tokens <= 1.10x dense, a 16-row step with 4
experts mixed <= 1.5x the dense single-model 16-row step, and 8 or 16 rows of one expert <= 1.1x
(the mixed kernel's one-expert pass reads one bank row per channel). The ensemble baseline (4
models, rows split by expert) reuses the dense pool with a per-model layer offset, so every model
reads distinct tensors far beyond L2 per step, without holding 4 copies of the model.

    python3 benchmarks/gpu_kernels.py [--layers 32] [--iters 20] [--check] [--per-shape]
                                      [--prefill-variants]

--prefill-variants runs first: each prefill kernel variant (kernels.PREFILL_VARIANTS) with a few
launches on each linear shape at 2048 tokens, vs cuBLAS and the autotuned default kernel, then
the whole-model prefill step with the fastest persistent variant
("prefill" -> "best_persistent_ms").
Per shape, "control_triton_dense" times a plain Triton TMA GEMM (triton_dense_gemm.py) on the
dense weight: the ceiling of any Triton prefill kernel on that GPU.

Prints one JSON object; exits 2 without CUDA, 1 with --check when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from chmc.plugins.channel_gather_matmul.kernels import Mode, Variant

HIDDEN, INTER = 4096, 11008
LINEARS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN),
           "o": (HIDDEN, HIDDEN), "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN),
           "down": (HIDDEN, INTER)}  # name: (out, in)
GOALS = {"decode": 1.03, "decode_fused": 1.0, "prefill": 1.10, "mixed": 1.5,
         "one_expert_8": 1.1, "one_expert_16": 1.1}
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}  # as runtime.torch_merged fuses
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tried per persistent variant; the largest takes
# 4 x (128 + 256) x 64 x 2 B = 192 KiB of shared memory (227 KiB per block on H100/H200; a
# flattened loop may buffer one stage more and not fit: reported as that launch's error)
VARIANT_LAUNCHES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                    (128, 256, 64, 8, 4), (256, 128, 64, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, flatten) of the plain Triton TMA GEMM control; on
# sm_90 the first takes 208 KiB of shared memory, the third 160 KiB (a TMA-stored epilogue)
CONTROL_LAUNCHES = [(128, 256, 64, 8, 3, False), (128, 256, 64, 8, 3, True),
                    (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 4, True)]


def timed(step: Callable[[], Any], iters: int) -> float:
    """Median milliseconds of one replay of `step` captured in a CUDA graph."""
    import torch

    step()  # warm-up: autotuning and allocations happen outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def make_weights(layers: int, experts: int, groups: int) -> dict[str, Any]:
    """Per layer and linear: dense W [out, in], bank [K, out, in], index [N, out] int32."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    dense, banks, index = [], [], []
    for _ in range(layers):
        dense.append({n: torch.randn(o, i, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
                      for n, (o, i) in LINEARS.items()})
        banks.append({n: torch.randn(groups, o, i, device="cuda", dtype=torch.bfloat16,
                                     generator=g) * 0.02 for n, (o, i) in LINEARS.items()})
        index.append({n: torch.randint(0, groups, (experts, o), device="cuda", dtype=torch.int32,
                                       generator=g) for n, (o, i) in LINEARS.items()})
    return {"dense": dense, "banks": banks, "index": index}


def inputs(rows: int, seq: int) -> dict[int, Any]:
    import torch

    return {d: torch.randn(rows, seq, d, device="cuda", dtype=torch.bfloat16)
            for d in (HIDDEN, INTER)}


def dense_step(w: dict[str, Any], x: dict[int, Any], offset: int = 0, rows: Any = None):
    import torch.nn.functional as F

    def step() -> None:
        layers = len(w["dense"])
        for layer in range(layers):
            for n, (_, i) in LINEARS.items():
                inp = x[i] if rows is None else x[i][rows]
                F.linear(inp, w["dense"][(layer + offset) % layers][n])
    return step


def kernel_step(w: dict[str, Any], x: dict[int, Any], expert_id: Any, mode: Mode = "auto",
                choice: dict[tuple[int, int], tuple[str, Any]] | None = None):
    """All layers' linears through the kernel; `choice` maps (out, in) to a prefill (variant,
    launch), else the default kernel, autotuned."""
    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

    def step() -> None:
        for bank, index in zip(w["banks"], w["index"]):
            for n, shape in LINEARS.items():
                variant, launch = (choice or {}).get(shape, ("default", None))
                # `choice` holds PREFILL_VARIANTS keys (model_prefill picks them by name)
                channel_gather_matmul(x[shape[1]], bank[n], index[n], expert_id, mode=mode,
                                      variant=cast("Variant", variant), launch=launch)
    return step


def fused_step(w: dict[str, Any], x: dict[int, Any], expert_id: Any):
    """All layers' linears as the torch runtime launches them (fuse_projections): q/k/v and
    gate/up concatenated into one bank each, 4 launches per layer instead of 7. The fused banks
    are made once, here (about 60% more bank memory while this step lives)."""
    import torch

    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

    layers = []
    for bank, index in zip(w["banks"], w["index"]):
        layer = {n: (bank[n], index[n]) for n in ("o", "down")}
        for name, parts in FUSED.items():
            layer[name] = (torch.cat([bank[p] for p in parts], dim=1),
                           torch.cat([index[p] for p in parts], dim=1))
        layers.append(layer)

    def step() -> None:
        for layer in layers:
            for bank, index in layer.values():
                channel_gather_matmul(x[bank.shape[2]], bank, index, expert_id)
    return step


def naive_gather_step(w: dict[str, Any], x: dict[int, Any], expert: int):
    """Materialise W_e = bank[index[e, c], c] every step, then cuBLAS: what not to do."""
    import torch
    import torch.nn.functional as F

    def step() -> None:
        for bank, index in zip(w["banks"], w["index"]):
            for n, (o, i) in LINEARS.items():
                rows = index[n][expert].long()
                F.linear(x[i], bank[n][rows, torch.arange(o, device="cuda")])
    return step


def bank_select_step(w: dict[str, Any], x: dict[int, Any], expert_id: Any):
    """Every bank's matmul on every row, then each (row, channel) picks its bank's result."""
    import torch
    import torch.nn.functional as F

    def step() -> None:
        for bank, index in zip(w["banks"], w["index"]):
            for n, (o, i) in LINEARS.items():
                k = bank[n].shape[0]
                ys = F.linear(x[i], bank[n].view(k * o, i))  # [B, S, K * out]
                ys = ys.view(*ys.shape[:2], k, o)  # [B, S, K, out]
                pick = index[n][expert_id].long()  # [B, out]: each row's bank per channel
                torch.gather(ys, 2, pick[:, None, None, :].expand(-1, ys.shape[1], 1, -1))
    return step


def check_numerics(w: dict[str, Any]) -> float:
    """Max relative error of the kernels vs dense matmul of the materialised expert weights."""
    import torch

    from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

    worst = 0.0
    for rows, seq in ((1, 1), (16, 1), (1, 256)):
        expert_id = torch.arange(rows, device="cuda") % 4
        for n, (o, i) in LINEARS.items():
            x = torch.randn(rows, seq, i, device="cuda", dtype=torch.bfloat16)
            bank, index = w["banks"][0][n], w["index"][0][n]
            we = bank[index[expert_id].long(), torch.arange(o, device="cuda")[None]]  # [B, out, in]
            want = torch.einsum("bsi,boi->bso", x.float(), we.float())
            got = channel_gather_matmul(x, bank, index, expert_id).float()
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


def per_shape(iters: int, copies: int = 8) -> dict[str, Any]:
    """Each distinct linear shape alone: kernel vs F.linear per mode, with the config autotuning
    picked, to show which shape or regime lags. Each timing is one CUDA graph of `copies` calls on
    distinct weights (beyond L2), divided by `copies`. For prefill, the same kernel on one dense
    bank (K=1, every index 0) separates the cost of the gather from Triton's GEMM itself."""
    import torch
    import torch.nn.functional as F

    from chmc.plugins.channel_gather_matmul import kernels

    rows: dict[Mode, tuple[int, int]] = {"decode": (1, 1), "mixed": (16, 1), "prefill": (1, 2048)}
    table: dict[str, Any] = {}
    for o, i in sorted(set(LINEARS.values())):
        banks = [torch.randn(2, o, i, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        index = torch.randint(0, 2, (4, o), device="cuda", dtype=torch.int32)
        zeros = torch.zeros(4, o, device="cuda", dtype=torch.int32)
        for mode, (b, s) in rows.items():
            x = torch.randn(b, s, i, device="cuda", dtype=torch.bfloat16)
            ids = torch.arange(b, device="cuda") % 4

            def kernel(mode: Mode = mode, x: Any = x, ids: Any = ids, banks: Any = banks,
                       index: Any = index) -> None:
                for bank in banks:
                    kernels.channel_gather_matmul(x, bank, index, ids, mode=mode)

            def dense(x: Any = x, banks: Any = banks) -> None:
                for bank in banks:
                    F.linear(x, bank[0])

            row: dict[str, Any] = {"kernel_us": timed(kernel, iters) * 1e3 / copies,
                   "dense_us": timed(dense, iters) * 1e3 / copies}
            tuner = kernels._TUNED.get(mode)
            row["config"] = (str(tuner.best_config) if tuner is not None and tuner.best_config
                             else None)
            if mode == "prefill":
                def one_bank(x: Any = x, ids: Any = ids, banks: Any = banks,
                             zeros: Any = zeros) -> None:
                    for bank in banks:
                        kernels.channel_gather_matmul(x, bank[:1], zeros, ids, mode="prefill")

                row["triton_dense_us"] = timed(one_bank, iters) * 1e3 / copies
            row["ratio"] = row["kernel_us"] / row["dense_us"]
            table[f"{mode} {o}x{i}"] = row
    return table


def one_line(error: BaseException) -> str:
    """A compiler's or launcher's error as one line: its first and last lines."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} | {lines[-1]}"
    return f"{type(error).__name__}: {text}"[:300]


def prefill_variants(iters: int, copies: int = 8, seq: int = 2048,
                     ) -> tuple[dict[str, Any], dict[tuple[int, int], tuple[str, Any]]]:
    """Every prefill kernel (the default, autotuned; each persistent variant with each of
    VARIANT_LAUNCHES) on each linear shape at `seq` tokens, K=2 banks, timed like per_shape; and,
    as a yardstick, "materialise": W_e gathered into a buffer on every call, then cuBLAS.
    Each is first checked against cuBLAS on the materialised expert weight. The fastest per shape
    is also timed on one dense bank (K=1, every index 0), to split the gather's cost from the
    GEMM's. A launch that fails is reported by its one-line error. Returns the JSON section and,
    per (out, in), the (variant, launch) of the variant fastest over the whole model."""
    import torch
    import torch.nn.functional as F

    from chmc.plugins.channel_gather_matmul import kernels

    runs: list[tuple[str, Any]] = [("materialise", None), ("default", None)] + [
        (v, kernels.Launch(*c)) for v in kernels.PREFILL_VARIANTS if v != "default"
        for c in VARIANT_LAUNCHES]

    def name(variant: str, launch: Any) -> str:
        if launch is None:
            return variant if variant == "materialise" else f"{variant} autotuned"
        return (f"{variant} {launch.block_m}x{launch.block_n}x{launch.block_k} "
                f"w{launch.num_warps} s{launch.num_stages}")

    shapes: dict[str, Any] = {}
    for o, i in sorted(set(LINEARS.values())):
        banks = [torch.randn(2, o, i, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(copies)]
        index = torch.randint(0, 2, (4, o), device="cuda", dtype=torch.int32)
        ids = torch.ones(1, dtype=torch.int64, device="cuda")
        x = torch.randn(1, seq, i, device="cuda", dtype=torch.bfloat16)
        w1 = banks[0][index[1].long(), torch.arange(o, device="cuda")]  # [out, in] expert 1's W
        want = F.linear(x, w1).float()  # [1, seq, out]

        def calls(variant: str, launch: Any, banks: Any = banks, index: Any = index,
                  x: Any = x, ids: Any = ids) -> Callable[[], Any]:
            """One step: the prefill of x through every bank in `banks`; returns the last y."""
            if variant == "materialise":
                _, n_out, n_in = banks[0].shape
                rows = index[1].long() * n_out + torch.arange(n_out, device="cuda")  # [out]
                buf = torch.empty(n_out, n_in, device="cuda", dtype=torch.bfloat16)  # W_e

                def gather_gemm() -> Any:
                    for bank in banks:
                        torch.index_select(bank.view(-1, n_in), 0, rows, out=buf)
                        y = F.linear(x, buf)
                    return y
                return gather_gemm

            # past "materialise", `variant` is one of the PREFILL_VARIANTS keys `runs` holds
            kernel_variant = cast("Variant", variant)

            def step() -> Any:
                for bank in banks:
                    y = kernels.channel_gather_matmul(x, bank, index, ids, mode="prefill",
                                                      variant=kernel_variant, launch=launch)
                return y
            return step

        def dense(x: Any = x, banks: Any = banks) -> None:
            for bank in banks:
                F.linear(x, bank[0])

        row: dict[str, Any] = {"dense_us": timed(dense, iters) * 1e3 / copies, "kernels": {}}
        fastest: tuple[float, str, Any] | None = None
        for variant, launch in runs:
            entry: dict[str, Any] = {"variant": variant}
            try:
                got = calls(variant, launch, banks=banks[:1])().float()
                entry["rel_error"] = ((got - want).abs().max() / want.abs().max()).item()
                entry["us"] = timed(calls(variant, launch), iters) * 1e3 / copies
                entry["ratio"] = entry["us"] / row["dense_us"]
                entry["wrong"] = entry["rel_error"] > 0.02  # bf16 products, fp32 sums: ~0.003
            except Exception as error:  # noqa: BLE001  a launch that fails is a finding
                entry["error"] = one_line(error)
            if variant == "default":
                tuner = kernels._TUNED.get("prefill")
                entry["config"] = str(tuner.best_config) if tuner is not None else None
            row["kernels"][name(variant, launch)] = entry
            if ("us" in entry and not entry["wrong"]
                    and (fastest is None or entry["us"] < fastest[0])):
                fastest = (entry["us"], variant, launch)
        if fastest is not None:
            _, variant, launch = fastest
            ones = [bank[:1] for bank in banks]
            us = timed(calls(variant, launch, banks=ones, index=torch.zeros_like(index)),
                       iters) * 1e3 / copies
            row["fastest"] = name(variant, launch)
            row["control_dense_bank"] = {"kernel": name(variant, launch), "us": us,
                                         "ratio": us / row["dense_us"]}
        try:  # a control: never the reason the variants' results are lost
            row["control_triton_dense"] = triton_dense_control(x, banks, iters, row["dense_us"])
        except Exception as error:  # noqa: BLE001
            row["control_triton_dense"] = {"error": one_line(error)}
        shapes[f"{o}x{i}"] = row
        print(json.dumps({"prefill_variants": shapes}), file=sys.stderr, flush=True)
    model, choice = model_prefill(shapes)
    return {"seq": seq, "copies": copies, "shapes": shapes, "model": model}, choice


def triton_dense_control(x: Any, banks: list[Any], iters: int, dense_us: float) -> dict[str, Any]:
    """The plain Triton TMA GEMM (triton_dense_gemm.py) on the dense weights cuBLAS runs: the
    ceiling of any Triton prefill kernel on this GPU. Each of CONTROL_LAUNCHES is checked against
    cuBLAS, then timed like the kernels; "ratio" is the fastest correct one's."""
    import torch
    import torch.nn.functional as F
    from triton_dense_gemm import dense_tma_gemm  # beside this script

    from chmc.plugins.channel_gather_matmul import kernels

    kernels._ensure_allocator()  # the descriptors' global scratch
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    y = torch.empty(*x.shape[:-1], banks[0].shape[1], device="cuda", dtype=x.dtype)
    want = F.linear(x, banks[0][0]).float()
    out: dict[str, Any] = {"launches": {}}
    for *dims, flatten in CONTROL_LAUNCHES:
        launch = kernels.Launch(*dims)
        key = "x".join(str(d) for d in dims[:3]) + f" w{dims[3]} s{dims[4]}" + " flat" * flatten
        try:
            dense_tma_gemm(x, banks[0][0], y, launch, sms, flatten)
            entry: dict[str, Any] = {
                "rel_error": ((y.float() - want).abs().max() / want.abs().max()).item()}
            if entry["rel_error"] <= 0.02:
                def step(launch: Any = launch, flatten: bool = flatten) -> None:
                    for bank in banks:
                        dense_tma_gemm(x, bank[0], y, launch, sms, flatten)
                entry["us"] = timed(step, iters) * 1e3 / len(banks)
                entry["ratio"] = entry["us"] / dense_us
        except Exception as error:  # noqa: BLE001  a launch that fails is a finding
            entry = {"error": one_line(error)}
        out["launches"][key] = entry
    timed_ok = [(e["ratio"], k) for k, e in out["launches"].items() if "ratio" in e]
    if timed_ok:
        out["ratio"], out["best"] = min(timed_ok)
    return out


def model_prefill(shapes: dict[str, Any],
                  ) -> tuple[dict[str, Any], dict[tuple[int, int], tuple[str, Any]]]:
    """Whole-model prefill from the per-shape timings: per variant, each shape's fastest correct
    launch (what autotuning over them would pick), summed over the linears of a layer. Also the
    per-shape launches of the fastest persistent variant, for a whole-model timing."""
    from chmc.plugins.channel_gather_matmul.kernels import Launch

    count = Counter(LINEARS.values())  # (out, in): linears of that shape per layer
    dense = sum(n * shapes[f"{o}x{i}"]["dense_us"] for (o, i), n in count.items())
    model: dict[str, Any] = {"dense_us": dense, "goal": GOALS["prefill"], "variants": {}}
    picks: dict[str, dict[tuple[int, int], tuple[float, str]]] = {}
    for (o, i) in count:
        for kname, entry in shapes[f"{o}x{i}"]["kernels"].items():
            if "us" in entry and not entry["wrong"]:
                prev = picks.setdefault(entry["variant"], {}).get((o, i))
                if prev is None or entry["us"] < prev[0]:
                    picks[entry["variant"]][(o, i)] = (entry["us"], kname)
    for variant, chosen in picks.items():
        if len(chosen) == len(count):  # a variant missing a shape has no model figure
            us = sum(n * chosen[shape][0] for shape, n in count.items())
            model["variants"][variant] = {"ratio": us / dense, "launches": {
                f"{o}x{i}": kname for (o, i), (_, kname) in chosen.items()}}
    if not model["variants"]:
        return model, {}
    def ratio(variant: str) -> float:
        return model["variants"][variant]["ratio"]

    model["best_variant"] = min(model["variants"], key=ratio)
    model["best_ratio"] = ratio(model["best_variant"])
    model["met"] = model["best_ratio"] <= GOALS["prefill"]
    persistent = [v for v in model["variants"] if v.startswith("persistent")]
    if not persistent:  # no persistent variant ran on every shape
        return model, {}
    model["best_persistent"] = fastest = min(persistent, key=ratio)
    choice: dict[tuple[int, int], tuple[str, Any]] = {}
    for shape, (_, kname) in picks[fastest].items():  # "variant BMxBNxBK wW sS" to a Launch
        dims, warps, stages = kname.split()[1:]
        m, n, k = (int(d) for d in dims.split("x"))
        choice[shape] = (fastest, Launch(m, n, k, int(warps[1:]), int(stages[1:])))
    return model, choice


def last_json(text: str) -> dict[str, Any] | None:
    """The last complete JSON object in `text` that starts a line: what the benchmark printed,
    whatever else shares the stream (TRITON_PRINT_AUTOTUNING writes its lines to stdout too)."""
    decoder = json.JSONDecoder()
    found = None
    for at in (i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")):
        try:
            value, _ = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found = value
    return found


def summarize(paths: list[str]) -> int:
    """Print the answer in a few lines from a run's output: the complete object in the first file,
    else (a run cut by its timeout) the last partial JSON line of any of them."""
    from pathlib import Path

    texts = [Path(p).read_text() if Path(p).exists() else "" for p in paths]
    found = [r for r in map(last_json, texts) if r is not None]
    if not found:
        print("gpu_kernels: no results in", " ".join(paths))
        return 1
    r = found[0]
    for name in GOALS:
        print(name, {k: v for k, v in r.get(name, {}).items() if "ratio" in k or "best" in k})
    pv = r.get("prefill_variants", {})
    for shape, row in pv.get("shapes", {}).items():
        print(f"prefill {shape}: fastest {row.get('fastest')}, dense bank control "
              f"{row.get('control_dense_bank', {}).get('ratio')}, plain Triton TMA GEMM "
              f"{row.get('control_triton_dense', {}).get('ratio')}")
        for kname, e in row["kernels"].items():
            print(f"    {kname}: " + (e.get("error") or f"{e['ratio']:.3f}x, rel error "
                                       f"{e['rel_error']:.1e}{' WRONG' if e['wrong'] else ''}"))
    model = pv.get("model", {})
    print("prefill model ratios:", {v: round(m["ratio"], 3) for v, m in
                                    model.get("variants", {}).items()},
          "best:", model.get("best_variant"), "best persistent:", model.get("best_persistent"))
    return 0


def bandwidth_gbps() -> float:
    """Achievable HBM bandwidth: a 2 GiB device-to-device copy (2 GiB read + 2 GiB written)."""
    import torch

    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), 10)
    return 2 * a.numel() / ms / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--per-shape", action="store_true",
                        help="also time each linear shape alone and report the autotuned configs")
    parser.add_argument("--prefill-variants", action="store_true",
                        help="first time every prefill kernel variant per shape (about a minute)")
    parser.add_argument("--summary", nargs="+", metavar="FILE",
                        help="only print a short summary of a run's JSON output (no GPU)")
    args = parser.parse_args()
    if args.summary:
        return summarize(args.summary)
    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device (this benchmark needs an NVIDIA GPU with Triton)",
              file=sys.stderr)
        return 2
    experts, groups = 4, 2
    w = make_weights(args.layers, experts, groups)
    one = torch.zeros(1, dtype=torch.int64, device="cuda")
    mixed_ids = torch.arange(16, device="cuda") % experts
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "layers": args.layers,
                              "experts": experts, "groups": groups, "dtype": "bfloat16"}
    choice: dict[tuple[int, int], tuple[str, Any]] = {}
    if args.prefill_variants:  # first: the question the next GPU session must answer
        result["prefill_variants"], choice = prefill_variants(args.iters)
        print(json.dumps(result), file=sys.stderr, flush=True)  # partial, in case of a timeout
    weight_bytes = sum(o * i for o, i in LINEARS.values()) * 2 * args.layers
    result["physical_limit_ms"] = weight_bytes / (bandwidth_gbps() * 1e6)

    x1 = inputs(1, 1)
    dense = timed(dense_step(w, x1), args.iters)
    result["decode"] = {"dense_ms": dense, "kernel_ms": timed(kernel_step(w, x1, one), args.iters),
                        "naive_gather_ms": timed(naive_gather_step(w, x1, 0), args.iters)}
    result["decode_fused"] = {"dense_ms": dense,
                              "kernel_ms": timed(fused_step(w, x1, one), args.iters)}
    print(json.dumps(result), file=sys.stderr, flush=True)  # partial, in case of a timeout
    xp = inputs(1, 2048)
    result["prefill"] = {"dense_ms": timed(dense_step(w, xp), max(5, args.iters // 4)),
                         "kernel_ms": timed(kernel_step(w, xp, one), max(5, args.iters // 4))}
    if choice:  # the whole model with the fastest persistent variant's per-shape launches
        r = result["prefill"]
        r["best_persistent"] = next(iter(choice.values()))[0]
        r["best_persistent_ms"] = timed(kernel_step(w, xp, one, choice=choice),
                                        max(5, args.iters // 4))
        r["best_persistent_ratio"] = r["best_persistent_ms"] / r["dense_ms"]
    print(json.dumps(result), file=sys.stderr, flush=True)  # partial, in case of a timeout
    x16 = inputs(16, 1)
    ensemble_rows = [torch.nonzero(mixed_ids == e).flatten() for e in range(experts)]
    members = [dense_step(w, x16, offset=e * args.layers // experts, rows=ensemble_rows[e])
               for e in range(experts)]
    result["mixed"] = {"dense_ms": timed(dense_step(w, x16), args.iters),
                       "kernel_ms": timed(kernel_step(w, x16, mixed_ids), args.iters),
                       "ensemble_ms": timed(lambda: [m() for m in members], args.iters),
                       "bank_select_ms": timed(bank_select_step(w, x16, mixed_ids), args.iters)}
    for rows in (8, 16):  # a router's batch or one tenant's burst: every row the same expert
        xr = inputs(rows, 1)
        same = torch.full((rows,), 1, dtype=torch.int64, device="cuda")
        result[f"one_expert_{rows}"] = {"dense_ms": timed(dense_step(w, xr), args.iters),
                                        "kernel_ms": timed(kernel_step(w, xr, same), args.iters)}
    print(json.dumps(result), file=sys.stderr, flush=True)  # partial, in case of a timeout
    if args.per_shape:
        result["per_shape"] = per_shape(args.iters)
    result["max_rel_error"] = check_numerics(w)  # after timing: autotuning keys on (out, in) only
    ok = True
    for name, goal in GOALS.items():
        r = result[name]
        r["ratio"] = r["kernel_ms"] / r["dense_ms"]
        r["goal"] = goal
        r["met"] = r["ratio"] <= goal
        ok &= r["met"]
    result["decode"]["physical_limit_ratio"] = (result["physical_limit_ms"]
                                                / result["decode"]["dense_ms"])
    print(json.dumps(result, indent=2))
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
