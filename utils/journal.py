"""A per-process journal of monitoring records not yet in the store.

Each record is appended (one write, no fsync) before the request is answered, so a process
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
from pathlib import Path
from typing import Any, Iterator

SEPARATOR = "__"


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
        self._handle = open(self.folder / f"{self.owner}.jsonl", "a", encoding="utf-8")

    def next_id(self) -> str:
        self._sequence += 1
        return f"{self.owner}{SEPARATOR}{self._sequence}"

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write the records in one call; the caller holds the monitor's lock."""
        self._handle.write("".join(json.dumps(record) + "\n" for record in records))
        self._handle.flush()

    def rotate(self) -> Path:
        """Close the current file under a pending name and start a new one; returns the name."""
        self._handle.close()
        self._rotations += 1
        pending = self.folder / f"{self.owner}.{self._rotations}.pending"
        os.replace(self.folder / f"{self.owner}.jsonl", pending)
        self._handle = open(self.folder / f"{self.owner}.jsonl", "a", encoding="utf-8")
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
    def read(path: Path) -> Iterator[dict[str, Any]]:
        """The records of a journal file; a torn last line (killed mid-write) is skipped."""
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
