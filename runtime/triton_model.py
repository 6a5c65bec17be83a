"""Triton Python-backend model: text in, text out, every expert served from one loaded model.

`chmc triton` copies this file to `<name>/1/model.py`. It runs inside Triton's
triton_python_backend_stub, where the ONNX Runtime path needs only onnxruntime, numpy and
tokenizers (the torch backend needs torch and a GPU). Its config's parameters say which backend
loads the model and how requests are scheduled:

- `continuous` (decoupled): each request joins the running batch at the next decode step and
  leaves when it finishes (chmc.runtime.scheduler); with `stream` true it gets one response per
  text piece, then a final flag; else one response with the whole text. Triton's HTTP
  `generate` / `generate_stream` endpoints and gRPC streaming work with the input names.
- `request`: the dynamic batcher hands `execute` several requests; they run as one batch to
  completion (`runner.generate`), the way the text model worked before the scheduler.

A bad request gets its own error response and never fails the others.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chmc.errors import ChmcError
from chmc.runtime import load
from chmc.runtime.runner import Detokenizer
from chmc.runtime.scheduler import BusyError, Limits, Sequence

CANCEL_CHECK_S = 0.02


class RequestError(ValueError):
    """A request the model cannot serve; becomes that request's error response."""


@dataclass(frozen=True)
class Row:
    """One prompt of a request, with its generation parameters."""

    text: str
    expert: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool

    def batch_key(self) -> tuple[Any, ...]:
        """Rows that can share one `runner.generate` call (request scheduling)."""
        return self.max_tokens, self.temperature, self.top_p, self.seed, self.stop


def _strings(request: Any, pb: Any, name: str, required: bool = True) -> list[str] | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise RequestError(f"missing input '{name}'")
        return None
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in tensor.as_numpy().reshape(-1)]
    except UnicodeDecodeError:
        raise RequestError(f"input '{name}' is not valid UTF-8") from None


def _numbers(request: Any, pb: Any, name: str, rows: int) -> list[Any] | None:
    """One value per row (a single value applies to every row), or None when left out."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1).tolist()
    if len(values) == 1:
        values = values * rows
    if len(values) != rows:
        raise RequestError(f"'{name}' has {len(values)} values for {rows} rows")
    return values


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
    """Loads the model once (graph from the engine model's folder, or the artifact for torch)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb  # exists only inside Triton's Python stub

        check_stub_numpy()
        self.pb = pb
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.default_max_new = int(params.get("max_new_tokens", "64"))
        self.scheduling = params.get("scheduling", "continuous")
        self.stream_interval = float(params.get("stream_interval_ms", "0")) / 1000
        limits = Limits(slots=int(params.get("slots", "16")),
                        tokens=int(params.get("kv_tokens", "16384")),
                        queue=int(params.get("queue", "64")))
        backend = params.get("backend", "onnxruntime")
        self._joined: Any = None
        try:
            if backend == "torch":  # the artifact itself, served by the merged torch model
                self.runner = load(version_dir / params["artifact_dir"], backend="torch",
                                   device=params.get("device", "cuda"), merged=True)
            else:
                self.runner = load(self._join(version_dir, params["engine_dir"]), backend=backend)
        except ChmcError as e:  # one line in Triton's log: the model fails to load
            raise RuntimeError(f"chmc: {e}") from None
        self.runner.limits = limits
        self.experts = [str(e) for e in self.runner.experts]

    def _join(self, version_dir: Path, engine_dir: str) -> Path:
        """The runtime reads one export folder: join the graph (engine model) and this model's
        manifest and tokenizer there by symlink, so nothing is copied."""
        self._joined = tempfile.TemporaryDirectory(prefix="chmc-triton-")
        joined = Path(self._joined.name)
        for folder in (version_dir, (version_dir / engine_dir).resolve()):
            for f in folder.iterdir():
                if f.name not in ("model.py", "__pycache__") and not (joined / f.name).exists():
                    os.symlink(f.resolve(), joined / f.name)
        return joined

    def _rows(self, request: Any) -> list[Row]:
        pb = self.pb
        texts = _strings(request, pb, "text_input")
        assert texts is not None
        n = len(texts)
        experts = _strings(request, pb, "expert", required=False)
        if experts is not None and len(experts) == 1:
            experts = experts * n
        if experts is not None and len(experts) != n:
            raise RequestError(f"'expert' has {len(experts)} rows but 'text_input' has {n}")
        for e in experts or []:
            if e == "auto" and not self.runner.info.routed:
                raise RequestError("expert 'auto' needs a router, and this model has none: "
                                   f"name one of {self.experts}")
            if e not in self.experts and e != "auto":
                raise RequestError(f"unknown expert '{e}': this model serves {self.experts}")
        if experts is None and self.experts:
            raise RequestError(f"missing input 'expert': this model serves {self.experts}")
        limits = _numbers(request, pb, "max_tokens", n) or [self.default_max_new] * n
        if min(limits) < 1:
            raise RequestError(f"'max_tokens' must be positive, got {limits}")
        temps = _numbers(request, pb, "temperature", n) or [0.0] * n
        if not all(t >= 0 for t in temps):  # NaN too
            raise RequestError(f"'temperature' must be >= 0, got {temps}")
        top_ps = _numbers(request, pb, "top_p", n) or [1.0] * n
        if not all(0 < p <= 1 for p in top_ps):
            raise RequestError(f"'top_p' must be in (0, 1], got {top_ps}")
        seeds = _numbers(request, pb, "seed", n) or [None] * n
        stop = tuple(s for s in _strings(request, pb, "stop", required=False) or [] if s)
        stream = _numbers(request, pb, "stream", n) or [False] * n
        return [Row(t, None if experts is None else experts[i], int(limits[i]),
                    float(temps[i]), float(top_ps[i]), None if seeds[i] is None else int(seeds[i]),
                    stop, bool(stream[i])) for i, t in enumerate(texts)]

    def _response(self, text: str) -> Any:
        out = np.array([text.encode("utf-8")], dtype=object)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("text_output", out)])

    def _error(self, message: str, code: Any = None) -> Any:
        pb = self.pb
        error = pb.TritonError(message, pb.TritonError.INVALID_ARG if code is None else code)
        return pb.InferenceResponse(output_tensors=[], error=error)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.scheduling == "request":
            return self._execute_batch(requests)
        for request in requests:
            self._start(request, request.get_response_sender())
        return None

    # -- continuous: one sequence per request, responses sent from the scheduler's thread --------
    def _start(self, request: Any, sender: Any) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            rows = self._rows(request)
            if len(rows) != 1:
                raise RequestError(f"a streaming request carries one prompt, got {len(rows)}")
            (row,) = rows
            seq = self.runner.sequence(row.text, row.expert, row.max_tokens, row.temperature,
                                       row.top_p, list(row.stop), row.seed,
                                       listener=self._listener(sender, row))
            self.runner.submit(seq)
        except BusyError as e:
            sender.send(self._error(str(e), pb.TritonError.UNAVAILABLE), flags=final)
        except (RequestError, ChmcError) as e:  # the client's fault: 400
            sender.send(self._error(str(e)), flags=final)

    def _listener(self, sender: Any, row: Row) -> Any:
        """Sends a streaming request's text as it grows: the first piece at once, then at most
        one response per `stream_interval` (a response per token costs more than a step of a
        small model), the rest with the final flag. Whether the client is gone is asked every
        CANCEL_CHECK_S (each question is a round trip to the server)."""
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        pieces = Detokenizer(self.runner.tokenizer, self.runner.eos_ids, list(row.stop))
        sent = checked = 0.0  # when a piece was last sent, when cancellation was last asked

        def hear(seq: Sequence, token: int | None) -> None:
            nonlocal sent, checked
            if token is not None:
                pieces.push(token)
                now = time.monotonic()
                if now - checked >= CANCEL_CHECK_S:
                    checked = now
                    if sender.is_cancelled():  # the client has gone: the slot frees next step
                        raise ConnectionAbortedError
                if row.stream and now - sent >= self.stream_interval and (piece := pieces.take()):
                    sender.send(self._response(piece))
                    sent = now
            elif seq.finish == "error":
                sender.send(self._error(seq.error or "generation failed", pb.TritonError.INTERNAL),
                            flags=final)
            elif seq.finish == "cancelled":
                sender.send(flags=final)
            else:  # the rest of the text rides on the final response
                piece = pieces.take()
                text = piece if row.stream else pieces.shown
                sender.send(self._response(text) if text or not row.stream else None,
                            flags=final)

        return hear

    # -- request: a batch of requests run to completion together --------------------------------
    def _execute_batch(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        errors: dict[int, Any] = {}  # request -> error response
        rows: list[tuple[int, Row]] = []
        for i, request in enumerate(requests):
            try:
                rows += [(i, row) for row in self._rows(request)]
            except RequestError as e:
                errors[i] = self._error(str(e))
        answers: dict[int, str] = {}  # row number in `rows` -> generated text
        for key in dict.fromkeys(r.batch_key() for _, r in rows):
            group = [n for n, (i, r) in enumerate(rows) if r.batch_key() == key
                     and i not in errors]
            if not group:
                continue
            first = rows[group[0]][1]
            try:
                texts = self.runner.generate(
                    [rows[n][1].text for n in group],
                    None if first.expert is None else [rows[n][1].expert or "" for n in group],
                    max_new_tokens=first.max_tokens, temperature=first.temperature,
                    top_p=first.top_p, stop=list(first.stop) or None, seed=first.seed)
            except Exception as e:  # noqa: BLE001  fails this group's requests, not the server
                errors.update({rows[n][0]: self._error(f"generation failed: {e}",
                                                       pb.TritonError.INTERNAL) for n in group})
                continue
            answers.update(zip(group, texts))
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(errors[i])
                continue
            texts = [answers[n] for n, (j, _) in enumerate(rows) if j == i]
            out = np.array([[t.encode("utf-8")] for t in texts], dtype=object)  # [rows, 1]
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("text_output", out)]))
        return responses

    def finalize(self) -> None:
        self.runner.close()
        if self._joined is not None:
            self._joined.cleanup()
