"""`chmc build` as one Python call: checkpoints -> artifact (-> router) (-> ONNX) (-> engine).

Each stage reads what the previous one wrote, so the same call can stop after any of them
(`target`). Everything that can be checked is checked before the first weight is read: the merge
request, the output path, the router data, TensorRT for `target="trt"`. The artifact and its
router are staged and appear at `out` complete or not at all; the exports are written into it
afterwards, each staged the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chmc.compiler.budget import apply_budget
from chmc.compiler.calibration import calibrate, check_device
from chmc.compiler.engine import build_engine
from chmc.compiler.export import export
from chmc.compiler.merge import build_threading, write_artifact
from chmc.compiler.mergekit_config import MergeConfig, load_merge_config, with_overrides
from chmc.compiler.plan import plan_build
from chmc.compiler.router import add_router, print_router_report
from chmc.errors import ChmcError
from chmc.formats.outputs import check_output_path, staged_output
from chmc.plugins.tensorrt import require_tensorrt
from chmc.progress import Stages, warn

# what each target adds inside the artifact folder
TARGET_FOLDERS: dict[str, tuple[str, ...]] = {"artifact": (), "onnx": ("onnx",),
                                              "trt": ("onnx-plugin", "engine")}
TARGETS = tuple(TARGET_FOLDERS)


def written(out: str | Path, target: str) -> list[Path]:
    """The folders a build with this target writes: the artifact, then its exports."""
    return [Path(out), *(Path(out) / name for name in TARGET_FOLDERS[target])]


def build(base: str | Path | None = None, experts: Mapping[str, str | Path] | None = None,
          out: str | Path = "", *, config: str | Path | None = None, groups: int | None = None,
          clustering: str | None = None, method: str | None = None,
          parameters: Mapping[str, Any] | None = None, seed: int | None = None,
          dtype: str | None = None, calibration: Mapping[str, str | Path] | None = None,
          budget: float | None = None, router_data: Mapping[str, str | Path] | None = None,
          target: str = "artifact", force: bool = False, strict: bool = False,
          progress: bool = True, device: str = "cpu") -> Path:
    """Channel-merge `experts` (name -> HF folder, in expert-id order) over `base` into an
    artifact at `out`; the options are `chmc build`'s (`config` a mergekit-style merge.yml whose
    values the others override). `strict`: an expert that does not look like a fine-tune of the
    base is an error, not a warning; `device`: where calibration runs the experts. Returns
    `out`."""
    if not str(out):
        raise ChmcError("no output folder: pass --out DIR")
    if target not in TARGETS:
        raise ChmcError(f"--target {target!r} is not one of {list(TARGETS)}")
    if target == "trt":
        require_tensorrt()  # before any work: without TensorRT nothing is written
    cfg = with_overrides(load_merge_config(config) if config else MergeConfig(),
                         base=None if base is None else str(base),
                         experts={k: str(v) for k, v in (experts or {}).items()},
                         parameters=dict(parameters or {}), groups=groups,
                         clustering=clustering, method=method, seed=seed, dtype=dtype,
                         budget=budget)
    check_device(device)
    if cfg.base is None:
        raise ChmcError("no base model: pass --base PATH (or base_model: in --config)")
    if cfg.groups is None and budget is None:
        raise ChmcError("no group count: pass --groups K (or groups: in --config)")
    inputs = [cfg.base, *cfg.experts.values(), *(calibration or {}).values(),
              *([config] if config else [])]
    out = check_output_path(out, force, inputs)
    routers = {name: Path(file) for name, file in (router_data or {}).items()}
    for name, file in routers.items():  # before merging: a typo costs nothing
        if name not in cfg.experts or not file.is_file():
            raise ChmcError(f"--router-data {name}={file}: " + (
                "no such file" if name in cfg.experts else f"'{name}' is not an expert"))
    stages = Stages(progress)
    with build_threading() as threads:
        k = cfg.groups if cfg.groups is not None else len(cfg.experts)  # a budget picks K <= N
        plan = plan_build(cfg.base, cfg.experts, groups=k,
                          clustering=cfg.clustering or "cosine", method=cfg.method or "mean",
                          parameters=cfg.merge_parameters(), seed=cfg.seed or 0, dtype=cfg.dtype,
                          calibration=calibration, budget=budget, strict=strict)
        for warning in plan.warnings:
            warn(warning)
        with staged_output(out, force, inputs) as tmp:
            plan = calibrate(plan, tmp / ".grams", stages, device)
            plan = apply_budget(plan, stages)
            write_artifact(plan, tmp, stages, threads)
            shutil.rmtree(tmp / ".grams", ignore_errors=True)
            if routers:
                section = add_router(tmp, routers)
                if progress:
                    print_router_report(section)
    folders = written(out, target)[1:]
    if target == "onnx":
        export(out, folders[0], force=force)
    if target == "trt":  # the plugin form, in the artifact's dtype (bfloat16 for fp32 sources)
        export(out, folders[0], linear="plugin", dtype=cfg.dtype or "bfloat16", force=force)
        build_engine(folders[0], folders[1], force=force)
    return out
