"""The `chmc` command line: parses, validates and calls the Python API, nothing more.

Each command's body lives with its stage (chmc.compiler.*, chmc.runtime.*); this module only
maps options onto those calls. A ChmcError becomes one line on stderr and exit status 1.
Heavy imports (torch, transformers, onnx) happen inside commands, so `chmc --help` is instant.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer._click import exceptions as click_errors  # typer vendors click (pyproject pins it)

from chmc.compiler.report import inspect_artifact
from chmc.errors import ChmcError
from chmc.formats.artifact import RouterConfig
from chmc.formats.manifest import validated
from chmc.formats.outputs import check_output_file

app = typer.Typer(
    name="chmc",
    help="Deployment compiler for channel-merged experts: N fine-tunes -> K banks -> one graph.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a metavar, lines a terminal wraps itself
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a ChmcError into one line on stderr and a non-zero exit, with no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ChmcError as e:
            typer.echo(f"chmc: error: {e}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def experts_in_order(args: list[str]) -> list[str]:
    """`chmc build` arguments with every expert as its own `--experts NAME=PATH`, in the order
    written: after `--experts` several values may follow (`--experts a=P1 b=P2`), and bare
    NAME=PATH arguments are experts too. Click alone would keep options and arguments apart and
    lose their relative order, which is the expert ids' order."""
    if args[:1] != ["build"]:
        return args
    command = typer.main.get_command(app).commands["build"]  # type: ignore[attr-defined]
    flags = {o for p in command.params if getattr(p, "is_flag", False) for o in p.opts}
    out, takes_value, in_experts = [args[0]], False, False
    for arg in args[1:]:
        if takes_value:
            out.append(arg)
            takes_value = False
        elif arg.startswith("-"):
            name = arg.split("=", 1)[0]
            in_experts = arg == "--experts"
            takes_value = name not in flags and "=" not in arg and not in_experts
            if not in_experts:
                out.append(arg)
        else:  # an expert: after --experts, or bare
            out += ["--experts", arg]
    return out


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill` or a job timeout unwinds like Ctrl-C: staged outputs vanish


def main() -> None:
    """Run the CLI; a usage error (unknown option, a value of the wrong type) is one line too."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(args=experts_in_order(sys.argv[1:]), standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # `chmc` alone: the help, as click shows it
        typer.echo(e.format_message())
        sys.exit(e.exit_code)
    except click_errors.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        typer.echo(f"chmc: error: {where}{e.format_message()} (see --help)", err=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)  # without standalone mode, Exit(n) returns n


# Commands are added below, one small function each, grouped by stage.


# --- build, extract, inspect (compiler/merge.py, compiler/extract.py, compiler/report.py) ------

def _pairs(specs: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ChmcError(f"{what} '{spec}': expected NAME=VALUE")
        out[name] = value
    return out


Opt = typer.Option


@app.command()
@user_errors
def build(
    base: Annotated[str | None, Opt("--base", help="The base HF model folder.")] = None,
    experts: Annotated[list[str] | None, Opt(
        "--experts", help="NAME=PATH of a fine-tuned expert: a model folder or a PEFT LoRA/DoRA "
                          "adapter of --base (repeat, or list several); ids follow this order."
    )] = None,
    config: Annotated[str | None, Opt("--config", help="mergekit-style merge.yml.")] = None,
    groups: Annotated[int | None, Opt("--groups", "-k", help="K banks per row, 1..N.")] = None,
    clustering: Annotated[str | None, Opt(help="cosine (default) | error | output-error.")] = None,
    method: Annotated[str | None, Opt(
        help="mean|linear (default), task_arithmetic, ties, dare_ties, dare_linear, "
             "regmean.")] = None,
    density: Annotated[float | None, Opt(help="Kept fraction for ties/dare.")] = None,
    weight: Annotated[list[str] | None, Opt(help="NAME=W merge weight (repeat).")] = None,
    lambda_: Annotated[float | None, Opt("--lambda", help="Scale of the merged delta.")] = None,
    seed: Annotated[int | None, Opt(help="Seed of DARE's random drop (default 0).")] = None,
    dtype: Annotated[str | None, Opt(help="Output dtype (default: the source's).")] = None,
    out: Annotated[str, Opt("--out", help="Artifact folder to write.")] = "",
    force: Annotated[bool, Opt("--force", help="Replace --out if chmc wrote it (or it is empty).")
                     ] = False,
    strict: Annotated[bool, Opt("--strict", help="An expert that does not look like a fine-tune "
                                "of the base is an error, not a warning.")] = False,
    target: Annotated[str, Opt(
        help="artifact (default) | onnx: also export the graph into OUT/onnx | trt: also the "
             "plugin-form graph into OUT/onnx-plugin and a TensorRT engine into OUT/engine.")] = (
        "artifact"),
    calibration: Annotated[list[str] | None, Opt(
        "--calibration", help="NAME=prompts.jsonl per expert: activation-aware grouping/merging "
        "(--clustering output-error --method regmean).")] = None,
    budget: Annotated[float | None, Opt(
        help="Fraction of the ensemble's parameters; each tensor gets its own "
             "K <= --groups.")] = None,
    router_data: Annotated[list[str] | None, Opt(
        "--router-data", help="NAME=prompts.jsonl per expert (repeat the option): train a router "
                              "for expert 'auto'.")] = None,
    device: Annotated[str, Opt(help="Where --calibration runs the experts: cpu (default) | "
                               "cuda[:n].")] = "cpu",
) -> None:
    """Channel-merge N experts over their base into an artifact of K banks per row."""
    from chmc.compiler.pipeline import build as build_pipeline  # torch: only for this command
    from chmc.compiler.pipeline import written

    params: dict[str, Any] = {}
    if density is not None:
        params["density"] = density
    if lambda_ is not None:
        params["lambda"] = lambda_
    if weight:
        params["weight"] = {k: _float(v, f"--weight {k}")
                            for k, v in _pairs(weight, "--weight").items()}
    path = build_pipeline(
        base, _experts(experts or []), out, config=config,
        groups=groups, clustering=clustering, method=method, parameters=params, seed=seed,
        dtype=dtype, calibration=_pairs(calibration or [], "--calibration"), budget=budget,
        router_data=_pairs(router_data or [], "--router-data"), target=target,
        force=force, strict=strict, device=device)
    for folder in written(path, target):
        typer.echo(f"wrote {folder}")


def _experts(specs: list[str]) -> dict[str, str]:
    """['math=/a', 'code=/b'] -> {'math': '/a', 'code': '/b'}; a repeated name is an error."""
    experts: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ChmcError(f"expert '{spec}': expected NAME=PATH, e.g. math=./MetaMath-7B")
        if name in experts:
            raise ChmcError(f"duplicate expert name '{name}' ({experts[name]} and {path})")
        experts[name] = path
    return experts


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ChmcError(f"{what}: expected a number, got '{text}'") from None


@app.command()
@user_errors
def extract(
    artifact: Annotated[str, typer.Argument(help="Artifact folder (chmc build --out).")],
    expert: Annotated[str, Opt("--expert", help="Expert name or id.")],
    out: Annotated[str, Opt("--out", help="HF checkpoint folder to write.")],
    force: Annotated[bool, Opt("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Write one expert, as reconstructed from the artifact, as a plain Hugging Face checkpoint."""
    from chmc.compiler.extract import extract as extract_expert  # torch: only for this command

    typer.echo(f"wrote {extract_expert(artifact, expert, out, force=force)}")


@app.command()
@user_errors
def inspect(
    artifact: Annotated[str, typer.Argument(help="Artifact folder (chmc build --out).")],
    tensors: Annotated[bool, Opt("--tensors", help="Also list every tensor.")] = False,
) -> None:
    """Show an artifact's sizes, ratio to the ensemble and per-expert reconstruction error."""
    console = Console()
    for table in inspect_artifact(artifact, tensors=tensors):
        console.print(table)


# --- ONNX export, generation, checks (compiler/export.py, runtime/) -----------------------------

@app.command()
@user_errors
def router(
    artifact: Annotated[str, typer.Argument(help="Artifact folder to add the router to.")],
    data: Annotated[list[str], Opt("--data", help="NAME=prompts.jsonl of each expert (repeat).")],
    epochs: Annotated[int, Opt(help="Training epochs.")] = 10,
    dim: Annotated[int, Opt(help="Embedding size.")] = 32,
    holdout: Annotated[float, Opt(help="Share of prompts held out for the accuracy.")] = 0.2,
) -> None:
    """Train a task router (expert 'auto') from example prompts and store it in ARTIFACT."""
    from chmc.compiler.router import add_router, print_router_report  # torch: only for this

    files = {k: Path(v) for k, v in _pairs(data, "--data").items()}
    config = validated(RouterConfig, "chmc router", dim=dim, epochs=epochs, holdout=holdout)
    print_router_report(add_router(artifact, files, config))


@app.command()
@user_errors
def export(
    source: Annotated[str, typer.Argument(help="Artifact folder, or a plain HF folder (dense).")],
    out: Annotated[str, Opt("--out", help="Export folder to write.")],
    linear: Annotated[str, Opt(
        help="gather (default) | select | plugin (chmc::ChannelGatherMatMul: TensorRT's graph, "
             "and the fastest on CPU with its native ONNX Runtime kernel).")] = "gather",
    dtype: Annotated[str, Opt(help="float32 (default, CPU) | float16 | bfloat16.")] = "float32",
    force: Annotated[bool, Opt("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Export to one ONNX graph that serves every expert through its `expert_id` input."""
    from chmc.compiler.export import export as export_onnx  # torch and onnx: only for this

    typer.echo(f"wrote {export_onnx(source, out, linear=linear, dtype=dtype, force=force)}")


@app.command()
@user_errors
def run(
    source: Annotated[str, typer.Argument(help="Export folder, artifact or HF folder.")],
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    expert: Annotated[str | None, Opt("--expert", help="Expert name or id.")] = None,
    backend: Annotated[str, Opt(
        help="onnxruntime (default) | torch | tensorrt (an engine folder).")] = "onnxruntime",
    device: Annotated[str | None, Opt(help="torch backend: cpu (default) | cuda (one merged model, "
                                           "Triton kernels, CUDA-graph decode).")] = None,
    compile_: Annotated[str | None, Opt("--compile", help=(
        "torch backend's merged model: compile its decode step with this torch.compile "
        "backend (inductor), fusing norms, RoPE and casts between the gather-matmuls."))] = None,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", "-n")] = 64,
    temperature: Annotated[float, Opt(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, Opt("--top-p")] = 1.0,
    stop: Annotated[list[str] | None, Opt("--stop", help="Stop string (repeat).")] = None,
    seed: Annotated[int | None, Opt(help="Sampling seed.")] = None,
) -> None:
    """Stream one expert's continuation of PROMPT."""
    from chmc.api import load  # an artifact is exported first: the compiler, torch

    torch_options = {k: v for k, v in (("device", device), ("compile", compile_)) if v}
    for option in torch_options:
        if backend != "torch":
            raise ChmcError(f"--{option} is an option of --backend torch, not {backend}")
    runner = load(source, backend=backend, **torch_options)
    for piece in runner.stream(prompt, expert, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, stop=stop, seed=seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@user_errors
def check(
    source: Annotated[str, typer.Argument(help="Export folder or artifact.")],
    atol: Annotated[float | None, Opt(
        help="Absolute tolerance on logits (default by the graph's dtype: float32 1e-4, "
             "float16 0.1, bfloat16 0.25).")] = None,
    rtol: Annotated[float | None, Opt(
        help="Relative tolerance on logits (default: float32 1e-4, float16 0.05, "
             "bfloat16 0.1).")] = None,
    seq: Annotated[int, Opt(help="Tokens per generated input.")] = 8,
) -> None:
    """Compare ONNX Runtime with the PyTorch reconstruction of every expert (Polygraphy)."""
    from chmc.api import check as check_source  # torch and transformers: only for this

    tolerances, table, ok = check_source(source, atol=atol, rtol=rtol, seq=seq)
    typer.echo(tolerances)
    Console().print(table)
    if not ok:
        raise typer.Exit(1)


# --- Triton model repository, serving (compiler/triton_repo.py, runtime/serve.py) ---------------

@app.command()
@user_errors
def triton(
    source: str = typer.Argument(..., help="Artifact, export folder or engine folder."),
    out: str = typer.Option(..., "--out", help="Model repository folder to write."),
    backend: str = typer.Option(
        "onnxruntime", "--backend",
        help="onnxruntime (CPU; an artifact is exported first) | tensorrt (an engine folder) | "
             "torch (an artifact, on CUDA: Triton kernels, CUDA graphs)."),
    scheduling: str = typer.Option(
        "continuous", "--scheduling",
        help="continuous (requests join the running batch at every step; tokens stream) | "
             "request (the dynamic batcher's batches run to completion)."),
    slots: int = typer.Option(16, "--slots", help="Continuous: rows in the running batch."),
    kv_tokens: int = typer.Option(16384, "--kv-tokens",
                                  help="Continuous: cache tokens reserved by running requests "
                                       "(prompt + max_tokens each)."),
    queue: int = typer.Option(64, "--queue",
                              help="Continuous: waiting requests before 'server busy'."),
    stream_interval_ms: float = typer.Option(
        20.0, "--stream-interval-ms",
        help="Continuous: least time between two streamed responses of a request (0: one per "
             "text piece; the first piece is sent at once)."),
    device: str = typer.Option("cuda", "--device", help="torch backend: the CUDA device."),
    name: str = typer.Option("chmc", "--name", help="Text model name; the graph is NAME_engine."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Write a Triton model repository: a text-in, text-out model serving every expert."""
    from chmc.compiler.triton_repo import (  # an artifact needs the exporter
        TextModelOptions,
        write_triton_repo,
    )

    options = TextModelOptions(scheduling=scheduling, slots=slots, kv_tokens=kv_tokens,
                               queue=queue, stream_interval_ms=stream_interval_ms, device=device)
    written = write_triton_repo(source, out, backend=backend, name=name, force=force,
                                options=options)
    typer.echo(f"wrote {written}")


@app.command()
@user_errors
def serve(
    source: str = typer.Argument(..., help="Triton model repository, artifact or export folder."),
    port: int = typer.Option(8000, "--port", help="HTTP port (gRPC gets PORT+1)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    tritonserver: str | None = typer.Option(None, "--tritonserver", help="tritonserver binary."),
    model: Annotated[list[str] | None, Opt(
        "--model", help="Load only this model (repeat); default: every model.")] = None,
) -> None:
    """Run tritonserver on a model repository until Ctrl-C."""
    from chmc.api import serve as run_server  # an artifact needs the compiler

    run_server(source, port=port, host=host, tritonserver=tritonserver, models=model or None)


# --- TensorRT engine (compiler/engine.py) --------------------------------------------------------

def _range(text: str, what: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ChmcError(f"{what} '{text}': expected MIN,OPT,MAX (three integers)")
    lo, opt, hi = (int(p) for p in parts)
    return lo, opt, hi


@app.command()
@user_errors
def engine(
    onnx_dir: Annotated[str, typer.Argument(help="Export folder (chmc export --linear plugin).")],
    out: Annotated[str, Opt("--out", help="Engine folder to write (model.plan, engine.json).")],
    batch: Annotated[str, Opt(help="Batch size MIN,OPT,MAX.")] = "1,1,8",
    seq: Annotated[str, Opt(
        help="New tokens per step MIN,OPT,MAX (prefill profile).")] = "1,128,2048",
    past: Annotated[str, Opt(help="Cached tokens MIN,OPT,MAX.")] = "0,256,2048",
    force: Annotated[bool, Opt("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Build a TensorRT engine (strongly typed, prefill + decode profiles) through Polygraphy."""
    from chmc.compiler.engine import Ranges, build_engine  # onnx: only for this command

    ranges = Ranges(_range(batch, "--batch"), _range(seq, "--seq"), _range(past, "--past"))
    typer.echo(f"wrote {build_engine(onnx_dir, out, ranges=ranges, force=force)}")


# --- tiny expert families, evaluation, demo (models/tiny/family.py, runtime/evaluate.py, demo.py)

family_app = typer.Typer(
    help="Expert families made here: the tiny trained ones (distinct, conflict, distinct8) and "
         "synthetic ones at real sizes.",
    no_args_is_help=True)
app.add_typer(family_app, name="family")


@family_app.command("build")
@user_errors
def family_build(
    name: Annotated[str, typer.Argument(
        help="distinct | conflict | distinct8 (experts learn their task from scratch), or the "
             "same with -ft (the fine-tune regime: experts within a few percent of the base).")],
    out: Annotated[str | None, Opt("--out", help="Folder to write (default: the cache).")] = None,
    force: Annotated[bool, Opt("--force", help="Rebuild even if present.")] = False,
) -> None:
    """
    Train (or take from $CHMC_CACHE) a tiny family: base/, experts/<task>/, tasks/<task>/*.jsonl.
    """
    from chmc.models.tiny.family import family  # torch: only for this command

    fam = family(name, out, force=force)
    typer.echo(f"{fam.path}  (built in {fam.info['build_seconds']} s)")
    for task, e in fam.info["experts"].items():
        delta = e.get("delta")  # families cached before the delta statistics have none
        moved = (f"; ||expert - base|| / ||base|| per tensor {delta['min']:.1%} to "
                 f"{delta['max']:.1%}, median {delta['median']:.1%}" if delta else "")
        base = fam.info.get("base", {}).get("validation", {}).get(task)  # recorded since -ft
        was = f" (the base: {base:.3f})" if base is not None else ""
        typer.echo(f"  {task}: validation exact match {e['validation']:.3f}{was} after "
                   f"{e['steps']} steps{moved}")


@family_app.command("synth")
@user_errors
def family_synth(
    shape: Annotated[str, Opt("--shape", help="llama-3.2-1b | qwen2.5-1.5b | mistral-7b | "
                              "llama-3.1-8b | tinyllama-1.1b.")],
    out: Annotated[str, Opt("--out", help="Folder to write: base/, experts/expert_<i>/.")],
    experts: Annotated[int, Opt("--experts", help="How many experts.")] = 4,
    layers: Annotated[int | None, Opt("--layers", help="Fewer decoder layers (default: the "
                                      "model's own).")] = None,
    seed: Annotated[int, Opt("--seed")] = 0,
    force: Annotated[bool, Opt("--force", help="Replace a family chmc wrote there.")] = False,
) -> None:
    """
    Write a synthetic family at a real model's size: its hub config and tensor names, bf16 shards,
    a byte-level tokenizer, random weights with fine-tune-shaped expert deltas (no download).
    """
    from chmc.models.synth import synth_family  # torch and transformers: only for this command

    typer.echo(synth_family(shape, experts, out, layers=layers, seed=seed, force=force))


@app.command("eval")
@user_errors
def eval_(
    source: Annotated[str, typer.Argument(help="HF model folder or chmc artifact.")],
    tasks: Annotated[list[str], typer.Argument(
        metavar="[NAME=]FILE.jsonl...", help="Task files ({prompt, answer} lines).")],
    expert: Annotated[list[str] | None, Opt(
        "--expert", help="Artifact expert (repeat; default all).")] = None,
    json_out: Annotated[str | None, Opt("--json", help="Write the results as JSON here.")] = None,
    plot: Annotated[str | None, Opt(
        "--plot", help="Draw accuracy vs stored parameters (PNG).")] = None,
) -> None:
    """Greedy exact match and mean answer NLL on JSONL tasks, as a table (and JSON, a plot)."""
    from chmc.runtime.evaluate import (  # torch and transformers: only for this command
        evaluate,
        parse_task_args,
        plot_accuracy,
        print_report,
    )

    for file, what in ((json_out, "--json"), (plot, "--plot")):
        if file:  # before the evaluation, not after it
            check_output_file(file, what)
    report = evaluate(source, parse_task_args(tasks), experts=expert)
    print_report(report)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    if plot:
        ratio = report["ratio_to_ensemble"]
        mean = 100 * sum(r["exact_match"] for r in report["results"]) / len(report["results"])
        plot_accuracy([(Path(source).name, report["stored_parameters"], mean)], plot,
                      title="" if ratio is None else f"{100 * ratio:.1f}% of the ensemble")


@app.command()
@user_errors
def demo(
    out: Annotated[str | None, Opt(
        "--out", help="Work folder (default: $CHMC_CACHE/demo).")] = None,
) -> None:
    """
    From nothing: train (or reuse) the tiny families, merge them, print the quality table.
    """
    from chmc.demo import run_demo  # the whole stack

    run_demo(out)
