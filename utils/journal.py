"""A per-process journal of monitoring records not yet in the store.

A request's records are appended as one line (one write, no fsync; serialised by
pydantic-core, about ten times faster than the json module for rows of floats) before the
request is answered, so a process
that is killed outright (a SIGKILLed worker, an OOM kill) loses nothing: the next process
that starts on the host replays journals whose owner is gone. A power cut can still lose the
last records the OS had not written; that is the price of keeping fsync off the request path.
Records carry ids and the store ignores ids it already has, so a replay never counts twice.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic_core import to_json

from utils.store import PredictionRecord

SEPARATOR = "__"


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """The monitoring records of one request (its rows, or one failure), kept as one object
    and one journal line until they are written: per-row objects would cost the request path
    an allocation and a JSON object each, and the garbage collector a traversal each.

    The request path fills it with tuples: a tuple of numbers or text leaves the garbage
    collector's view at its first pass, a list never does, and a buffer holding a saturated
    worker's backlog (tens of thousands of rows) made each full pass stall the worker for
    100-250 ms."""

    at: float
    model_version: str | None
    latency_ms: float
    confidences: Sequence[float | None]
    classes: Sequence[str | None]
    features: Sequence[Sequence[float] | None]
    success: bool = True
    error: str | None = None
    first_id: str | None = None  # the journal's id of the first row; the next rows count on from it
    prediction_ids: Sequence[str] | None = None  # with probabilities: the rows' ids for labels
    probabilities: Sequence[Sequence[float]] | None = None

    def __len__(self) -> int:
        return len(self.confidences)

    def records(self) -> list[PredictionRecord]:
        """One store row per record."""
        rows = zip(self.confidences, self.classes, self.features, self._record_ids(), strict=False)  # a replayed line may be short
        ids, probabilities = self.prediction_ids or [], self.probabilities or []
        return [
            {"at": self.at, "model_version": self.model_version, "latency_ms": self.latency_ms, "confidence": confidence,
             "predicted_class": predicted_class, "success": self.success, "error": self.error, "features": features,
             "record_id": record_id, "prediction_id": ids[index] if index < len(ids) else None,
             "probabilities": probabilities[index] if index < len(probabilities) else None}
            for index, (confidence, predicted_class, features, record_id) in enumerate(rows)
        ]

    def _record_ids(self) -> list[str | None]:
        """The rows' ids, counting on from `first_id` (None each without it)."""
        if self.first_id is None:
            return [None] * len(self)
        owner, _, first = self.first_id.rpartition(SEPARATOR)
        return [f"{owner}{SEPARATOR}{number}" for number in range(int(first), int(first) + len(self))]


def process_alive(pid: int) -> bool:
    """True for a running process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class RecordJournal:
    """This process's journal file in `folder`, rotated at every flush."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owner = SEPARATOR.join((socket.gethostname(), str(os.getpid()), str(time.time_ns())))
        self._sequence = 0
        self._rotations = 0
        self._lock = threading.Lock()
        self._handle = open(self.folder / f"{self.owner}.jsonl", "ab")

    def reserve_ids(self, count: int) -> str:
        """Ids for `count` records; returns the first (the others count on from it)."""
        first = self._sequence + 1
        self._sequence += count
        return f"{self.owner}{SEPARATOR}{first}"

    def append(self, batch: RecordBatch) -> None:
        """Write a request's records as one line in one call; the caller holds the monitor's lock."""
        self._handle.write(to_json([batch.at, batch.model_version, batch.latency_ms, batch.confidences, batch.classes,
                                    batch.features, batch.success, batch.error, batch.first_id, batch.prediction_ids,
                                    batch.probabilities]) + b"\n")
        self._handle.flush()

    def rotate(self) -> Path:
        """Close the current file under a pending name and start a new one; returns the name."""
        self._handle.close()
        self._rotations += 1
        pending = self.folder / f"{self.owner}.{self._rotations}.pending"
        os.replace(self.folder / f"{self.owner}.jsonl", pending)
        self._handle = open(self.folder / f"{self.owner}.jsonl", "ab")
        return pending

    @staticmethod
    def release(paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    @staticmethod
    def orphans(folder: Path) -> list[Path]:
        """Journal files on this host whose process is gone."""
        host = socket.gethostname()
        found = []
        for path in sorted(Path(folder).glob("*")):
            parts = path.name.split(SEPARATOR)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not process_alive(int(parts[1])):
                found.append(path)
        return found

    @staticmethod
    def read(path: Path) -> Iterator[PredictionRecord]:
        """The records of a journal file (a line holds one request's records, or one record as
        earlier releases wrote them); a torn last line (killed mid-write) is skipped."""
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    loaded = json.loads(line)
                except json.JSONDecodeError:
                    continue
                yield from RecordBatch(*loaded).records() if isinstance(loaded, list) else [loaded]
