"""The process's background scheduler: periodic tasks, failures logged, an explicit lifecycle."""

from __future__ import annotations

import threading
import time

import pytest

from utils.scheduler import Scheduler


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_tasks_run_repeatedly_at_their_own_pace_until_stopped() -> None:
    scheduler = Scheduler(tick=0.01, name="scheduler-under-test")
    fast, slow = [], []
    scheduler.every(0.02, lambda: fast.append(time.monotonic()))
    scheduler.every(10.0, lambda: slow.append(time.monotonic()))
    scheduler.start()
    scheduler.start()  # idempotent: still one thread
    assert wait_until(lambda: len(fast) >= 3)
    assert [t.name for t in threading.enumerate()].count("scheduler-under-test") == 1
    scheduler.stop()
    runs = len(fast)
    time.sleep(0.1)
    assert len(fast) == runs and slow == []
    assert "scheduler-under-test" not in [t.name for t in threading.enumerate()]


def test_a_failing_task_is_logged_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    scheduler = Scheduler(tick=0.01)
    healthy = []

    def broken() -> None:
        raise RuntimeError("disk on fire")

    scheduler.every(0.01, broken)
    scheduler.every(0.01, lambda: healthy.append(1))
    scheduler.start()
    try:
        assert wait_until(lambda: len(healthy) >= 3)
    finally:
        scheduler.stop()
    assert any("background task broken failed" in record.getMessage() for record in caplog.records)


def test_nothing_runs_before_start_and_a_stopped_scheduler_starts_again() -> None:
    scheduler = Scheduler(tick=0.01)
    runs = []
    scheduler.every(0.01, lambda: runs.append(1))
    time.sleep(0.05)
    assert runs == []
    scheduler.start()
    assert wait_until(lambda: len(runs) >= 1)
    scheduler.stop()
    scheduler.start()
    count = len(runs)
    assert wait_until(lambda: len(runs) > count)
    scheduler.stop()
