"""The rate-limit counters over the store: several processes (here, several storage objects
over one database, as gunicorn workers have) share one count per key and window."""

from __future__ import annotations

import time

import pytest
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy.exc import OperationalError

from utils.rate_limit_storage import SCHEME, StoreRateLimitStorage
from utils.store import Store

KEY = "quadra/key:key_1/global"


def worker(store: Store, sync_seconds: float = 60.0) -> StoreRateLimitStorage:
    """A worker's storage; a long sync interval so that only explicit `sync()` calls share."""
    return storage_from_string(f"{SCHEME}://", store=store, sync_seconds=sync_seconds)


def test_exact_mode_writes_every_hit(store: Store) -> None:
    a, b = worker(store, 0), worker(store, 0)
    assert [a.incr(KEY, 60), b.incr(KEY, 60), a.incr(KEY, 60)] == [1, 2, 3]
    assert store.counters.get(KEY)[0] == 3 and a.get(KEY) == 3
    assert b.get(KEY) == 2  # the window its own last write returned, reused briefly for the headers


def test_workers_count_locally_and_share_every_hit_at_sync(store: Store) -> None:
    a, b = worker(store), worker(store)
    assert a.incr(KEY, 60) == 1  # a window's first hit is written at once
    assert b.incr(KEY, 60) == 2  # so the next worker starts from the shared count
    assert [a.incr(KEY, 60) for _ in range(3)] == [2, 3, 4]  # counted here only...
    assert store.counters.get(KEY)[0] == 2
    assert [b.incr(KEY, 60) for _ in range(2)] == [3, 4]
    a.sync()
    assert store.counters.get(KEY)[0] == 5 and a.get(KEY) == 5  # ...until the sync, which reads back the total
    b.sync()
    assert store.counters.get(KEY)[0] == 7 and b.get(KEY) == 7  # no hit lost
    a.sync()
    assert a.get(KEY) == 7


def test_a_worker_never_counts_more_than_the_shared_total(store: Store) -> None:
    """Each view is at most the true count, so nobody is refused before the limit is reached."""
    workers = [worker(store) for _ in range(4)]
    limit = parse("10 per minute")
    strategies = [FixedWindowRateLimiter(w) for w in workers]
    admitted = sum(strategies[i % 4].hit(limit, "key:k") for i in range(10))
    assert admitted == 10
    for _ in range(2):  # the second sync forgets the now quiet windows
        for w in workers:
            w.sync()
    assert store.counters.get(limit.key_for("key:k"))[0] == 10
    assert not any(s.hit(limit, "key:k") for s in strategies)  # the next hit reads the total: refused


def test_a_quiet_window_is_forgotten_and_its_next_hit_written_at_once(store: Store) -> None:
    a, b = worker(store), worker(store)
    a.incr(KEY, 60)
    a.sync()  # no hit since the first write: forgotten
    b.incr(KEY, 60)
    b.incr(KEY, 60)
    b.sync()
    assert a.incr(KEY, 60) == 4 and store.counters.get(KEY)[0] == 4


def test_a_new_window_starts_when_the_old_one_ends(store: Store) -> None:
    a = worker(store)
    assert [a.incr(KEY, 1), a.incr(KEY, 1)] == [1, 2]
    time.sleep(max(0.0, a.get_expiry(KEY) - time.time()) + 0.05)
    assert a.incr(KEY, 1) == 1 and store.counters.get(KEY)[0] == 1


def test_a_failed_sync_keeps_the_hits_for_the_next(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the store refusing a write (a real outage is tested end to end)."""
    a = worker(store)
    a.incr(KEY, 60)
    a.incr(KEY, 60)
    a.incr(KEY, 60)

    def unavailable(*args: object) -> None:
        raise OperationalError("counter_incr", {}, Exception("database is locked"))

    monkeypatch.setattr(store.counters, "incr", unavailable)
    with pytest.raises(OperationalError):
        a.sync()
    monkeypatch.undo()
    a.sync()
    assert store.counters.get(KEY)[0] == 3


def test_the_background_sync_shares_counts_once_started_and_close_shares_the_rest(store: Store) -> None:
    a, b = worker(store, 0.05), worker(store, 0.05)
    a.start()
    a.incr(KEY, 60)
    a.incr(KEY, 60)
    deadline = time.monotonic() + 10
    while store.counters.get(KEY)[0] < 2:
        assert time.monotonic() < deadline, "the hits were never shared"
        time.sleep(0.05)
    assert b.incr(KEY, 60) == 3
    a.close()
    assert a._syncer is None
    b.incr(KEY, 60)
    b.incr(KEY, 60)  # counted in b only: it was never started
    time.sleep(0.2)
    assert store.counters.get(KEY)[0] == 3
    b.close()  # what a worker's exit does
    assert store.counters.get(KEY)[0] == 5


def test_the_storage_needs_a_store() -> None:
    with pytest.raises(ValueError, match="store"):
        storage_from_string(f"{SCHEME}://")


def test_which_requests_the_service_wide_limit_applies_to(store: Store) -> None:
    from utils.request_limits import RequestLimits

    limits = RequestLimits(worker(store), lambda: "ip:127.0.0.1", lambda _: "10 per minute", "quadra")
    limits.exempt("health")
    limits.exempt("metrics")
    assert limits.applies_to("predict.predict") and limits.applies_to("registry.list_versions")
    assert not limits.applies_to("health.liveness") and not limits.applies_to("metrics")
    assert not limits.applies_to(None) and not limits.applies_to("static") and not limits.applies_to("dashboard.static")
