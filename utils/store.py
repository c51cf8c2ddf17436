"""The shared, durable store: SQLAlchemy engine, tables, schema upgrades and every SQL statement.

SQLite (the embedded default) runs in WAL mode with a busy timeout; write transactions start
with BEGIN IMMEDIATE so concurrent writers from several processes queue instead of failing
half-way. PostgreSQL is used unchanged when the database URL says so. Nothing outside this
module writes SQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TextClause,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

if TYPE_CHECKING:
    from utils.config import Settings

metadata = MetaData()

schema_info = Table(
    "quadra_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("upgraded_at", Float, nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False, default="system"),
    Column("description", Text, nullable=False, default=""),
    Column("tags", JSON, nullable=False, default=list),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("config", JSON, nullable=False, default=dict),
    Column("training_info", JSON, nullable=False, default=dict),
    Column("artifact_key", String(512), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("archived", Boolean, nullable=False, default=False),
)

service_state = Table(
    "service_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", JSON, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(200), nullable=False, default="system"),
)

promotions = Table(
    "promotions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(16), nullable=False),
    Column("from_version", String(128), nullable=True),
    Column("to_version", String(128), nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("expires_at", Float, nullable=False),
)


api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("last4", String(4), nullable=False),
    Column("permissions", JSON, nullable=False),
    Column("rate_limit", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("rotated_to", String(32), nullable=True),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False, index=True),
    Column("target", String(200), nullable=True),
    Column("outcome", String(20), nullable=False),
    Column("status", Integer, nullable=True),
    Column("ip", String(64), nullable=True),
    Column("details", JSON, nullable=False, default=dict),
)

rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
)


predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("model_version", String(128), nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("confidence", Float, nullable=True),
    Column("predicted_class", String(128), nullable=True),
    Column("success", Boolean, nullable=False),
    Column("error", String(200), nullable=True),
    Column("features", JSON, nullable=True),
    Column("record_id", String(96), nullable=True),
)
Index("ix_predictions_record_id", predictions.c.record_id, unique=True)

prediction_rollups = Table(
    "prediction_rollups",
    metadata,
    Column("minute", Float, primary_key=True),
    Column("model_version", String(128), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("latency_sum", Float, nullable=False),
    Column("latency_max", Float, nullable=False),
    Column("confidence_sum", Float, nullable=False),
    Column("confidence_count", Integer, nullable=False),
    Column("class_counts", JSON, nullable=False),
)

baselines = Table(
    "baselines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("statistics", JSON, nullable=False),
    Column("sample", JSON, nullable=False),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("details", JSON, nullable=False, default=dict),
    Column("resolved_at", Float, nullable=True),
)


training_jobs = Table(
    "training_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("params", JSON, nullable=False),
    Column("data", JSON, nullable=True),
    Column("progress", JSON, nullable=False, default=list),
    Column("total_epochs", Integer, nullable=False),
    Column("result_version", String(128), nullable=True),
    Column("error", Text, nullable=True),
    Column("host", String(200), nullable=True),
    Column("pid", Integer, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
)

ACTIVE_JOB_STATES = ("queued", "running")


class StoreConflict(Exception):
    """A write conflicts with the stored state (duplicate key, object in use, nothing to do)."""


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[model_versions, service_state, promotions, leases])


def _migration_2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[api_keys, audit_log, rate_limits])


def _migration_3(conn: Connection) -> None:
    metadata.create_all(conn, tables=[predictions, prediction_rollups, baselines, alerts])


def _migration_4(conn: Connection) -> None:
    metadata.create_all(conn, tables=[training_jobs])


def _migration_5(conn: Connection) -> None:
    """Prediction records get ids, so a replayed journal never counts a record twice."""
    columns = {column["name"] for column in inspect(conn).get_columns("predictions")}
    if "record_id" not in columns:
        conn.execute(text("ALTER TABLE predictions ADD COLUMN record_id VARCHAR(96)"))
    indexes = {index["name"] for index in inspect(conn).get_indexes("predictions")}
    if "ix_predictions_record_id" not in indexes:
        conn.execute(text("CREATE UNIQUE INDEX ix_predictions_record_id ON predictions (record_id)"))


# The schema's upgrade path: append a function per change; never edit a released one.
MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2, _migration_3, _migration_4, _migration_5]
SCHEMA_VERSION = len(MIGRATIONS)

PRODUCTION = "production_version"
SERVING = "serving_version"
_PG_UPGRADE_LOCK = 0x51_75_61_64  # arbitrary advisory-lock id for schema upgrades
_PG_STATE_LOCK_SPACE = 0x51_53_54  # first key of the (int, int) advisory locks on state names
_PG_STATE_LOCK = text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))")


def _row(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


def _inserted_id(result: CursorResult[Any]) -> int:
    """The integer primary key an INSERT made."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT reported no primary key")
    return int(key[0])


# `prediction_window` reads features as their JSON text (None when not kept), and rows in
# blocks smaller than the garbage collector's first threshold (700), so they die young.
_WINDOW_SELECT = {"features": "NULLIF(CAST(features AS TEXT), 'null')"}
_WINDOW_BLOCK = 500


def _window_column(name: str) -> str:
    """The SQL selecting one predictions column; any other name is a KeyError, never SQL."""
    return _WINDOW_SELECT.get(name, predictions.c[name].name)


@cache
def _window_statement(columns: tuple[str, ...]) -> TextClause:
    """The window query for a set of columns, built once: plain SQL, no result processing per row."""
    selected = ", ".join(_window_column(name) for name in columns)
    return text(f"SELECT {selected} FROM predictions WHERE id > :after_id ORDER BY id DESC LIMIT :limit")


class Store:
    """One database: connections, transactions and the statements the service needs."""

    def __init__(self, url: str, wait_seconds: float = 0.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = self._create_engine(url)
        self._wait_until_reachable(wait_seconds)
        self.upgrade()

    def _create_engine(self, url: str) -> Engine:
        if not self.is_sqlite:
            return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
        return engine

    def _wait_until_reachable(self, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE)."""
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # -- schema -------------------------------------------------------------------------

    def upgrade(self) -> int:
        """Bring the schema to SCHEMA_VERSION; safe when several processes start at once."""
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_UPGRADE_LOCK})
            metadata.create_all(conn, tables=[schema_info])
            current = conn.execute(select(schema_info.c.version).where(schema_info.c.id == 1)).scalar()
            if current is None:
                conn.execute(insert(schema_info).values(id=1, version=0, upgraded_at=time.time()))
                current = 0
            for migration in MIGRATIONS[current:]:
                migration(conn)
            if current < SCHEMA_VERSION:
                conn.execute(
                    update(schema_info).where(schema_info.c.id == 1).values(
                        version=SCHEMA_VERSION, upgraded_at=time.time()
                    )
                )
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(schema_info.c.version)).scalar_one())

    # -- model versions -----------------------------------------------------------------

    @contextmanager
    def adding_version(self, row: dict[str, Any]) -> Iterator[None]:
        """Insert a version row and keep its transaction open while the caller publishes the
        artifact; the row commits only if the body finishes, so no half version is ever visible.
        A concurrent insert of the same version waits for this transaction, then conflicts."""
        try:
            with self.write() as conn:
                conn.execute(insert(model_versions).values(**row))
                yield
        except IntegrityError:
            raise StoreConflict(f"version {row['version']} already exists") from None

    def get_version(self, version: str) -> dict[str, Any] | None:
        with self.read() as conn:
            row = conn.execute(select(model_versions).where(model_versions.c.version == version)).first()
        return _row(row) if row else None

    def list_versions(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(
                select(model_versions).order_by(model_versions.c.created_at, model_versions.c.version)
            ).all()
        return [_row(r) for r in rows]

    def update_version(self, version: str, **values: Any) -> None:
        with self.write() as conn:
            conn.execute(update(model_versions).where(model_versions.c.version == version).values(**values))

    def delete_version(self, version: str) -> dict[str, Any] | None:
        """Delete a version unless it is in production or serving; returns the deleted row."""
        with self.write() as conn:
            state = _lock_states(conn, (PRODUCTION, SERVING))
            if version in state.values():
                raise StoreConflict(f"version {version} is in use as {_role(state, version)}")
            row = conn.execute(select(model_versions).where(model_versions.c.version == version)).first()
            if row is not None:
                conn.execute(delete(model_versions).where(model_versions.c.version == version))
        return _row(row) if row else None

    # -- service state and promotions ---------------------------------------------------

    def get_states(self, names: tuple[str, ...]) -> dict[str, Any]:
        with self.read() as conn:
            return _states(conn, names)

    def get_state(self, name: str) -> Any:
        return self.get_states((name,)).get(name)

    def set_state(self, name: str, value: Any, actor: str = "system") -> None:
        with self.write() as conn:
            _lock_states(conn, (name,))  # after an update_state in progress, never under it
            _set_state(conn, name, value, actor)

    def update_state(self, name: str, change: Callable[[Any], Any], actor: str = "system") -> Any:
        """Replace a state value with `change(current value or None)` in one transaction; a
        concurrent update of the same name waits for this one, so neither is lost. Returns the
        new value. `change` must not use the store (it runs inside the transaction)."""
        with self.write() as conn:
            value = change(_lock_states(conn, (name,)).get(name))
            _set_state(conn, name, value, actor)
        return value

    def record_deployment(self, action: str, version: str, actor: str, set_production: bool,
                          expected_production: str | None = None) -> str | None:
        """Make `version` serving (and production when `set_production`), append the history
        row in the same transaction, and return the version it replaced.

        Deployments are serialised (`_lock_states`), so each history row names what it really
        replaced. Making the production version production again changes nothing and writes no
        history; a version that is already serving is not loaded again. With `expected_production`, the change is refused (StoreConflict) if
        another process changed production since the caller read it."""
        with self.write() as conn:
            state = _lock_states(conn, (PRODUCTION, SERVING))
            if expected_production is not None and state.get(PRODUCTION) != expected_production:
                raise StoreConflict(f"production changed to {state.get(PRODUCTION)} meanwhile")
            serving = state.get(SERVING) or state.get(PRODUCTION)
            replaced = state.get(PRODUCTION) if set_production else serving
            if replaced == version:
                if serving != version:  # production again, while another version was loaded: serve it
                    self._insert_deployment(conn, "load", serving, version, actor)
                return replaced
            self._insert_deployment(conn, action, replaced, version, actor)
            if set_production:
                _set_state(conn, PRODUCTION, version, actor)
        return replaced

    @staticmethod
    def _insert_deployment(conn: Connection, action: str, replaced: str | None, version: str, actor: str) -> None:
        _set_state(conn, SERVING, version, actor)
        conn.execute(insert(promotions).values(at=time.time(), actor=actor, action=action, from_version=replaced,
                                               to_version=version))

    def promotion_history(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(select(promotions).order_by(promotions.c.id.desc()).limit(limit)).all()
        return [_row(r) for r in rows]

    def production_stack(self) -> list[str]:
        """Production versions in the order they were put there; a rollback pops the top.

        A promote of the version already on top adds nothing (earlier releases recorded such
        repeats; they must not make a rollback stay where it is)."""
        stack: list[str] = []
        with self.read() as conn:
            rows = conn.execute(
                select(promotions.c.action, promotions.c.to_version)
                .where(promotions.c.action.in_(("promote", "rollback")))
                .order_by(promotions.c.id)
            ).all()
        for action, version in rows:
            if action == "rollback":
                while stack and stack[-1] != version:
                    stack.pop()
                if not stack:
                    stack.append(version)
            elif not stack or stack[-1] != version:
                stack.append(version)
        return stack

    # -- leases -------------------------------------------------------------------------

    def try_acquire_lease(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take (or renew) a named lease across processes; False while another owner holds it."""
        now = time.time()
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})
            row = conn.execute(select(leases).where(leases.c.name == name)).first()
            if row is None:
                conn.execute(insert(leases).values(name=name, owner=owner, expires_at=now + ttl_seconds))
                return True
            if row.owner != owner and row.expires_at > now:
                return False
            conn.execute(
                update(leases).where(leases.c.name == name).values(owner=owner, expires_at=now + ttl_seconds)
            )
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self.write() as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.owner == owner))


    # -- API keys -----------------------------------------------------------------------

    def insert_api_key(self, row: dict[str, Any]) -> None:
        with self.write() as conn:
            conn.execute(insert(api_keys).values(**row))

    def insert_first_api_key(self, row: dict[str, Any]) -> bool:
        """Insert `row` only if no key exists yet (the bootstrap key); True if inserted."""
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(text("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE"))
            if conn.execute(select(func.count()).select_from(api_keys)).scalar_one():
                return False
            conn.execute(insert(api_keys).values(**row))
            return True

    def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        with self.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _row(row) if row else None

    def find_api_key(self, key_hash: str) -> dict[str, Any] | None:
        with self.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
        return _row(row) if row else None

    def list_api_keys(self) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_row(r) for r in rows]

    def update_api_key(self, key_id: str, **values: Any) -> bool:
        with self.write() as conn:
            result = conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**values))
        return result.rowcount > 0

    def rotate_api_key(self, old_id: str, new_row: dict[str, Any], old_expires_at: float) -> None:
        """Insert the replacement and shorten the old key's life in one transaction."""
        with self.write() as conn:
            conn.execute(insert(api_keys).values(**new_row))
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == old_id)
                .values(expires_at=old_expires_at, rotated_to=new_row["id"])
            )

    # -- audit log ----------------------------------------------------------------------

    def record_audit(self, row: dict[str, Any]) -> None:
        with self.write() as conn:
            conn.execute(insert(audit_log).values(**row))

    def list_audit(self, limit: int = 100, action: str | None = None, actor: str | None = None) -> list[dict[str, Any]]:
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if action:
            query = query.where(audit_log.c.action.startswith(action))
        if actor:
            query = query.where(audit_log.c.actor == actor)
        with self.read() as conn:
            return [_row(r) for r in conn.execute(query).all()]

    # -- rate-limit counters (the `limits` storage over this store) ----------------------

    def counter_incr(self, key: str, expiry: float, amount: int) -> tuple[int, float]:
        """Add `amount` to a fixed-window counter, starting a new window if it expired;
        returns (count, expires_at). Plain SQL compiled once: this runs at every counter sync
        (and on every request with QUADRA_RATE_LIMIT_SYNC_SECONDS=0)."""
        with self.write() as conn:
            row = conn.execute(_COUNTER_INCR, {"key": key, "amount": amount, "now": time.time(), "expiry": expiry}).one()
        return int(row._mapping["count"]), float(row.expires_at)

    def counter_get(self, key: str) -> tuple[int, float]:
        """(count, expires_at) of a live counter, (0, now) when absent or expired."""
        now = time.time()
        with self.read() as conn:
            row = conn.execute(_COUNTER_GET, {"key": key}).first()
        if row is None or row.expires_at <= now:
            return 0, now
        return int(row._mapping["count"]), float(row.expires_at)

    def counter_clear(self, key: str | None = None) -> int:
        """Delete one counter, or every counter when `key` is None; returns how many."""
        with self.write() as conn:
            statement = delete(rate_limits) if key is None else delete(rate_limits).where(rate_limits.c.key == key)
            return conn.execute(statement).rowcount

    def counter_purge_expired(self) -> int:
        with self.write() as conn:
            return conn.execute(delete(rate_limits).where(rate_limits.c.expires_at <= time.time())).rowcount


    # -- monitoring -----------------------------------------------------------------------

    def insert_predictions(self, rows: list[dict[str, Any]], total_name: str) -> int:
        """Insert a batch of prediction records and add them to the running totals, atomically.

        Records whose `record_id` is already stored are skipped; returns how many were new."""
        if not rows:
            return 0
        with self.write() as conn:
            totals = _lock_states(conn, (total_name,)).get(total_name) or {"count": 0, "errors": 0}
            ids = [r["record_id"] for r in rows if r.get("record_id")]
            if ids:
                known = set(conn.execute(select(predictions.c.record_id).where(predictions.c.record_id.in_(ids))).scalars())
                rows = [r for r in rows if r.get("record_id") not in known]
            if not rows:
                return 0
            errors = sum(1 for r in rows if not r["success"])
            conn.execute(insert(predictions), rows)
            _set_state(conn, total_name, {"count": totals["count"] + len(rows), "errors": totals["errors"] + errors}, "monitor")
        return len(rows)

    def recent_predictions(self, limit: int, after_id: int = 0, columns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """The newest `limit` records with id > after_id, oldest first."""
        selected = [predictions.c[name] for name in columns] if columns else [predictions]
        query = select(*selected).where(predictions.c.id > after_id).order_by(predictions.c.id.desc()).limit(limit)
        with self.read() as conn:
            rows = conn.execute(query).all()
        return [_row(r) for r in reversed(rows)]

    def prediction_window(self, limit: int, after_id: int, columns: tuple[str, ...]) -> dict[str, list[Any]]:
        """What `recent_predictions` reads, column by column: {column: its values, oldest first},
        except that `features` stay JSON text (None when not kept) for the caller to parse.

        A window can hold 100k records, so this skips what costs per record there: SQLAlchemy's
        result processing, a dict per record, and keeping an object per record alive until the
        end (a block of rows is transposed as it arrives, then dropped): with that many young
        objects the garbage collector's full passes cost more than the read itself."""
        values: list[list[Any]] = [[] for _ in columns]
        with self.read() as conn:
            result = conn.execute(_window_statement(columns), {"after_id": after_id, "limit": limit})
            for rows in result.partitions(_WINDOW_BLOCK):
                for column, block in zip(values, zip(*rows, strict=True), strict=True):
                    column.extend(block)
        for column in values:
            column.reverse()
        window = dict(zip(columns, values, strict=True))
        if "success" in window:  # SQLite returns booleans as 0/1
            window["success"] = list(map(bool, window["success"]))
        return window

    def last_prediction_id(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(func.max(predictions.c.id))).scalar() or 0)

    def count_predictions_since(self, since: float, after_id: int = 0) -> int:
        with self.read() as conn:
            return int(conn.execute(
                select(func.count()).select_from(predictions).where(predictions.c.at >= since, predictions.c.id > after_id)
            ).scalar_one())

    def roll_up_predictions(self, before: float) -> int:
        """Fold raw records older than `before` into per-minute rows, then delete them."""
        with self.write() as conn:
            rows = conn.execute(
                select(predictions.c.at, predictions.c.model_version, predictions.c.latency_ms, predictions.c.confidence,
                       predictions.c.predicted_class, predictions.c.success).where(predictions.c.at < before)
            ).all()
            minutes: dict[tuple[float, str], dict[str, Any]] = {}
            for at, version, latency, confidence, predicted, success in rows:
                bucket = minutes.setdefault((at - at % 60, version or ""), {
                    "count": 0, "errors": 0, "latency_sum": 0.0, "latency_max": 0.0,
                    "confidence_sum": 0.0, "confidence_count": 0, "class_counts": {},
                })
                bucket["count"] += 1
                bucket["errors"] += 0 if success else 1
                bucket["latency_sum"] += latency
                bucket["latency_max"] = max(bucket["latency_max"], latency)
                if confidence is not None:
                    bucket["confidence_sum"] += confidence
                    bucket["confidence_count"] += 1
                if predicted is not None:
                    bucket["class_counts"][predicted] = bucket["class_counts"].get(predicted, 0) + 1
            for (minute, version), bucket in minutes.items():
                existing = conn.execute(select(prediction_rollups).where(
                    prediction_rollups.c.minute == minute, prediction_rollups.c.model_version == version)).first()
                if existing is None:
                    conn.execute(insert(prediction_rollups).values(minute=minute, model_version=version, **bucket))
                    continue
                merged = dict(existing.class_counts)
                for name, count in bucket["class_counts"].items():
                    merged[name] = merged.get(name, 0) + count
                conn.execute(update(prediction_rollups).where(
                    prediction_rollups.c.minute == minute, prediction_rollups.c.model_version == version).values(
                    count=existing.count + bucket["count"], errors=existing.errors + bucket["errors"],
                    latency_sum=existing.latency_sum + bucket["latency_sum"],
                    latency_max=max(existing.latency_max, bucket["latency_max"]),
                    confidence_sum=existing.confidence_sum + bucket["confidence_sum"],
                    confidence_count=existing.confidence_count + bucket["confidence_count"], class_counts=merged))
            conn.execute(delete(predictions).where(predictions.c.at < before))
        return len(rows)

    def rollups(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(select(prediction_rollups).where(prediction_rollups.c.minute >= since)
                                .order_by(prediction_rollups.c.minute)).all()
        return [_row(r) for r in rows]

    def insert_baseline(self, created_by: str, statistics: dict[str, Any], sample: dict[str, Any]) -> int:
        with self.write() as conn:
            result = conn.execute(insert(baselines).values(
                created_at=time.time(), created_by=created_by, statistics=statistics, sample=sample))
            return _inserted_id(result)

    def latest_baseline(self) -> dict[str, Any] | None:
        with self.read() as conn:
            row = conn.execute(select(baselines).order_by(baselines.c.id.desc()).limit(1)).first()
        return _row(row) if row else None

    def delete_baselines(self) -> int:
        with self.write() as conn:
            return conn.execute(delete(baselines)).rowcount

    def insert_alert(self, kind: str, severity: str, message: str, details: dict[str, Any]) -> int:
        with self.write() as conn:
            result = conn.execute(insert(alerts).values(
                at=time.time(), kind=kind, severity=severity, message=message, details=details))
            return _inserted_id(result)

    def resolve_alerts(self, kind: str) -> int:
        with self.write() as conn:
            return conn.execute(update(alerts).where(alerts.c.kind == kind, alerts.c.resolved_at.is_(None))
                                .values(resolved_at=time.time())).rowcount

    def list_alerts(self, limit: int = 50, after_id: int = 0) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(select(alerts).where(alerts.c.id > after_id).order_by(alerts.c.id.desc()).limit(limit)).all()
        return [_row(r) for r in rows]


    # -- training jobs ------------------------------------------------------------------

    def insert_job_if_capacity(self, row: dict[str, Any], max_active: int) -> bool:
        """Insert a queued job unless `max_active` jobs are already queued or running."""
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(text("LOCK TABLE training_jobs IN SHARE ROW EXCLUSIVE MODE"))
            active = conn.execute(select(func.count()).select_from(training_jobs)
                                  .where(training_jobs.c.status.in_(ACTIVE_JOB_STATES))).scalar_one()
            if active >= max_active:
                return False
            conn.execute(insert(training_jobs).values(**row))
            return True

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self.read() as conn:
            row = conn.execute(select(training_jobs).where(training_jobs.c.id == job_id)).first()
        return _row(row) if row else None

    def list_jobs(self, limit: int = 50, active_only: bool = False) -> list[dict[str, Any]]:
        query = select(training_jobs).order_by(training_jobs.c.created_at.desc()).limit(limit)
        if active_only:
            query = query.where(training_jobs.c.status.in_(ACTIVE_JOB_STATES))
        with self.read() as conn:
            return [_row(r) for r in conn.execute(query).all()]

    def update_job(self, job_id: str, only_if_active: bool = False, **values: Any) -> bool:
        """Update a job; with `only_if_active`, a finished job is left alone (False)."""
        statement = update(training_jobs).where(training_jobs.c.id == job_id)
        if only_if_active:
            statement = statement.where(training_jobs.c.status.in_(ACTIVE_JOB_STATES))
        with self.write() as conn:
            return conn.execute(statement.values(**values)).rowcount > 0

    def append_job_progress(self, job_id: str, entry: dict[str, Any]) -> bool:
        """Add an epoch's metrics and beat the heart; returns whether a cancel was requested."""
        with self.write() as conn:
            row = conn.execute(select(training_jobs.c.progress, training_jobs.c.cancel_requested)
                               .where(training_jobs.c.id == job_id)).first()
            if row is None:  # the job's row is gone: nothing to report to, so stop
                return True
            conn.execute(update(training_jobs).where(training_jobs.c.id == job_id)
                         .values(progress=[*row.progress, entry], heartbeat_at=time.time()))
            return bool(row.cancel_requested)


_COUNTER_INCR = text(
    "INSERT INTO rate_limits (key, count, expires_at) VALUES (:key, :amount, :now + :expiry) "
    "ON CONFLICT (key) DO UPDATE SET "
    "count = CASE WHEN rate_limits.expires_at <= :now THEN :amount ELSE rate_limits.count + :amount END, "
    "expires_at = CASE WHEN rate_limits.expires_at <= :now THEN :now + :expiry ELSE rate_limits.expires_at END "
    "RETURNING count, expires_at"
)
_COUNTER_GET = text("SELECT count, expires_at FROM rate_limits WHERE key = :key")


def _states(conn: Connection, names: tuple[str, ...]) -> dict[str, Any]:
    rows = conn.execute(
        select(service_state.c.name, service_state.c.value).where(service_state.c.name.in_(names))
    ).all()
    return {name: value for name, value in rows}


def _lock_states(conn: Connection, names: tuple[str, ...]) -> dict[str, Any]:
    """Read state values that this write transaction will change from what it read.

    SQLite's BEGIN IMMEDIATE already lets one writer in at a time. PostgreSQL's default READ
    COMMITTED does not: two transactions would read the same value and the later write would
    undo the earlier one (two workers flushing at once lost a flush from the totals). There
    each name is locked first, with a transaction-scoped advisory lock (a name with no row
    yet can be locked too), in name order so that two lockers never deadlock."""
    if conn.dialect.name != "sqlite":
        for name in sorted(set(names)):
            conn.execute(_PG_STATE_LOCK, {"space": _PG_STATE_LOCK_SPACE, "name": name})
    return _states(conn, names)


def _set_state(conn: Connection, name: str, value: Any, actor: str) -> None:
    values = {"value": value, "updated_at": time.time(), "updated_by": actor}
    dialect_insert = sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert
    statement = dialect_insert(service_state).values(name=name, **values)
    conn.execute(statement.on_conflict_do_update(index_elements=[service_state.c.name], set_=values))


def _role(state: dict[str, Any], version: str) -> str:
    return "production" if state.get(PRODUCTION) == version else "the serving version"


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" hook below emits BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_sqlite_transaction(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


class UsesConfiguredStore:
    """For the seed API's classes, which may be built without a store: the store of the
    QUADRA_* configuration, opened on first use."""

    _store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            from utils.config import current_settings

            self._store = store_for(current_settings())
        return self._store


def store_for(settings: Settings) -> Store:
    """The process-wide Store of a configuration."""
    return get_store(settings.database_url, settings.store_wait_seconds)


FOLDER_DATABASE = "quadra.db"


def folder_store(folder: str | Path) -> Store:
    """The self-contained store of a folder that is not the service's (the seed API's folder
    rule): an SQLite file inside it."""
    return get_store(f"sqlite:///{Path(folder).resolve() / FOLDER_DATABASE}")


def get_store(url: str, wait_seconds: float = 0.0) -> Store:
    """The process-wide Store for `url` (one engine and pool per database per process)."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = Store(url, wait_seconds)
        return store
