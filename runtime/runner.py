"""One loaded model serving every expert: `generate` runs a batch to completion, `stream` and
`submit` go through the step-level scheduler (requests join and leave the running batch at every
step). numpy only."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from chmc.errors import ChmcError
from chmc.formats.artifact import resolve_expert
from chmc.models.router import AUTO, ROUTED, no_router
from chmc.runtime.generation import Backend, ModelInfo, generate_ids
from chmc.runtime.scheduler import Limits, Listener, Scheduler, Sequence, ServingLoop

Stop = Callable[[list[int]], bool]


class Detokenizer:
    """The text of a growing list of new ids, given out in pieces: whole characters only (a byte
    tokenizer may end mid-character), EOS left out, cut before the first stop string."""

    def __init__(self, tokenizer: Any, eos_ids: tuple[int, ...], stop: list[str] | None):
        self.tokenizer, self.eos_ids, self.stop = tokenizer, eos_ids, stop or []
        self.ids: list[int] = []
        self.shown = ""

    def text(self, ids: list[int]) -> str:
        text = self.tokenizer.decode([t for t in ids if t not in self.eos_ids])
        cut = min((text.index(s) for s in self.stop if s in text), default=len(text))
        return str(text[:cut])

    def push(self, token: int) -> None:
        self.ids.append(token)

    def take(self) -> str:
        """The text the tokens pushed so far complete ("" while a character or a stop string
        is open)."""
        text = self.text(self.ids)
        if len(text) <= len(self.shown) or text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def add(self, token: int) -> str:
        self.push(token)
        return self.take()


class Runner:
    """One loaded model serving every expert. `limits` bound the scheduler's running batch and
    queue (used by `stream` and `submit`)."""

    def __init__(self, backend: Backend, info: ModelInfo, tokenizer: Any,
                 limits: Limits | None = None):
        self.backend, self.info, self.tokenizer = backend, info, tokenizer
        self.eos_ids, self.pad_id = info.ids.eos, info.ids.pad
        self.limits = limits or Limits()
        self._loop: ServingLoop | None = None
        self._loop_lock = threading.Lock()

    @property
    def experts(self) -> list[str]:
        return list(self.info.experts)

    @property
    def continuous(self) -> bool:
        """Whether the backend's batches can change between steps (the scheduler needs it)."""
        return bool(getattr(self.backend, "continuous", False))

    def expert_ids(self, experts: list[str | int] | None, rows: int) -> list[int]:
        """Resolve names/ids before any compute; a dense model serves only 'expert' 0."""
        if experts is None:
            if self.experts:
                raise ChmcError(f"this model serves {len(self.experts)} experts {self.experts}: "
                                "name one per prompt")
            return [0] * rows
        if len(experts) != rows:
            raise ChmcError(f"got {rows} prompts but {len(experts)} experts (one per prompt)")
        if not self.experts:
            raise ChmcError("this is a dense model without experts: pass experts=None")
        if AUTO in experts and not self.info.routed:
            raise no_router(self.info.source)
        return [ROUTED if e == AUTO else resolve_expert(self.experts, e) for e in experts]

    def _stopper(self, stop: list[str] | None) -> Stop | None:
        if not stop:
            return None
        return lambda ids: any(s in self.tokenizer.decode(ids) for s in stop)

    # -- a batch run to completion ----------------------------------------------------------------
    def generate_ids(self, prompts: list[list[int]], experts: list[str | int] | None = None,
                     max_new_tokens: int = 64, stop: Stop | None = None,
                     **kw: Any) -> list[list[int]]:
        """New token ids per row, EOS included when reached."""
        ids = self.expert_ids(experts, len(prompts))
        if not prompts:
            return []
        out: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        done = None if stop is None else (lambda row, new: stop(new))
        for token in generate_ids(self.backend, prompts, ids, max_new_tokens=max_new_tokens,
                                  eos_ids=self.eos_ids, pad_id=self.pad_id, done=done,
                                  rope_switch=self.info.rope_switch, **kw):
            for row, t in enumerate(token.tolist()):
                if not finished[row]:
                    out[row].append(t)
                    finished[row] = t in self.eos_ids
        return out

    def generate(self, prompts: list[str], experts: list[str | int] | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None) -> list[str]:
        """The continuation of each prompt (greedy at temperature 0), cut at EOS or a stop
        string; the prompts run as one batch to the end."""
        encoded = [self.tokenizer.encode(p) for p in prompts]
        new = self.generate_ids(encoded, experts, max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, stop=self._stopper(stop))
        return [Detokenizer(self.tokenizer, self.eos_ids, stop).text(ids) for ids in new]

    # -- requests through the scheduler -----------------------------------------------------------
    def sequence(self, prompt: str, expert: str | int | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, listener: Listener | None = None) -> Sequence:
        """A request for the scheduler, checked (expert, limits) before it is queued."""
        (expert_id,) = self.expert_ids(None if expert is None else [expert], 1)
        return Sequence(self.tokenizer.encode(prompt), expert_id, max_new_tokens, temperature,
                        top_p, seed, stop=self._stopper(stop), listener=listener)

    def loop(self) -> ServingLoop:
        """The scheduler's thread, started on first use."""
        with self._loop_lock:
            if self._loop is None:
                if not self.continuous:
                    raise ChmcError(f"{type(self.backend).__name__} cannot change its batch "
                                    "between steps: serve with the onnxruntime backend or the "
                                    "torch backend's merged model (merged=True)")
                self._loop = ServingLoop(Scheduler(self.backend, eos_ids=self.eos_ids,
                                                   pad_id=self.pad_id, limits=self.limits,
                                                   rope_switch=self.info.rope_switch))
            return self._loop

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request (BusyError when the queue is full); its listener hears each token."""
        return self.loop().submit(seq)

    def close(self) -> None:
        """Stop the scheduler's thread (requests still running finish with an error)."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def stream(self, prompt: str, expert: str | int | None = None, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
               seed: int | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as they are generated; the request
        shares the running batch with every other one. Leaving the loop early cancels it."""
        pieces = Detokenizer(self.tokenizer, self.eos_ids, stop)
        if not self.continuous:  # the per-expert transformers reference: one batch of one row
            for ids in self._alone(prompt, expert, max_new_tokens, temperature, top_p, stop,
                                   seed):
                if piece := pieces.add(ids):
                    yield piece
            return
        tokens: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        seq = self.submit(self.sequence(prompt, expert, max_new_tokens, temperature, top_p, stop,
                                        seed, listener=lambda s, t: tokens.put(t)))
        try:
            while (token := tokens.get()) is not None:
                if piece := pieces.add(token):
                    yield piece
            if seq.finish == "error":
                raise ChmcError(seq.error or "generation failed")
        finally:
            seq.cancel()  # a no-op once finished; frees the slot when the caller stopped early

    def _alone(self, prompt: str, expert: str | int | None, max_new_tokens: int,
               temperature: float, top_p: float, stop: list[str] | None,
               seed: int | None) -> Iterator[int]:
        stopper = self._stopper(stop)
        for token in generate_ids(
                self.backend, [self.tokenizer.encode(prompt)],
                self.expert_ids(None if expert is None else [expert], 1),
                max_new_tokens=max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                temperature=temperature, top_p=top_p, seed=seed,
                done=None if stopper is None else (lambda row, new: stopper(new)),
                rope_switch=self.info.rope_switch):
            yield int(token[0])
