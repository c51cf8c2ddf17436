"""The store on SQLite and PostgreSQL: schema upgrades, state, history, leases, conflicts."""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, Table, event, inspect, select
from sqlalchemy.exc import OperationalError

from utils.store import (
    SCHEMA_VERSION,
    AlertEpisode,
    ApiKeyRow,
    Coverage,
    Deployment,
    DriftCheck,
    ModeRecord,
    PredictionRecord,
    PredictionTotals,
    Store,
    StoreConflict,
    VersionRow,
    database,
    tables,
)
from utils.store.drift_records import DRIFT_CHECK
from utils.store.service_state import read_states, write_state


def version_row(version: str) -> VersionRow:
    return VersionRow(version=version, created_at=time.time(), created_by="test", description="", tags=["a"],
                      metrics={"accuracy": 0.9}, config={}, training_info={}, artifact_key=f"{version}/model.safetensors",
                      sha256="0" * 64, size_bytes=1, archived=False)


def test_schema_is_created_at_current_version(store: Store) -> None:
    assert store.database.schema_version() == SCHEMA_VERSION
    tables = set(inspect(store.database.engine).get_table_names())
    assert {"model_versions", "service_state", "promotions", "leases", "quadra_schema"} <= tables


def test_upgrade_is_idempotent(store_url: str) -> None:
    first = Store(store_url)
    second = Store(store_url)
    assert first.database.schema_version() == second.database.schema_version() == SCHEMA_VERSION
    first.database.dispose()
    second.database.dispose()


def test_upgrade_path_applies_new_migrations_once(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(store_url).database.dispose()
    extra = Table("upgrade_probe", tables.metadata, Column("id", Integer, primary_key=True))
    calls: list[int] = []

    def next_migration(conn) -> None:
        calls.append(1)
        tables.metadata.create_all(conn, tables=[extra])

    next_version = SCHEMA_VERSION + 1
    monkeypatch.setattr(database, "MIGRATIONS", [*tables.MIGRATIONS, next_migration])
    monkeypatch.setattr(database, "SCHEMA_VERSION", next_version)
    try:
        upgraded = Store(store_url)
        Store(store_url).database.dispose()
        assert calls == [1]
        assert upgraded.database.schema_version() == next_version
        assert "upgrade_probe" in inspect(upgraded.database.engine).get_table_names()
        upgraded.database.dispose()
    finally:
        tables.metadata.remove(extra)


def test_the_upgrade_counts_the_outcomes_stored_before_it(store_url: str) -> None:
    """A store of schema 7 kept outcomes without per-minute counts: the upgrade counts them."""
    store = Store(store_url)
    at = time.time() - 600
    store.predictions.insert([
        {"at": at + i, "model_version": "1.0.0", "latency_ms": 1.0, "confidence": 0.9, "predicted_class": "a",
         "success": True, "error": None, "features": None, "record_id": None, "prediction_id": f"r:{i}",
         "probabilities": [0.9, 0.1]} for i in range(300)])
    store.outcomes.set_labels({f"r:{i}": "a" if i % 3 else "b" for i in range(0, 300, 2)}, time.time())
    counted = store.outcomes.coverage(at - 60, at + 400)
    with store.database.write() as conn:
        tables.outcome_minutes.drop(conn)
        conn.execute(tables.schema_info.update().values(version=7))
    store.database.dispose()

    upgraded = Store(store_url)
    assert upgraded.database.schema_version() == SCHEMA_VERSION
    assert upgraded.outcomes.coverage(at - 60, at + 400) == counted == {"1.0.0": Coverage(300, 150, 100)}
    upgraded.database.dispose()


def test_the_mode_round_trips_and_is_overwritten(store: Store) -> None:
    assert store.modes.get() is None
    store.modes.set(ModeRecord(mode="training", reason="retrain", changed_by="ops", changed_at=1.0))
    store.modes.set(ModeRecord(mode="maintenance", reason="", changed_by="alice", changed_at=2.0))
    assert store.modes.get() == ModeRecord(mode="maintenance", reason="", changed_by="alice", changed_at=2.0)


def test_duplicate_version_is_a_conflict_and_rolls_back(store: Store) -> None:
    with store.versions.adding(version_row("1.0.0")):
        pass
    with pytest.raises(StoreConflict):
        with store.versions.adding(version_row("1.0.0")):
            pass
    with pytest.raises(RuntimeError):
        with store.versions.adding(version_row("2.0.0")):
            raise RuntimeError("publishing failed")
    assert [r.version for r in store.versions.list()] == ["1.0.0"]
    assert store.versions.get("1.0.0").metrics == {"accuracy": 0.9}
    assert store.versions.get("2.0.0") is None


def test_delete_refuses_versions_in_use(store: Store) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        with store.versions.adding(version_row(version)):
            pass
    store.versions.deploy("promote", "1.0.0", "ops", set_production=True)
    store.versions.deploy("load", "1.1.0", "ops", set_production=False)
    with pytest.raises(StoreConflict, match="production"):
        store.versions.delete("1.0.0")
    with pytest.raises(StoreConflict, match="serving"):
        store.versions.delete("1.1.0")
    assert store.versions.delete("1.2.0").version == "1.2.0"
    assert store.versions.delete("1.2.0") is None


def test_deployments_are_recorded_with_history(store: Store) -> None:
    assert store.versions.deploy("promote", "1.0.0", "alice", set_production=True) is None
    assert store.versions.deploy("promote", "1.1.0", "bob", set_production=True) == "1.0.0"
    assert store.versions.deploy("load", "1.2.0", "carol", set_production=False) == "1.1.0"
    assert store.versions.deployment() == Deployment(production="1.1.0", serving="1.2.0")
    history = store.versions.history()
    assert [(h.actor, h.action, h.from_version, h.to_version) for h in history] == [
        ("carol", "load", "1.1.0", "1.2.0"),
        ("bob", "promote", "1.0.0", "1.1.0"),
        ("alice", "promote", None, "1.0.0"),
    ]


def test_production_stack_pops_on_rollback(store: Store) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        store.versions.deploy("promote", version, "ops", set_production=True)
    assert store.versions.production_stack() == ["1.0.0", "1.1.0", "1.2.0"]
    store.versions.deploy("rollback", "1.1.0", "ops", set_production=True)
    assert store.versions.production_stack() == ["1.0.0", "1.1.0"]
    store.versions.deploy("load", "1.2.0", "ops", set_production=False)
    assert store.versions.production_stack() == ["1.0.0", "1.1.0"]


def test_leases_are_exclusive_until_released_or_expired(store: Store) -> None:
    assert store.leases.try_acquire("job", "a", ttl_seconds=60)
    assert not store.leases.try_acquire("job", "b", ttl_seconds=60)
    assert store.leases.try_acquire("job", "a", ttl_seconds=60)
    store.leases.release("job", "a")
    assert store.leases.try_acquire("job", "b", ttl_seconds=0.01)
    time.sleep(0.05)
    assert store.leases.try_acquire("job", "a", ttl_seconds=60)


def test_unreachable_database_fails_after_bounded_wait() -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError):
        Store("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1", wait_seconds=0.6)
    assert time.monotonic() - started < 30


def _insert_versions(url: str, prefix: int, count: int) -> None:
    store = Store(url)
    for i in range(count):
        with store.versions.adding(version_row(f"{prefix}.{i}.0")):
            pass
    store.database.dispose()


def test_concurrent_writers_from_several_processes(store_url: str) -> None:
    Store(store_url).database.dispose()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_insert_versions, args=(store_url, p, 15)) for p in (1, 2, 3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    store = Store(store_url)
    assert len(store.versions.list()) == 45
    store.database.dispose()


def _flush_predictions(url: str, process: int, flushes: int, start: multiprocessing.synchronize.Barrier) -> None:
    store = Store(url)
    start.wait(timeout=60)
    for flush in range(flushes):
        rows = [{"at": time.time(), "model_version": "1.0.0", "latency_ms": 1.0, "confidence": 0.9, "predicted_class": "a",
                 "success": flush % 5 != 0, "error": None, "features": None, "record_id": f"p{process}__{flush}__{row}"}
                for row in range(7)]
        assert store.predictions.insert(rows) == 7
    store.database.dispose()


def _count_clear_checks(url: str, process: int, updates: int, start: multiprocessing.synchronize.Barrier) -> None:
    store = Store(url)
    start.wait(timeout=60)

    def one_more(episode: AlertEpisode) -> None:
        episode.clear_checks += 1

    for _ in range(updates):
        store.alerts.update_episode("drift", one_more)
    store.database.dispose()


def _run_together(target, url: str, count: int) -> None:
    """`target(url, process, count, barrier)` in four processes started together."""
    Store(url).database.dispose()
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
    assert len(store.predictions.recent(10_000)) == 4 * 40 * 7
    totals = store.predictions.totals()
    assert (totals.count, totals.errors) == (4 * 40 * 7, 4 * 8 * 7)
    successes = 4 * 32 * 7  # each with confidence 0.9: the bucket up to 0.9
    assert totals.confidence_counts == (0, 0, 0, 0, successes, 0, 0, 0, 0)
    assert totals.confidence_sum == pytest.approx(0.9 * successes)
    store.database.dispose()


def test_concurrent_episode_updates_from_several_processes_are_all_kept(store_url: str) -> None:
    """An alert episode's update is a read-modify-write no concurrent update can undo, so two
    processes never both start an episode or both send an alert the cooldown holds back."""
    _run_together(_count_clear_checks, store_url, 40)
    store = Store(store_url)
    assert store.alerts.update_episode("drift", lambda episode: None).clear_checks == 4 * 40
    store.database.dispose()


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'wal.db'}")
    with store.database.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    store.database.dispose()


def test_a_sqlite_writer_waits_for_another_process_lock_outside_sqlite_and_gives_up_at_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The wait for the write lock sleeps in Python (the event loop's sleep under an async
    worker), not in SQLite's busy handler; the busy timeout is back for what follows."""
    path = tmp_path / "locked.db"
    store = Store(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    request.addfinalizer(other.close)
    other.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release_later() -> None:
        time.sleep(0.3)
        released.set()
        other.execute("COMMIT")

    releaser = threading.Thread(target=release_later)
    releaser.start()
    with store.database.write() as conn:
        assert released.is_set()  # the lock was taken only once the other writer let go
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        write_state(conn, "lock-test", {"written": True}, "test")
    releaser.join()
    monkeypatch.setattr(database, "WRITE_LOCK_WAIT_SECONDS", 0.2)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(OperationalError, match="locked"):  # SQLAlchemy's, like every other statement's
        with store.database.write():
            pass
    assert time.monotonic() - started < 5
    other.execute("ROLLBACK")
    with store.database.read() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    store.database.dispose()


def test_json_columns_read_back_what_was_written(store: Store) -> None:
    """The columns' fast encoder reads back the same values: non-ASCII text, and on SQLite
    (PostgreSQL's json type has neither) json.dumps' NaN and Infinity and, through json.dumps
    itself, a lone surrogate."""
    value: dict[str, object] = {"tiny": 1e-7, "name": "Iris \u00e9t\u00e9 \u2013 \U0001f33c", "nested": [[1, 2.5], {"k": None}]}
    if store.database.is_sqlite:
        value.update({"nan": math.nan, "inf": math.inf, "surrogate": "\ud800"})
    with store.database.write() as conn:
        write_state(conn, "json-round-trip", value, "test")
    with store.database.read() as conn:
        read = read_states(conn, ("json-round-trip",))["json-round-trip"]
    if store.database.is_sqlite:
        assert math.isnan(read.pop("nan"))
        value.pop("nan")
    assert read == value


def test_drift_checks_keep_the_latest_verdict_and_a_bounded_history(store: Store) -> None:
    assert store.drift_checks.latest() is None and store.drift_checks.history() == []
    for index in range(5):
        check = DriftCheck(evaluated=True, drift_detected=index % 2 == 1, checked_at=1000.0 + index, drift_score=index / 10,
                           fired=("confidence",) if index % 2 else (), dataset_drift_share=0.5)
        store.drift_checks.record(check, keep=3)
    assert store.drift_checks.latest() == check
    assert [(entry.at, entry.drift_detected) for entry in store.drift_checks.history()] == [
        (1002.0, False), (1003.0, True), (1004.0, False)]


def test_a_drift_verdict_written_by_an_earlier_release_is_read(store: Store) -> None:
    with store.database.write() as conn:
        write_state(conn, DRIFT_CHECK, {"evaluated": False, "drift_detected": False, "reason": "no baseline",
                                        "fired": [], "drifted_features": [], "checked_at": 5.0, "field_of_the_past": 1},
                    "an earlier release")
    latest = store.drift_checks.latest()
    assert latest is not None and latest.reason == "no baseline" and latest.checked_at == 5.0 and latest.fired == ()


def test_resetting_the_window_zeroes_the_totals_and_keeps_the_records(store: Store) -> None:
    records: list[PredictionRecord] = [
        {"at": time.time(), "model_version": "1.0.0", "latency_ms": 1.0, "confidence": 0.9, "predicted_class": "a",
         "success": index != 0, "error": None, "features": None, "record_id": f"r{index}"} for index in range(3)]
    assert store.predictions.insert(records) == 3 and store.predictions.insert(records) == 0
    assert store.predictions.totals() == PredictionTotals(3, 1, (0, 0, 0, 0, 2, 0, 0, 0, 0), 1.8)
    assert store.predictions.window_start() == 0
    store.predictions.reset_window(actor="test")
    assert store.predictions.totals() == PredictionTotals() and store.predictions.window_start() == store.predictions.last_id()
    assert len(store.predictions.recent(10)) == 3


def test_a_key_is_revoked_once(store: Store) -> None:
    row = ApiKeyRow(id="key_1", name="ci", key_hash="h" * 64, prefix="qk_" + "abcd", last4="wxyz", permissions=["read"],
                    rate_limit=None, created_at=1.0, created_by="test", expires_at=None, last_used_at=None,
                    revoked_at=None, rotated_to=None)
    assert store.keys.insert_first(row) and not store.keys.insert_first(row)
    assert store.keys.find("h" * 64) == row
    assert store.keys.revoke("key_1", at=2.0) and not store.keys.revoke("key_1", at=3.0)
    assert store.keys.get("key_1").revoked_at == 2.0 and store.keys.revoke("key_missing", at=2.0) is False


def test_monitoring_rows_written_through_the_driver_read_back_as_written(store: Store) -> None:
    """The monitoring insert bypasses SQLAlchemy's parameter processing: JSON columns still read
    back as values (None as JSON null, as before), and an outcome whose id is stored keeps its
    first prediction on both databases."""
    at = time.time()
    records: list[PredictionRecord] = [
        {"at": at, "model_version": "1.0.0", "latency_ms": 2.5, "confidence": 0.75, "predicted_class": "\u00e9t\u00e9",
         "success": True, "error": None, "features": [5.1, 3.5, 1e-7, 0.2], "record_id": "w__1",
         "prediction_id": "req:0", "probabilities": [0.75, 0.25]},
        {"at": at, "model_version": None, "latency_ms": 1.0, "confidence": None, "predicted_class": None,
         "success": False, "error": "invalid_input", "features": None, "record_id": "w__2"},
    ]
    assert store.predictions.insert(records) == 2
    retried = {**records[0], "record_id": "w__3", "predicted_class": "other", "probabilities": [0.1, 0.9]}
    assert store.predictions.insert([retried]) == 1
    with store.database.read() as conn:
        stored = conn.execute(select(tables.predictions.c.record_id, tables.predictions.c.features,
                                     tables.predictions.c.success).order_by(tables.predictions.c.id)).all()
        kept = conn.execute(select(tables.outcomes.c.predicted_class, tables.outcomes.c.probabilities)).all()
        sql_nulls = conn.execute(select(tables.predictions.c.record_id)
                                 .where(tables.predictions.c.features.is_(None))).scalars().all()
    assert [tuple(row) for row in stored] == [("w__1", [5.1, 3.5, 1e-7, 0.2], True), ("w__2", None, False),
                                              ("w__3", [5.1, 3.5, 1e-7, 0.2], True)]
    assert [tuple(row) for row in kept] == [("\u00e9t\u00e9", [0.75, 0.25])]
    assert sql_nulls == []  # a row without features holds JSON null, as SQLAlchemy's JSON type wrote it


def test_flushes_of_any_size_look_up_their_record_ids_with_a_few_statements(store: Store) -> None:
    """Every length of an IN list is a statement the driver keeps prepared (about 20 KB each in
    SQLite): flushes of 1 to 130 records and one of 1,200, and retries of some of them, use one
    lookup per power of two up to 512, and every record is stored once."""
    lookups: set[str] = set()

    def seen(conn, cursor, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "record_id" in statement:
            lookups.add(statement)

    event.listen(store.database.engine, "before_cursor_execute", seen)
    written = 0
    try:
        for size in (*range(1, 131), 1200):
            records: list[PredictionRecord] = [
                {"at": time.time(), "model_version": "1.0.0", "latency_ms": 1.0, "confidence": 0.9, "predicted_class": "a",
                 "success": True, "error": None, "features": None, "record_id": f"w__{size}_{i}"} for i in range(size)]
            written += store.predictions.insert(records)
            assert store.predictions.insert(records[: size // 2 + 1]) == 0
    finally:
        event.remove(store.database.engine, "before_cursor_execute", seen)
    assert written == 130 * 131 // 2 + 1200 == store.predictions.totals().count
    assert len(lookups) == 10  # 1, 2, 4, ..., 512: 1,200 ids are looked up as 512, 512 and 176 padded to 256
    assert list(database.in_lists(["a", "b", "c"])) == [["a", "b", "c", "c"]] and list(database.in_lists([])) == []
