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
# Past this many unwritten records (buffered, or taken by a flush and not yet written) a request
# waits for the store before it is answered: a worker whose requests outrun the store (sustained
# saturation at batch 32 on SQLite) slows to the rate the store writes instead of filling the
# buffer and dropping records. Records are dropped only while the store is unreachable.
FLUSH_AHEAD = 2_000
log = logging.getLogger("quadra.monitoring")


class RecordBuffer:
    def __init__(self, store: Store, journal: RecordJournal | None) -> None:
        self.store = store
        self.journal = journal
        self.dropped = 0
        self._buffer: deque[RecordBatch] = deque()
        self._pending = 0  # records in the buffer
        self._in_flight = 0  # records a write has taken from the buffer and not yet written
        self._in_flight_errors = 0  # of which records of failed predictions
        self._writing = False  # a write is running (under `_lock`, as the counts)
        self._journal_files: list[Path] = []
        self._lock = threading.Lock()
        self._group_written = threading.Condition(self._lock)  # after each group of a write, and at its end
        self._flush_lock = threading.Lock()
        self._store_writes = True  # the last flush reached the store

    def append(self, batch: RecordBatch) -> None:
        """Buffer a request's records (journalled first, when a journal is configured); past
        FLUSH_AHEAD unwritten records, wait for the store (`_wait_for_the_store`) first."""
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
            past_the_mark = self._unwritten() > FLUSH_AHEAD
        if past_the_mark:
            self._wait_for_the_store()

    @property
    def pending(self) -> int:
        """Records not yet in the store."""
        with self._lock:
            return self._unwritten()

    @property
    def pending_errors(self) -> int:
        """Records of failed predictions not yet in the store."""
        with self._lock:
            return sum(len(batch) for batch in self._buffer if not batch.success) + self._in_flight_errors

    def _unwritten(self) -> int:
        """`pending`, for a caller that holds `_lock`."""
        return self._pending + self._in_flight

    def flush(self) -> int:
        """Write everything buffered; on a store error the records stay buffered (and
        journalled) for the next try. Returns how many new records reached the store."""
        with self._flush_lock:
            return self._write_buffered()

    def _wait_for_the_store(self) -> None:
        """Backpressure: while more than FLUSH_AHEAD records are unwritten and the store takes
        writes, the request writes the oldest group of them (one transaction) or, while another
        write runs, waits for that write's next group, and looks again. Waiting for a whole
        backlog at once (2,000 records, several transactions, each queued behind the other
        workers' on SQLite's one writer) made the requests that crossed the mark the tail of a
        saturated worker (batch-32 p99 of 400-800 ms, bench/NOTES.md). A request that waits
        for one group only and goes on left the worker fewer requests a second (three
        alternating pairs, eighth part)."""
        while self.pending > FLUSH_AHEAD and self._store_writes:
            if self._flush_lock.acquire(blocking=False):
                try:
                    if not self._write_oldest_group():
                        return
                finally:
                    self._flush_lock.release()
                continue
            with self._group_written:
                if self._writing and self._unwritten() > FLUSH_AHEAD:
                    self._group_written.wait()
                    continue
            let_other_requests_run()  # the other writer is between taking its lock and its records, or past them

    def _write_oldest_group(self) -> int:
        """Take about MAX_FLUSH_BATCH of the oldest records and write them (the journal is not
        rotated: the next flush does, and a replay skips the records already stored). Returns
        how many it took."""
        with self._lock:
            group, size = [], 0
            while self._buffer and size < MAX_FLUSH_BATCH:
                group.append(self._buffer.popleft())
                size += len(group[-1])
            self._take(group)
        self._write(group)
        return size

    def _write_buffered(self) -> int:
        """`flush` with its lock held."""
        with self._lock:
            batches = list(self._buffer)
            if self.journal is not None and batches:
                self._journal_files.append(self.journal.rotate())
            self._buffer.clear()
            self._take(batches)
        written = self._write(batches)
        if self._store_writes:
            RecordJournal.release(self._journal_files)
            self._journal_files.clear()
        return written

    def _take(self, batches: list[RecordBatch]) -> None:
        """Move records from the buffer to a write; the caller holds `_lock`."""
        taken = sum(map(len, batches))
        self._pending -= taken
        self._in_flight += taken
        self._in_flight_errors += _errors(batches)
        self._writing = True

    def _write(self, batches: list[RecordBatch]) -> int:
        """Write taken batches in groups of about MAX_FLUSH_BATCH records, in order, letting the
        requests run between them; on a store error (or an exit of the thread) the unwritten
        ones go back to the front of the buffer. Returns how many new records reached the store."""
        written, done = 0, 0  # records new to the store, batches written
        try:
            for group in _groups(batches):
                let_other_requests_run()
                written += self.store.predictions.insert([r for batch in group for r in batch.records()])
                done += len(group)
                with self._group_written:
                    self._in_flight -= sum(map(len, group))
                    self._in_flight_errors -= _errors(group)
                    self._store_writes = True
                    self._group_written.notify_all()
        except Exception:
            log.exception("could not write %d prediction records; will retry", sum(map(len, batches[done:])))
        finally:
            with self._group_written:
                if done < len(batches):
                    self._give_back(batches[done:])
                self._writing = False
                self._group_written.notify_all()
        return written

    def _give_back(self, unwritten: list[RecordBatch]) -> None:
        """Return unwritten batches to the front of the buffer; the caller holds `_lock`."""
        size = sum(map(len, unwritten))
        self._buffer.extendleft(reversed(unwritten))
        self._in_flight -= size
        self._in_flight_errors -= _errors(unwritten)
        self._pending += size
        self._store_writes = False

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


def _errors(batches: list[RecordBatch]) -> int:
    return sum(len(batch) for batch in batches if not batch.success)


def _groups(batches: list[RecordBatch]) -> Iterator[list[RecordBatch]]:
    """The batches in groups of about MAX_FLUSH_BATCH records, in order."""
    start, size = 0, 0
    for index, batch in enumerate(batches):
        size += len(batch)
        if size >= MAX_FLUSH_BATCH:
            yield batches[start:index + 1]
            start, size = index + 1, 0
    if start < len(batches):
        yield batches[start:]
