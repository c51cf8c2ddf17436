"""The process's background thread: periodic tasks (flushing monitoring records, drift checks,
roll-ups, journal recovery, reaping jobs), each about every so many seconds.

The service owns its lifecycle (`utils.maintenance.schedule_background_work`, called by
`app.start_serving`, registers the tasks and starts it; `Services.stop` stops it); a
failing task is logged and retried at its next turn, never ends the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("quadra.scheduler")


@dataclass
class _Task:
    seconds: float
    run: Callable[[], object]
    last_run: float = 0.0


class Scheduler:
    """Runs each registered task about every `seconds`, checking every `tick` seconds."""

    def __init__(self, tick: float, name: str = "quadra-scheduler") -> None:
        self.tick = tick
        self.name = name
        self._tasks: list[_Task] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def every(self, seconds: float, task: Callable[[], object]) -> None:
        """Run `task` about every `seconds`, the first time `seconds` after `start`."""
        self._tasks.append(_Task(seconds, task))

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._stopping.clear()
                now = time.monotonic()
                for task in self._tasks:
                    task.last_run = now
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after the task it is running, if any."""
        self._stopping.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(timeout, self.tick * 2))

    def _run(self) -> None:
        while not self._stopping.wait(self.tick):
            for task in list(self._tasks):
                if time.monotonic() - task.last_run >= task.seconds:
                    task.last_run = time.monotonic()
                    self._run_one(task)

    @staticmethod
    def _run_one(task: _Task) -> None:
        try:
            task.run()
        except Exception:
            log.exception("background task %s failed", getattr(task.run, "__name__", task.run))
