"""Dynamic batching: concurrent prediction requests in one worker that go to the same model
are grouped into one forward pass. Opt-in (QUADRA_BATCH_MAX_SIZE > 1); when off, each request
runs its own forward pass where it is, as it always did.

The first request to arrive opens a batch and waits `max_delay_seconds` for others to join
it, less once the batch holds `max_rows` rows, and longer while the worker's previous forward
pass of the same model still runs (the batch keeps gathering until it ends; the batches of a
canary's two arms gather and close together); then it runs the batch's forward pass in its own
thread, green or not, as an unbatched request does. Not in a pool of real threads: torch
releases the GIL inside each operation but takes it back between layers, and the worker's
event loop, parsing the next requests, holds it for up to the interpreter's switch interval
(5 ms) each time, so a pass of 7.5 ms took 65 ms beside a busy loop (bench/NOTES.md). Each
request gets its own rows back and is monitored, routed (canary arms are different models, so
they never share a batch) and timed as without batching.

A batch whose forward pass fails is run again request by request, so a failure fails only
the requests it concerns. A request larger than `max_rows` runs alone.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from utils.cooperation import let_other_requests_run
from utils.instruments import BATCH_REQUESTS, BATCH_ROWS, BATCH_WAIT_SECONDS
from utils.serving import ServedModel

Results = list[dict[str, Any]]


@dataclass
class _Batch:
    """Requests gathered for one forward pass of `served`."""

    served: ServedModel
    opened_at: float = field(default_factory=time.perf_counter)
    parts: list[torch.Tensor] = field(default_factory=list)
    rows: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Results | BaseException] = field(default_factory=list)

    def join(self, inputs: torch.Tensor) -> int:
        self.parts.append(inputs)
        self.rows += len(inputs)
        return len(self.parts) - 1

    def fail(self, exc: BaseException) -> None:
        """Every request of the batch gets `exc`: its leader died before or during the pass."""
        self.outcomes = [exc] * len(self.parts)
        self.done.set()

    def outcome(self, slot: int) -> Results:
        result = self.outcomes[slot]
        if isinstance(result, BaseException):
            raise result
        return result


@dataclass
class _Window:
    """The batches gathering at once, one per model (a canary's two arms). They close together,
    so a rarely used arm's requests wait no longer than the busy arm's (a canary's latency is
    compared with production's)."""

    opened_at: float = field(default_factory=time.perf_counter)
    batches: dict[int, _Batch] = field(default_factory=dict)  # by id(model): a batch keeps its model alive
    ended: bool = False


class Batcher:
    """This worker's gathering window, the batches in it, and its forward passes in flight."""

    def __init__(self, max_rows: int, max_delay_seconds: float) -> None:
        self.max_rows = max_rows
        self.max_delay_seconds = max_delay_seconds
        self._window: _Window | None = None
        self._running: Counter[int] = Counter()  # this worker's passes in flight, by id(model)
        self._changed = threading.Condition()  # guards the above; notified when a window ends or a pass does
        self.passes = 0  # forward passes this worker's batcher ran (a lone request's included)
        self.batched_requests = 0  # the requests they answered

    @property
    def enabled(self) -> bool:
        return self.max_rows > 1

    def predict(self, served: ServedModel, inputs: torch.Tensor) -> Results:
        """`served.predict(inputs)`: in a forward pass shared with concurrent requests when
        batching is on, else right here."""
        if not self.enabled:
            return served.predict(inputs)
        with self._changed:
            window, batch, slot, leads = self._enter(served, inputs)
        if not leads:
            batch.done.wait()
            return batch.outcome(slot)
        try:
            self._lead(window, batch)
        except BaseException as exc:  # killed while gathering (a worker's shutdown): no follower waits forever
            with self._changed:
                self._end(window)
            batch.fail(exc)
            raise
        try:
            self._run(batch)
        finally:
            self._end_pass(id(served))
        return batch.outcome(slot)

    def _lead(self, window: _Window, batch: _Batch) -> None:
        """Gather the batch, then start its pass: no request joins it from here on."""
        if not window.ended:
            let_other_requests_run()  # the requests this worker has already read join first
        with self._changed:
            self._gather(window, id(batch.served))
            self._start_pass(window, batch)

    def _enter(self, served: ServedModel, inputs: torch.Tensor) -> tuple[_Window, _Batch, int, bool]:
        """Join the model's batch in the open window if it has room; else end the window and
        open the next. The first request of a model's batch leads it (waits, then runs it)."""
        window = self._window or self._open_window()
        batch = window.batches.get(id(served))
        if batch is not None and batch.rows + len(inputs) > self.max_rows:
            self._end(window)
            window, batch = self._open_window(), None
        leads = batch is None
        if batch is None:
            batch = window.batches[id(served)] = _Batch(served)
        slot = batch.join(inputs)
        if batch.rows >= self.max_rows:
            self._end(window)
        return window, batch, slot, leads

    def _gather(self, window: _Window, model: int) -> None:
        """A leader's wait: until its window ends (a batch filled), at least until the delay is
        up, and past it while this worker's previous pass of the model still runs, so under
        load batches grow instead of passes competing for the cores."""
        deadline = window.opened_at + self.max_delay_seconds
        while not window.ended:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 and not self._running[model]:
                return
            self._changed.wait(remaining if remaining > 0 else None)

    def _open_window(self) -> _Window:
        self._window = _Window()
        return self._window

    def _end(self, window: _Window) -> None:
        """No request joins `window` from here on, and its leaders stop waiting."""
        if self._window is window:
            self._window = None
        window.ended = True
        self._changed.notify_all()

    def _start_pass(self, window: _Window, batch: _Batch) -> None:
        self._end(window)
        self._running[id(batch.served)] += 1
        self.passes += 1
        self.batched_requests += len(batch.parts)

    def _end_pass(self, model: int) -> None:
        with self._changed:
            self._running[model] -= 1
            if not self._running[model]:
                del self._running[model]
            self._changed.notify_all()

    def summary(self) -> dict[str, Any] | None:
        """What the dashboard shows of this worker's batching (None when off)."""
        if not self.enabled:
            return None
        per_pass = self.batched_requests / self.passes if self.passes else None
        return {"max_rows": self.max_rows, "max_delay_ms": self.max_delay_seconds * 1000.0,
                "requests_per_pass": round(per_pass, 1) if per_pass is not None else None}

    def _run(self, batch: _Batch) -> None:
        BATCH_WAIT_SECONDS.observe(time.perf_counter() - batch.opened_at)
        BATCH_ROWS.observe(batch.rows)
        BATCH_REQUESTS.observe(len(batch.parts))
        try:
            batch.outcomes = _forward(batch.served, batch.parts)
        except BaseException as exc:  # not a model's error (those are each request's outcome): stop, as unbatched
            batch.fail(exc)
            raise
        batch.done.set()


def _forward(served: ServedModel, parts: list[torch.Tensor]) -> list[Results | BaseException]:
    """One forward pass over every request's rows, split back per request; if it fails, each
    request alone, so only the requests that fail get an error."""
    if len(parts) == 1:
        return [_alone(served, parts[0])]
    try:
        results = served.predict(torch.cat(parts))
    except Exception:
        return [_alone(served, part) for part in parts]
    split: list[Results | BaseException] = []
    start = 0
    for part in parts:
        split.append(results[start:start + len(part)])
        start += len(part)
    return split


def _alone(served: ServedModel, inputs: torch.Tensor) -> Results | Exception:
    try:
        return served.predict(inputs)
    except Exception as exc:
        return exc
