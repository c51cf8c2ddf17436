"""A process's buffer of monitoring records: appended on the request path (journalled first
when a journal is configured), written to the store in batches by `flush`, bounded so that a
long store outage drops the oldest requests (and counts them) instead of exhausting memory."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from utils.journal import RecordBatch, RecordJournal
from utils.store import Store

# Records per write transaction. Under an async worker the flusher shares the event loop with
# the requests, and other workers' writers wait for the SQLite lock while it is held: a
# transaction stalls requests for as long as it runs (about 30 µs a record), so the flush goes
# in small ones and lets the requests run between them.
MAX_FLUSH_BATCH = 500
MAX_BUFFERED = 200_000
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

    def append(self, batch: RecordBatch) -> None:
        """Buffer a request's records (journalled first, when a journal is configured)."""
        with self._lock:
            if self.journal is not None:
                batch = replace(batch, first_id=self.journal.reserve_ids(len(batch)))
                self.journal.append(batch)
            while self._buffer and self._pending + len(batch) > MAX_BUFFERED:
                dropped = self._buffer.popleft()
                self._pending -= len(dropped)
                self.dropped += len(dropped)
            self._buffer.append(batch)
            self._pending += len(batch)

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
        written = 0
        with self._flush_lock:
            with self._lock:
                batches = list(self._buffer)
                self._buffer.clear()
                self._pending = 0
                if self.journal is not None and batches:
                    self._journal_files.append(self.journal.rotate())
            for start, group in _groups(batches):
                time.sleep(0)  # an async worker's requests run here (monkey-patched sleep); a thread yields the GIL
                try:
                    written += self.store.predictions.insert([r for batch in group for r in batch.records()])
                except Exception:
                    unwritten = batches[start:]
                    with self._lock:
                        self._buffer.extendleft(reversed(unwritten))
                        self._pending += sum(len(batch) for batch in unwritten)
                    log.exception("could not write %d prediction records; will retry", sum(map(len, unwritten)))
                    return written
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
