"""Triton Python-backend model: text in, text out, requests for every expert in one batch.

`chmc triton` copies this file to `<name>/1/model.py`. It runs inside Triton's
triton_python_backend_stub, where it needs only chmc's ONNX Runtime path (onnxruntime, numpy,
tokenizers): no torch, no transformers. Triton's dynamic batcher hands `execute` several
requests; their rows are run as one `runner.generate` call with per-row experts (one call per
distinct max_new_tokens). A bad request gets its own error response and never fails the others.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from chmc.runtime import load


class RequestError(ValueError):
    """A request the model cannot serve; becomes that request's error response."""


def _strings(request: Any, pb: Any, name: str) -> list[str]:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"missing input '{name}'")
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in tensor.as_numpy().reshape(-1)]
    except UnicodeDecodeError:
        raise RequestError(f"input '{name}' is not valid UTF-8") from None


def check_stub_numpy(stub: Path = Path("/proc/self/exe")) -> None:
    """Triton's Python backend stub hands tensors over through numpy's C API with pybind11, and a
    stub built with pybind11 < 2.12 (Triton 2.52 and older: numpy 2 is a known issue of those
    releases) misreads numpy 2 arrays, so every text request fails deep in
    triton_python_backend_utils. Such a stub names numpy's 1.x module `numpy.core` only; a newer
    one also knows `numpy._core`. Checked at load, so the model refuses to start with one line
    saying what to install instead of failing each request."""
    if int(np.__version__.split(".")[0]) < 2:
        return
    try:
        knows_numpy2 = b"numpy._core" in stub.read_bytes()
    except OSError:  # no /proc: nothing to check against
        return
    if not knows_numpy2:
        raise RuntimeError(
            f"{stub.resolve()} was built for numpy 1 and cannot exchange tensors with numpy "
            f"{np.__version__}: install numpy<2 in the model's Python environment")


class TritonPythonModel:
    """Loads the graph from the engine model's folder once; serves every expert from it."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb  # exists only inside Triton's Python stub

        check_stub_numpy()
        self.pb = pb
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        engine_dir = (version_dir / params["engine_dir"]).resolve()
        self.default_max_new = int(params.get("max_new_tokens", "64"))
        # The runtime reads one export folder: join the graph (engine model) and this model's
        # manifest and tokenizer there by symlink, so nothing is copied.
        self._joined = tempfile.TemporaryDirectory(prefix="chmc-triton-")
        joined = Path(self._joined.name)
        for folder in (version_dir, engine_dir):
            for f in folder.iterdir():
                if f.name not in ("model.py", "__pycache__") and not (joined / f.name).exists():
                    os.symlink(f.resolve(), joined / f.name)
        self.runner = load(joined, backend=params.get("backend", "onnxruntime"))
        self.experts = [str(e) for e in self.runner.experts]

    def _rows(self, request: Any) -> tuple[list[str], list[str], list[int]]:
        texts = _strings(request, self.pb, "text")
        experts = _strings(request, self.pb, "expert")
        if len(experts) != len(texts):
            raise RequestError(f"'expert' has {len(experts)} rows but 'text' has {len(texts)}")
        for e in experts:
            if e == "auto" and not self.runner.info.routed:
                raise RequestError("expert 'auto' needs a router, and this model has none: "
                                   f"name one of {self.experts}")
            if e not in self.experts and e != "auto":  # 'auto': the runtime routes the row
                raise RequestError(f"unknown expert '{e}': this model serves {self.experts}")
        limit = self.pb.get_input_tensor_by_name(request, "max_new_tokens")
        if limit is None:
            return texts, experts, [self.default_max_new] * len(texts)
        limits = [int(v) for v in limit.as_numpy().reshape(-1)]
        if len(limits) != len(texts) or min(limits) < 1:
            raise RequestError(f"'max_new_tokens' must be one positive value per row, got {limits}")
        return texts, experts, limits

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        errors: dict[int, Any] = {}  # request -> TritonError
        rows: list[tuple[int, str, str, int]] = []  # (request, prompt, expert, max_new_tokens)
        for i, request in enumerate(requests):
            try:
                rows += [(i, *row) for row in zip(*self._rows(request))]  # in row order
            except RequestError as e:  # the client's fault: 400
                errors[i] = pb.TritonError(str(e), pb.TritonError.INVALID_ARG)
        answers: dict[int, str] = {}  # row number in `rows` -> generated text
        for limit in sorted({r[3] for r in rows}):
            group = [n for n, r in enumerate(rows) if r[3] == limit and r[0] not in errors]
            if not group:
                continue
            try:
                texts = self.runner.generate([rows[n][1] for n in group],
                                             [rows[n][2] for n in group], max_new_tokens=limit)
            except Exception as e:  # noqa: BLE001  a failure fails this group's requests, not the server
                errors.update({rows[n][0]: pb.TritonError(f"generation failed: {e}")
                               for n in group})
                continue
            answers.update(zip(group, texts))
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb.InferenceResponse(output_tensors=[], error=errors[i]))
                continue
            texts = [answers[n] for n, r in enumerate(rows) if r[0] == i]
            out = np.array([[t.encode("utf-8")] for t in texts], dtype=object)  # [rows, 1]
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("text", out)]))
        return responses

    def finalize(self) -> None:
        self._joined.cleanup()
