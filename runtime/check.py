"""`chmc check`: ONNX Runtime vs the PyTorch reconstruction of each expert, through Polygraphy.

For every expert: a few generated inputs (random ids, a left-padded row, explicit positions), run
by Polygraphy's OnnxrtRunner on the exported graph and by a runner around the transformers model
rebuilt from the artifact; Polygraphy's comparator checks the logits within atol/rtol.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from chmc.errors import ChmcError, MissingDependencyError

try:  # an optional dependency (chmc[check]): a one-line error where it is missing
    from polygraphy.backend.base import BaseRunner
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER
except ImportError:
    raise MissingDependencyError("chmc check needs `pip install polygraphy`") from None
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import Checkpoint
from chmc.formats.export import ExportFolder, ExportSection
from chmc.formats.folders import open_folder
from chmc.models.inputs import positions
from chmc.runtime.graph_state import NUMPY_DTYPES
from chmc.runtime.onnxruntime_backend import OnnxRuntimeOptions, session_for
from chmc.runtime.torch_backend import reconstruct

# (atol, rtol) on logits per graph dtype: float32 matches transformers' eager float32 closely;
# half precision rounds every activation (a float16 graph is within about 4e-2 of float32)
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-1, 5e-2), "bfloat16": (2.5e-1, 1e-1)}


def _inputs(export: ExportSection, expert: int | None, seq: int, seed: int) -> list[dict[str, Any]]:
    """Two batches: a full row, and a row left-padded by half its length (mask 0 there)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for pad in (0, seq // 2):
        ids = rng.integers(0, export.vocab_size, (1, seq), dtype=np.int64)
        mask = np.ones((1, seq), np.int64)
        mask[:, :pad] = 0
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        if expert is not None:
            feed["expert_id"] = np.array([expert], np.int64)
        for e in export.inputs:
            if e.name.startswith("past_key_values"):
                feed[e.name] = np.zeros((1, export.num_kv_heads, 0, export.head_dim),
                                        NUMPY_DTYPES.get(export.dtype, np.float32))
        feeds.append(feed)
    return feeds


def _torch_runner(model: Any, name: str) -> Any:
    """A Polygraphy runner around a transformers causal LM: the feed's ids, mask, positions in,
    logits out (only where the mask is 1: padded positions are undefined in both)."""

    class TorchLMRunner(BaseRunner):  # type: ignore[misc]
        def activate_impl(self) -> None: ...

        def deactivate_impl(self) -> None: ...

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for k in ("input_ids", "attention_mask", "position_ids"):
                meta.add(k, np.int64, ("batch", "sequence"))
            return meta

        def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
            args = {k: torch.from_numpy(feed_dict[k]) for k in
                    ("input_ids", "attention_mask", "position_ids")}
            start = time.perf_counter()
            with torch.no_grad():
                logits = model(**args).logits.float().numpy()
            self.inference_time = time.perf_counter() - start
            return {"logits": logits * feed_dict["attention_mask"][..., None]}

    return TorchLMRunner(name=name)


def _masked_onnx_runner(session: Any, name: str) -> Any:
    class MaskedOnnxrtRunner(OnnxrtRunner):  # type: ignore[misc]
        def infer_impl(self, feed_dict: dict[str, Any], *args: Any, **kw: Any) -> Any:
            out = super().infer_impl(feed_dict, *args, **kw)
            logits = np.asarray(out["logits"], dtype=np.float32)
            return {"logits": logits * feed_dict["attention_mask"][..., None]}

    return MaskedOnnxrtRunner(session, name=name)


def check_export(folder: ExportFolder, *, atol: float = 1e-4, rtol: float = 1e-4,
                 seq: int = 8, seed: int = 0) -> tuple[Table, bool]:
    """(rich table of pass/fail per expert, all passed)."""
    G_LOGGER.module_severity = G_LOGGER.WARNING  # the table below is the report
    export = folder.section
    src = Path(export.source)
    if not src.is_dir():
        raise ChmcError(f"{folder.path}: its source {src} is gone; check needs the artifact")
    source = open_folder(src, expect=("artifact", "checkpoint"))
    assert isinstance(source, (Artifact, Checkpoint))
    session = session_for(folder, OnnxRuntimeOptions(providers=("CPUExecutionProvider",)))
    experts: list[str | None] = [*folder.manifest.experts] or [None]
    table = Table(title=f"ONNX Runtime vs PyTorch reconstruction (atol {atol:g}, rtol {rtol:g})")
    for col in ("expert", "max |diff|", "result"):
        table.add_column(col)
    all_ok = True
    for n, name in enumerate(experts):
        eid = None if name is None else n
        model = reconstruct(source, eid, None if export.dtype == "float16" else "float32")
        runners = [_masked_onnx_runner(session, "onnxrt"), _torch_runner(model, "torch")]
        results = Comparator.run(runners, data_loader=_inputs(export, eid, seq, seed + n))
        ok = bool(Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol)))
        diff = max(float(np.abs(a["logits"] - b["logits"]).max())
                   for a, b in zip(results[0][1], results[1][1]))
        all_ok &= ok
        table.add_row(name or "(dense)", f"{diff:.2e}", "pass" if ok else "FAIL")
    return table, all_ok
