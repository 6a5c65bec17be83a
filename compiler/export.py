"""Stage: artifact (or plain HF checkpoint) -> export folder (chmc.formats.export): one ONNX
decoder graph with `expert_id` as an input, or a dense graph for a checkpoint."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import onnx

from chmc.compiler.onnx_graph import write_model
from chmc.compiler.router import router_graph
from chmc.errors import ChmcError
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import Checkpoint, GenerationIds, copy_side_files, read_config
from chmc.formats.export import (
    DTYPES,
    LINEAR_FORMS,
    ExportManifest,
    ExportSection,
    write_export_manifest,
)
from chmc.formats.folders import open_folder
from chmc.formats.outputs import check_output_path, staged_output
from chmc.formats.weights import ModelWeights
from chmc.models.registry import describe
from chmc.models.router import Router
from chmc.progress import Stages


def export(src: str | Path, out: str | Path, *, linear: str = "gather", dtype: str = "float32",
           force: bool = False, progress: bool = True) -> Path:
    """Export an artifact (expert_id input) or a plain checkpoint (dense) to an ONNX folder;
    `progress`: a bar over the tensors written."""
    src = Path(src)
    if linear not in LINEAR_FORMS:
        raise ChmcError(f"--linear {linear!r} is not one of {list(LINEAR_FORMS)}")
    if dtype not in DTYPES:
        raise ChmcError(f"--dtype {dtype!r} is not one of {list(DTYPES)}")
    check_output_path(out, force, inputs=[src])
    folder = open_folder(src, expect=("artifact", "checkpoint"))
    assert isinstance(folder, (Artifact, Checkpoint))
    config = read_config(src)
    spec, cfg = describe(config)
    w = ModelWeights(folder)
    section = folder.manifest.router if isinstance(folder, Artifact) else None
    router = None
    if section is not None:
        router = partial(router_graph, weights=Router(src, section).weights, section=section)
    with staged_output(out, force, inputs=[src]) as tmp, \
            Stages(progress).bar(f"exporting {src.name}", len(w.names)) as advance:
        w.on_read = advance
        inputs, outputs = write_model(w, spec, cfg, tmp, linear=linear, dtype=dtype,
                                      router=router)
        copy_side_files(src, tmp)
        ids = GenerationIds.of(src, config)
        manifest = ExportManifest(experts=w.experts, router=section, export=ExportSection(
            source=str(src.resolve()), linear=linear if w.merged else "dense", dtype=dtype,
            architecture=cfg.architecture, num_layers=cfg.layers, num_kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, vocab_size=cfg.vocab, eos_token_ids=list(ids.eos),
            pad_token_id=ids.pad, inputs=inputs, outputs=outputs))
        write_export_manifest(tmp, manifest)
        try:
            onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)
        except onnx.checker.ValidationError as e:
            raise RuntimeError(f"exported graph fails onnx.checker: {e}") from e
    return Path(out)
