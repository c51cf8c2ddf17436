"""A process's buffer of monitoring records: appended on the request path (journalled first
when a journal is configured), written to the store in batches by `flush`, bounded so that a
long store outage drops the oldest requests (and counts them) instead of exhausting memory,
and a store that writes slower than requests come makes the requests wait (FLUSH_AHEAD)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from utils.cooperation import let_other_requests_run
from utils.instruments import DROPPED_RECORDS
from utils.journal import RecordBatch, RecordJournal
from utils.store import Store

# Records per write transaction. Under an async worker the flusher shares the event loop with
# the requests, and other workers' writers wait for the SQLite lock while it is held: a
# transaction stalls requests for as long as it runs (about 30 µs a record), so the flush goes
# in small ones and lets the requests run between them.
MAX_FLUSH_BATCH = 500
MAX_BUFFERED = 200_000
# Past this many buffered records a request waits for a flush before it is answered: a worker
# whose requests outrun the store (sustained saturation at batch 32 on SQLite) slows to the rate
# the store writes instead of filling the buffer and dropping records. Records are dropped
# only while the store is unreachable.
FLUSH_AHEAD = 2_000
log = logging.getLogger("quadra.monitoring")


class RecordBuffer:
    def __init__(self, store: Store, journal: RecordJournal | None) -> None:
        self.store = store
        self.journal = journal
        self.dropped = 0
        self._buffer: deque[RecordBatch] = deque()
        self._pending = 0  # records in the buffer
        self._journal_files: list[Path] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._store_writes = True  # the last flush reached the store

    def append(self, batch: RecordBatch) -> None:
        """Buffer a request's records (journalled first, when a journal is configured); past
        FLUSH_AHEAD records, write them before returning while the store takes writes."""
        with self._lock:
            if self.journal is not None:
                batch = replace(batch, first_id=self.journal.reserve_ids(len(batch)))
                self.journal.append(batch)
            while self._buffer and self._pending + len(batch) > MAX_BUFFERED:
                dropped = self._buffer.popleft()
                self._pending -= len(dropped)
                self.dropped += len(dropped)
                DROPPED_RECORDS.inc(len(dropped))
            self._buffer.append(batch)
            self._pending += len(batch)
        self._wait_for_the_store()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def pending_errors(self) -> int:
        """Buffered records of failed predictions."""
        return sum(len(batch) for batch in list(self._buffer) if not batch.success)

    def flush(self) -> int:
        """Write everything buffered; on a store error the records stay buffered (and
        journalled) for the next try. Returns how many new records reached the store."""
        with self._flush_lock:
            return self._write_buffered()

    def _wait_for_the_store(self) -> None:
        """Backpressure: while more than FLUSH_AHEAD records wait and the store takes writes,
        one request writes them and the others wait for that flush to end (one flush takes
        every waiter's records: no waiter writes after another)."""
        while self._pending > FLUSH_AHEAD and self._store_writes:
            if self._flush_lock.acquire(blocking=False):
                try:
                    self._write_buffered()
                finally:
                    self._flush_lock.release()
            else:
                with self._flush_lock:  # the running flush ends; it may have left the mark passed again
                    pass

    def _write_buffered(self) -> int:
        """`flush` with its lock held."""
        written = 0
        with self._lock:
            batches = list(self._buffer)
            self._buffer.clear()
            self._pending = 0
            if self.journal is not None and batches:
                self._journal_files.append(self.journal.rotate())
        for start, group in _groups(batches):
            let_other_requests_run()
            try:
                written += self.store.predictions.insert([r for batch in group for r in batch.records()])
            except Exception:
                unwritten = batches[start:]
                with self._lock:
                    self._buffer.extendleft(reversed(unwritten))
                    self._pending += sum(len(batch) for batch in unwritten)
                self._store_writes = False
                log.exception("could not write %d prediction records; will retry", sum(map(len, unwritten)))
                return written
        self._store_writes = True
        RecordJournal.release(self._journal_files)
        self._journal_files.clear()
        return written

    def recover_journals(self) -> int:
        """Replay the journals of processes on this host that died before flushing."""
        if self.journal is None:
            return 0
        recovered = 0
        for path in RecordJournal.orphans(self.journal.folder):
            records = list(RecordJournal.read(path))
            for start in range(0, len(records), MAX_FLUSH_BATCH):
                recovered += self.store.predictions.insert(records[start:start + MAX_FLUSH_BATCH])
            path.unlink(missing_ok=True)
        if recovered:
            log.warning("recovered %d prediction records from the journals of stopped processes", recovered)
        return recovered


def _groups(batches: list[RecordBatch]) -> Iterator[tuple[int, list[RecordBatch]]]:
    """(index of the first, the batches) in groups of about MAX_FLUSH_BATCH records."""
    start, size = 0, 0
    for index, batch in enumerate(batches):
        size += len(batch)
        if size >= MAX_FLUSH_BATCH:
            yield start, batches[start:index + 1]
            start, size = index + 1, 0
    if start < len(batches):
        yield start, batches[start:]
