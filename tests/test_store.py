"""The store on SQLite and PostgreSQL: schema upgrades, state, history, leases, conflicts."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, Table, inspect
from sqlalchemy.exc import OperationalError

from utils import store as store_module
from utils.store import PRODUCTION, SCHEMA_VERSION, SERVING, Store, StoreConflict


def version_row(version: str) -> dict:
    return {
        "version": version,
        "created_at": time.time(),
        "created_by": "test",
        "description": "",
        "tags": ["a"],
        "metrics": {"accuracy": 0.9},
        "config": {},
        "training_info": {},
        "artifact_key": f"{version}/model.safetensors",
        "sha256": "0" * 64,
        "size_bytes": 1,
        "archived": False,
    }


def test_schema_is_created_at_current_version(store: Store) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    tables = set(inspect(store.engine).get_table_names())
    assert {"model_versions", "service_state", "promotions", "leases", "quadra_schema"} <= tables


def test_upgrade_is_idempotent(store_url: str) -> None:
    first = Store(store_url)
    second = Store(store_url)
    assert first.schema_version() == second.schema_version() == SCHEMA_VERSION
    first.dispose()
    second.dispose()


def test_upgrade_path_applies_new_migrations_once(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(store_url).dispose()
    extra = Table("upgrade_probe", store_module.metadata, Column("id", Integer, primary_key=True))
    calls: list[int] = []

    def next_migration(conn) -> None:
        calls.append(1)
        store_module.metadata.create_all(conn, tables=[extra])

    next_version = SCHEMA_VERSION + 1
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, next_migration])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", next_version)
    try:
        upgraded = Store(store_url)
        Store(store_url).dispose()
        assert calls == [1]
        assert upgraded.schema_version() == next_version
        assert "upgrade_probe" in inspect(upgraded.engine).get_table_names()
        upgraded.dispose()
    finally:
        store_module.metadata.remove(extra)


def test_state_round_trip_and_overwrite(store: Store) -> None:
    assert store.get_state(PRODUCTION) is None
    store.set_state(PRODUCTION, "1.0.0")
    store.set_state(PRODUCTION, "1.1.0", actor="ops")
    store.set_state("settings", {"nested": [1, 2]})
    assert store.get_state(PRODUCTION) == "1.1.0"
    assert store.get_states((PRODUCTION, "settings", "missing")) == {PRODUCTION: "1.1.0", "settings": {"nested": [1, 2]}}


def test_duplicate_version_is_a_conflict_and_rolls_back(store: Store) -> None:
    with store.adding_version(version_row("1.0.0")):
        pass
    with pytest.raises(StoreConflict):
        with store.adding_version(version_row("1.0.0")):
            pass
    with pytest.raises(RuntimeError):
        with store.adding_version(version_row("2.0.0")):
            raise RuntimeError("publishing failed")
    assert [r["version"] for r in store.list_versions()] == ["1.0.0"]
    assert store.get_version("1.0.0")["metrics"] == {"accuracy": 0.9}
    assert store.get_version("2.0.0") is None


def test_delete_refuses_versions_in_use(store: Store) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        with store.adding_version(version_row(version)):
            pass
    store.record_deployment("promote", "1.0.0", "ops", set_production=True)
    store.record_deployment("load", "1.1.0", "ops", set_production=False)
    with pytest.raises(StoreConflict, match="production"):
        store.delete_version("1.0.0")
    with pytest.raises(StoreConflict, match="serving"):
        store.delete_version("1.1.0")
    assert store.delete_version("1.2.0")["version"] == "1.2.0"
    assert store.delete_version("1.2.0") is None


def test_deployments_are_recorded_with_history(store: Store) -> None:
    assert store.record_deployment("promote", "1.0.0", "alice", set_production=True) is None
    assert store.record_deployment("promote", "1.1.0", "bob", set_production=True) == "1.0.0"
    assert store.record_deployment("load", "1.2.0", "carol", set_production=False) == "1.1.0"
    assert store.get_states((PRODUCTION, SERVING)) == {PRODUCTION: "1.1.0", SERVING: "1.2.0"}
    history = store.promotion_history()
    assert [(h["actor"], h["action"], h["from_version"], h["to_version"]) for h in history] == [
        ("carol", "load", "1.1.0", "1.2.0"),
        ("bob", "promote", "1.0.0", "1.1.0"),
        ("alice", "promote", None, "1.0.0"),
    ]


def test_production_stack_pops_on_rollback(store: Store) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        store.record_deployment("promote", version, "ops", set_production=True)
    assert store.production_stack() == ["1.0.0", "1.1.0", "1.2.0"]
    store.record_deployment("rollback", "1.1.0", "ops", set_production=True)
    assert store.production_stack() == ["1.0.0", "1.1.0"]
    store.record_deployment("load", "1.2.0", "ops", set_production=False)
    assert store.production_stack() == ["1.0.0", "1.1.0"]


def test_leases_are_exclusive_until_released_or_expired(store: Store) -> None:
    assert store.try_acquire_lease("job", "a", ttl_seconds=60)
    assert not store.try_acquire_lease("job", "b", ttl_seconds=60)
    assert store.try_acquire_lease("job", "a", ttl_seconds=60)
    store.release_lease("job", "a")
    assert store.try_acquire_lease("job", "b", ttl_seconds=0.01)
    time.sleep(0.05)
    assert store.try_acquire_lease("job", "a", ttl_seconds=60)


def test_unreachable_database_fails_after_bounded_wait() -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError):
        Store("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1", wait_seconds=0.6)
    assert time.monotonic() - started < 30


def _insert_versions(url: str, prefix: int, count: int) -> None:
    store = Store(url)
    for i in range(count):
        with store.adding_version(version_row(f"{prefix}.{i}.0")):
            pass
    store.dispose()


def test_concurrent_writers_from_several_processes(store_url: str) -> None:
    Store(store_url).dispose()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_insert_versions, args=(store_url, p, 15)) for p in (1, 2, 3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    store = Store(store_url)
    assert len(store.list_versions()) == 45
    store.dispose()


def _flush_predictions(url: str, process: int, flushes: int, start: multiprocessing.synchronize.Barrier) -> None:
    store = Store(url)
    start.wait(timeout=60)
    for flush in range(flushes):
        rows = [{"at": time.time(), "model_version": "1.0.0", "latency_ms": 1.0, "confidence": 0.9, "predicted_class": "a",
                 "success": flush % 5 != 0, "error": None, "features": None, "record_id": f"p{process}__{flush}__{row}"}
                for row in range(7)]
        assert store.insert_predictions(rows, "prediction_totals") == 7
    store.dispose()


def _update_state(url: str, process: int, updates: int, start: multiprocessing.synchronize.Barrier) -> None:
    store = Store(url)
    start.wait(timeout=60)
    for _ in range(updates):
        store.update_state("history", lambda history: [*(history or []), process])
    store.dispose()


def _run_together(target, url: str, count: int) -> None:
    """`target(url, process, count, barrier)` in four processes started together."""
    Store(url).dispose()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    workers = [context.Process(target=target, args=(url, p, count, start)) for p in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0


def test_concurrent_prediction_flushes_from_several_processes_keep_exact_totals(store_url: str) -> None:
    """Workers flushing at the same moment (as every old worker does when a reload stops
    them) each add their records to the shared totals; none of the additions is lost."""
    _run_together(_flush_predictions, store_url, 40)
    store = Store(store_url)
    assert len(store.recent_predictions(10_000)) == 4 * 40 * 7
    assert store.get_state("prediction_totals") == {"count": 4 * 40 * 7, "errors": 4 * 8 * 7}
    store.dispose()


def test_concurrent_state_updates_from_several_processes_are_all_kept(store_url: str) -> None:
    """update_state is a read-modify-write no concurrent update can undo (the alert episode
    state and the drift history use it)."""
    _run_together(_update_state, store_url, 40)
    store = Store(store_url)
    assert sorted(store.get_state("history")) == sorted(list(range(4)) * 40)
    store.dispose()


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'wal.db'}")
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    store.dispose()
