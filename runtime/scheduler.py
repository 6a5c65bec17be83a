"""Step-level scheduling: requests join and leave the running batch at every decode step.

A `Scheduler` keeps one running batch on a backend whose states can drop rows (`keep`) and take
in the rows of another state (`join`). Each `step()`:
  1. rows whose request was cancelled leave;
  2. the running rows decode one token (one call for every row, each with its own expert);
  3. waiting requests that fit (free slots, the KV token budget) are admitted: their prompts run
     as one prefill, which gives their first token, and their cache joins the running batch;
  4. rows that finished (EOS, max_new_tokens, a stop condition) leave.
Rows are left-padded to the batch's cache width, as `generate_ids` pads a batch, so a row's
positions, mask and greedy tokens are the same whatever else shares its batch. A row of a longrope
model that passes `rope_switch` is re-admitted with its tokens so far (its cache is recomputed
with the long factors, as transformers' generate does).

`ServingLoop` runs a scheduler on a thread for callers on other threads (the Triton model,
`Runner.stream`). numpy only.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from chmc.errors import ChmcError, NotSupportedError
from chmc.models.inputs import left_pad, positions
from chmc.runtime.generation import Backend, StepState, sample


class BusyError(ChmcError):
    """The waiting queue is full: the request is refused at once rather than left to hang."""


@runtime_checkable
class BatchState(StepState, Protocol):
    def keep(self, rows: np.ndarray, width: int) -> None:
        """Keep only `rows` and the last `width` cache columns."""

    def join(self, other: Any, width: int) -> None:
        """Append `other`'s rows; both caches left-padded to `width` columns."""


@dataclass(frozen=True)
class Limits:
    """`slots`: rows in the running batch; `tokens`: the KV budget, prompt + max_new_tokens summed
    over the running rows (a request is admitted only when its whole generation fits);
    `queue`: waiting requests, beyond which `submit` raises BusyError."""

    slots: int = 16
    tokens: int = 16384
    queue: int = 64

    def __post_init__(self) -> None:
        for name in ("slots", "tokens", "queue"):
            if getattr(self, name) < 1:
                raise ChmcError(f"scheduler limit {name}={getattr(self, name)}: must be >= 1")


Listener = Callable[["Sequence", "int | None"], None]  # a new token, or None once finished


@dataclass(eq=False)
class Sequence:
    """One request: its prompt ids, expert id (ROUTED: the router picks), sampling, and what it
    has generated so far. `stop(new_ids)` ends it early (stop strings); `listener` hears each
    token and then None, on the scheduler's thread. `finish`: eos | length | stop | cancelled |
    error (then `error` says why)."""

    prompt: list[int]
    expert: int
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Callable[[list[int]], bool] | None = None
    listener: Listener | None = None
    new: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ChmcError("a prompt encodes to no tokens; give at least one character")
        if self.max_new_tokens < 1:
            raise ChmcError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ChmcError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ChmcError(f"temperature must be >= 0, got {self.temperature}")
        self.rng = np.random.default_rng(self.seed)

    @property
    def need(self) -> int:
        """Cache tokens this request may hold: the KV budget it reserves."""
        return len(self.prompt) + self.max_new_tokens

    def cancel(self) -> None:
        """Ask the scheduler to drop this request; it leaves at the next step."""
        self.cancelled = True

    def _tell(self, token: int | None) -> None:
        if self.listener is None:
            return
        try:
            self.listener(self, token)
        except Exception:  # noqa: BLE001  a consumer that cannot take tokens has gone away
            self.cancelled = True


class Scheduler:
    """The running batch of one backend and its queue: `submit` from any thread, `step` from
    one."""

    def __init__(self, backend: Backend, *, eos_ids: tuple[int, ...], pad_id: int,
                 limits: Limits | None = None, rope_switch: int | None = None):
        self.backend, self.eos_ids, self.pad_id = backend, eos_ids, pad_id
        self.limits = limits or Limits()
        self.rope_switch = rope_switch
        self.cond = threading.Condition()  # guards `waiting`; submit() wakes a waiting loop
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # the running batch, in cache row order
        self.admitting: list[Sequence] = []  # out of the queue, not yet in the batch
        self.state: BatchState | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, T]: the cache columns each row uses
        self.pos = np.zeros(0, dtype=np.int64)  # [B]: position of each row's next input
        self.next = np.zeros(0, dtype=np.int64)  # [B]: the token each row feeds next
        self.steps = 0  # decode and prefill calls made, for tests and benchmarks

    # -- the queue -------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        if seq.need > self.limits.tokens:
            raise ChmcError(f"the request needs {seq.need} cache tokens (prompt {len(seq.prompt)} "
                            f"+ max_new_tokens {seq.max_new_tokens}), more than the server's "
                            f"budget of {self.limits.tokens}")
        with self.cond:
            if len(self.waiting) >= self.limits.queue:
                raise BusyError(f"server busy: {len(self.waiting)} requests are waiting (the "
                                "queue limit); retry later")
            self.waiting.append(seq)
            self.cond.notify_all()
        return seq

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def wait_for_work(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(self.has_work, timeout)

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        """Decode the running rows once, admit what fits, let finished rows go."""
        self._leave([s.cancelled for s in self.rows], "cancelled")
        if self.rows:
            assert self.state is not None
            self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], 1)
            logits = self.state.step(self.next[:, None], self.mask, self.pos[:, None])
            self.steps += 1
            self.pos = self.pos + 1
            self.next = self._sample(self.rows, logits)
            self._leave([s.finish is not None for s in self.rows])
            self._requeue_long()
        self.admitting = self._admit()
        if self.admitting:
            self._prefill(self.admitting)

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    def fail_all(self, reason: str) -> None:
        """Finish every running and waiting request with an error (the backend failed); the
        scheduler starts again from an empty batch."""
        with self.cond:
            doomed, self.waiting = [*self.rows, *self.admitting, *self.waiting], deque()
        self.rows, self.admitting = [], []
        self._empty()
        for s in doomed:
            s.finish, s.error = "error", reason
            s._tell(None)

    # -- internals -------------------------------------------------------------------------------
    def _empty(self) -> None:
        """No batch: no state, no cache columns."""
        self.state = None
        self.mask, self.pos, self.next = self.mask[:0, :0], self.pos[:0], self.next[:0]

    def _sample(self, rows: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """The next token of each row [B]; rows that reach an end get `finish`."""
        greedy = logits.argmax(axis=-1)
        tokens = np.empty(len(rows), dtype=np.int64)
        for i, s in enumerate(rows):
            t = int(greedy[i]) if s.temperature == 0 else int(
                sample(logits[i:i + 1], s.temperature, s.top_p, s.rng)[0])
            tokens[i] = t
            s.new.append(t)
            s._tell(t)
            if t in self.eos_ids:
                s.finish = "eos"
            elif s.stop is not None and s.stop(s.new):
                s.finish = "stop"
            elif len(s.new) >= s.max_new_tokens:
                s.finish = "length"
        return tokens

    def _leave(self, gone: list[bool], reason: str | None = None, finished: bool = True) -> None:
        """Drop the rows marked `gone` from the batch (`finished`: tell their listeners); the
        cache keeps the columns still used."""
        if not any(gone):
            return
        stay = np.flatnonzero(~np.asarray(gone, dtype=bool))
        for s, g in zip(self.rows, gone):
            if g and finished:
                s.finish = s.finish or reason
                s._tell(None)
        self.rows = [self.rows[i] for i in stay]
        if not self.rows:
            self._empty()
            return
        mask = self.mask[stay]
        used = np.flatnonzero(mask.any(axis=0))
        width = mask.shape[1] - int(used[0])  # left-padding no kept row needs goes
        assert self.state is not None
        self.state.keep(stay, width)
        self.mask, self.pos, self.next = mask[:, -width:], self.pos[stay], self.next[stay]

    def _requeue_long(self) -> None:
        """Longrope: a row one past the switch leaves and is admitted again first, its cache
        recomputed over prompt + new tokens (those tokens are its new prompt)."""
        if self.rope_switch is None:
            return
        due = [len(s.prompt) + len(s.new) == self.rope_switch + 1 for s in self.rows]
        if not any(due):
            return
        moved = [s for s, d in zip(self.rows, due) if d]
        self._leave(due, finished=False)
        with self.cond:
            self.waiting.extendleft(reversed(moved))

    def _admit(self) -> list[Sequence]:
        """Waiting requests that fit, first come first served (no overtaking)."""
        free = self.limits.slots - len(self.rows)
        budget = self.limits.tokens - sum(s.need for s in self.rows)
        admitted: list[Sequence] = []
        with self.cond:
            cancelled = [s for s in self.waiting if s.cancelled]
            if cancelled:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            while self.waiting and len(admitted) < free:
                s = self.waiting[0]
                if s.need > budget:
                    break
                budget -= s.need
                admitted.append(self.waiting.popleft())
        for s in cancelled:
            s.finish = "cancelled"
            s._tell(None)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the new prompts as one batch and join their cache to the running one."""
        ids, mask = left_pad([s.prompt + s.new for s in seqs], self.pad_id)
        pos = positions(mask)
        state = self.backend.start(np.array([s.expert for s in seqs], dtype=np.int64))
        if not isinstance(state, BatchState):
            raise NotSupportedError(
                f"{type(state).__name__} cannot change its batch between steps: serve with the "
                "onnxruntime backend or the torch backend's merged model (merged=True)")
        logits = state.step(ids, mask, pos)
        self.steps += 1
        for s, e in zip(seqs, state.expert_ids.tolist()):
            s.expert = int(e)  # routed rows: the expert the router chose
        tokens = self._sample(seqs, logits)
        if self.state is None:
            self.state = state
            self.mask, self.pos, self.next = mask, pos[:, -1] + 1, tokens
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            self.state.join(state, width)
            self.mask = np.concatenate([_pad_left(self.mask, width), _pad_left(mask, width)])
            self.pos = np.concatenate([self.pos, pos[:, -1] + 1])
            self.next = np.concatenate([self.next, tokens])
        self.rows, self.admitting = self.rows + seqs, []
        self._leave([s.finish is not None for s in self.rows])
        self._requeue_long()


def _pad_left(mask: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(mask), width), dtype=mask.dtype)
    out[:, width - mask.shape[1]:] = mask
    return out


class ServingLoop:
    """A scheduler stepping on its own daemon thread while there is work."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="chmc-scheduler", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence) -> Sequence:
        if self.closed:
            raise ChmcError("the serving loop is closed")
        return self.scheduler.submit(seq)

    def _run(self) -> None:
        while not self.closed:
            if not self.scheduler.wait_for_work(0.5):
                continue
            try:
                self.scheduler.step()
            except Exception as e:  # noqa: BLE001  fail these requests, keep serving the next
                self.scheduler.fail_all(f"generation failed: {type(e).__name__}: {e}")

    def close(self) -> None:
        self.closed = True
        self.thread.join(timeout=10)
        self.scheduler.fail_all("the server is shutting down")
