"""Shadow traffic: the candidate of a shadow rollout also runs a sample of production's
requests, after production answered and off the request path, and each process tallies what
it did (agreement with production row by row, confusion between the two, latency,
confidence, failures) and adds the tally to the store every flush.

The copies wait in a bounded queue: when the candidate cannot keep up, copies are dropped
(and counted), never the requests themselves delayed. Under eventlet or gevent the worker
thread is a green thread, so it runs when the request's green thread yields (sending its
response); under `python app.py` it is a thread, and torch releases the GIL in the forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from utils.serving import Canary
from utils.store import ShadowTally, Store

QUEUE_SIZE = 1000
LATENCY_SAMPLES_PER_FLUSH = 1000
log = logging.getLogger("quadra.rollout")


@dataclass(frozen=True)
class ShadowCopy:
    canary: Canary
    inputs: torch.Tensor
    production_classes: list[str]
    production_ms: float


class ShadowRunner:
    """This process's queue of shadow copies, the thread that runs them, and their tallies."""

    def __init__(self, store: Store, queue_size: int = QUEUE_SIZE) -> None:
        self.store = store
        self._queue: queue.Queue[ShadowCopy | None] = queue.Queue(queue_size)
        self._tallies: dict[int, ShadowTally] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, canary: Canary, inputs: torch.Tensor, results: list[dict[str, Any]], production_ms: float) -> None:
        """Queue a copy of a request production answered in `production_ms` (its forward pass,
        which the candidate's is compared with); returns at once."""
        try:
            self._queue.put_nowait(ShadowCopy(canary, inputs, [result["class"] for result in results], production_ms))
        except queue.Full:
            with self._lock:
                self._tally(canary.rollout_id).dropped += 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="quadra-shadow", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Run what is queued, stop the thread, write the tallies."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def drain(self) -> None:
        """Wait until every queued copy has run (the thread must be started)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            copy = self._queue.get()
            try:
                if copy is None:
                    return
                self.run(copy)
            finally:
                self._queue.task_done()

    def run(self, copy: ShadowCopy) -> None:
        """Run one copy on the candidate and tally it against production's classes."""
        started = time.perf_counter()
        try:
            results = copy.canary.model.predict(copy.inputs)
        except Exception as exc:
            log.warning("shadow candidate %s failed on a copy: %s", copy.canary.model.version, exc)
            with self._lock:
                tally = self._tally(copy.canary.rollout_id)
                tally.requests += 1
                tally.errors += 1
            return
        latency_ms = (time.perf_counter() - started) * 1000.0
        with self._lock:
            tally = self._tally(copy.canary.rollout_id)
            tally.requests += 1
            tally.rows += len(results)
            if len(tally.latency_samples) < LATENCY_SAMPLES_PER_FLUSH:
                tally.latency_samples.append(latency_ms)
                tally.production_latency_samples.append(copy.production_ms)
            for production_class, result in zip(copy.production_classes, results, strict=True):
                candidate_class = result["class"]
                tally.agreements += production_class == candidate_class
                tally.confidence_sum += result["confidence"]
                tally.confidence_count += 1
                tally.class_counts[candidate_class] = tally.class_counts.get(candidate_class, 0) + 1
                row = tally.confusion.setdefault(production_class, {})
                row[candidate_class] = row.get(candidate_class, 0) + 1

    def flush(self) -> None:
        """Add this process's tallies to the store; kept for the next try if it fails."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        for rollout_id, tally in tallies.items():
            try:
                self.store.shadow_tallies.add(rollout_id, tally)
            except Exception:
                log.exception("could not write a shadow tally; will retry")
                with self._lock:
                    self._tally(rollout_id).add(tally)

    def _tally(self, rollout_id: int) -> ShadowTally:
        return self._tallies.setdefault(rollout_id, ShadowTally())
