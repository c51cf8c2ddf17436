"""One database: the SQLAlchemy engine, transactions, the SQLite/PostgreSQL differences and
schema upgrades. The domain stores run their statements through it.

SQLite (the embedded default) runs in WAL mode with a busy timeout; write transactions start
with BEGIN IMMEDIATE so concurrent writers from several processes queue instead of failing
half-way. PostgreSQL is used unchanged when the database URL says so.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic_core import PydanticSerializationError, to_json
from sqlalchemy import JSON, Connection, Dialect, Engine, Row, Table, create_engine, event, insert, select, text, update
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import OperationalError

from utils.cooperation import let_other_requests_run
from utils.store.tables import MIGRATIONS, SCHEMA_VERSION, metadata, schema_info

_PG_UPGRADE_LOCK = 0x51_75_61_64  # arbitrary advisory-lock id for schema upgrades
BUSY_TIMEOUT_MS = 30_000
WRITE_LOCK_WAIT_SECONDS = BUSY_TIMEOUT_MS / 1000
# Between two tries for SQLite's write lock: every 0.5 ms for the first second, then every 10 ms.
# The store is the bottleneck of a worker saturated at batch 32, and its lock passes from one
# worker to the next once per transaction: a waiter that slept longer left the lock idle after
# each commit (with a backoff to 10 ms: 20-30% fewer requests, p99 2-3× higher, bench/NOTES.md).
WRITE_LOCK_POLL_SECONDS = 0.0005
WRITE_LOCK_SLOW_POLL_AFTER = 1.0
WRITE_LOCK_SLOW_POLL_SECONDS = 0.01


class StoreConflict(Exception):
    """A write conflicts with the stored state (duplicate key, object in use, nothing to do)."""


class Database:
    """Connections and transactions on one database URL, with its schema brought up to date."""

    def __init__(self, url: str, wait_seconds: float = 0.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _create_engine(url, self.is_sqlite)
        self._wait_until_reachable(wait_seconds)
        self.upgrade()

    def _wait_until_reachable(self, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                self.ping()
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

    def lock_table(self, conn: Connection, table: str) -> None:
        """Keep other writers of `table` out until this transaction ends (BEGIN IMMEDIATE
        already does so on SQLite), for check-then-insert statements such as capacity limits."""
        if not self.is_sqlite:
            conn.execute(text(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))

    def lock_name(self, conn: Connection, name: str) -> None:
        """Serialise transactions that work on the row called `name` (which may not exist yet)."""
        if not self.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

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
                    update(schema_info).where(schema_info.c.id == 1).values(version=SCHEMA_VERSION, upgraded_at=time.time())
                )
        return SCHEMA_VERSION

    def size_bytes(self) -> int:
        """The database's size on disk: SQLite's file with its WAL, or PostgreSQL's database."""
        if not self.is_sqlite:
            with self.read() as conn:
                return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
        path = make_url(self.url).database
        if not path or path == ":memory:":
            return 0
        files = (Path(path), Path(f"{path}-wal"), Path(f"{path}-shm"))
        return sum(file.stat().st_size for file in files if file.exists())

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(schema_info.c.version)).scalar_one())


class _Dataclass(Protocol):
    __dataclass_fields__: ClassVar[dict[str, Any]]


RowType = TypeVar("RowType", bound=_Dataclass)
Value = TypeVar("Value")
IN_LIST_SIZE = 512


def as_row(row_type: type[RowType], row: Row[Any] | None) -> RowType | None:
    """A result row as its typed row (the dataclass's fields are the table's columns)."""
    return None if row is None else row_type(**row._mapping)


def as_rows(row_type: type[RowType], rows: Iterable[Row[Any]]) -> list[RowType]:
    return [row_type(**row._mapping) for row in rows]


def columns_of(row: _Dataclass) -> dict[str, Any]:
    """A typed row as the column values an INSERT takes."""
    return {field.name: getattr(row, field.name) for field in dataclasses.fields(row)}


def inserted_id(result: CursorResult[Any]) -> int:
    """The integer primary key an INSERT made."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT reported no primary key")
    return int(key[0])


def in_lists(values: Sequence[Value]) -> Iterator[list[Value]]:
    """`values` as the lists of `IN (...)` lookups: IN_LIST_SIZE at most (far below SQLite's and
    PostgreSQL's parameter limits), each padded with its last value to the next power of two.
    Each length of an IN list is a statement of its own that the drivers keep prepared
    (sqlite3 up to 128 per connection, each about 20 KB at a few hundred values), and the
    monitoring flush looks up a different number of record ids each time: SQLite's memory in
    one process grew from 1.3 to 13.2 MiB over 300,000 requests (bench/NOTES.md). This way there
    are ten lengths; a repeated value changes no IN's answer."""
    for start in range(0, len(values), IN_LIST_SIZE):
        chunk = list(values[start:start + IN_LIST_SIZE])
        size = 1 << (len(chunk) - 1).bit_length()
        yield chunk + [chunk[-1]] * (size - len(chunk))


def select_in(conn: Connection, table: Table, columns: tuple[str, ...], key: str,
              values: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    """The `columns` of the rows of `table` whose `key` is one of `values`, as the driver
    returns them, looked up in `in_lists`. Each IN length's statement is written once, in the
    driver's parameter style: SQLAlchemy's `in_()` built and compiled a bind parameter per
    value each time, 2.1 µs a looked-up id against 0.5 µs this way (the monitoring flush
    looks up every record's id)."""
    for chunk in in_lists(values):
        yield from conn.exec_driver_sql(_select_in_plan(conn.dialect, table, columns, key, len(chunk)), tuple(chunk))


@cache
def _select_in_plan(dialect: Dialect, table: Table, columns: tuple[str, ...], key: str, length: int) -> str:
    quote = dialect.identifier_preparer.quote
    return (f"SELECT {', '.join(quote(table.c[name].name) for name in columns)} FROM {quote(table.name)} "
            f"WHERE {quote(table.c[key].name)} IN ({', '.join(_parameter_marker(dialect) for _ in range(length))})")


def _parameter_marker(dialect: Dialect) -> str:
    return "?" if dialect.paramstyle == "qmark" else "%s"


def read_columns(result: CursorResult[Any], width: int, block: int) -> list[list[Any]]:
    """A large result's rows as `width` columns, read `block` rows at a time with the worker's
    other requests running between two blocks (a 100k-row read held an async worker for
    hundreds of milliseconds). Each block is transposed as it arrives and dropped, so no object
    per row outlives its block: with 100k young objects alive the garbage collector's full
    passes cost more than the read itself."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for rows in result.partitions(block):
        for column, values in zip(columns, zip(*rows, strict=True), strict=True):
            column.extend(values)
        let_other_requests_run()
    return columns


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedRows:
    """Rows of `table` as the driver's INSERT parameters: the per-row work of an INSERT, done
    before the transaction that writes them. A write transaction holds SQLite's one writer lock,
    which the workers of a service saturated at batch 32 queue for: whatever it holds the lock
    for bounds the rate of the whole service (bench/NOTES.md, issue 18)."""

    table: Table
    columns: tuple[str, ...]
    values: list[tuple[Any, ...]]


def encode_rows(table: Table, rows: Sequence[Mapping[str, Any]]) -> EncodedRows:
    """`rows` as INSERT parameters of `table`, each JSON column encoded as the engine encodes
    it (Python None as JSON `null`, as SQLAlchemy's JSON type stores it). Keys that are not
    columns are ignored."""
    if not rows:
        return EncodedRows(table, (), [])
    columns = tuple(column.name for column in table.columns if column.name in rows[0])
    json_positions = _json_positions(table, columns)
    pick = itemgetter(*columns)
    values = []
    for row in rows:
        value = list(pick(row))
        for i in json_positions:
            value[i] = _json_text(value[i])
        values.append(tuple(value))
    return EncodedRows(table, columns, values)


def insert_encoded(conn: Connection, rows: EncodedRows, skip_conflicts_on: str | None = None) -> None:
    """INSERT encoded rows in the caller's transaction through the driver's own executemany
    (the same INSERT through SQLAlchemy's executemany cost more in per-row parameter processing
    than SQLite's own work); with `skip_conflicts_on`, a row whose key is stored is skipped (ON
    CONFLICT DO NOTHING, SQLite and PostgreSQL alike)."""
    if rows.values:
        conn.exec_driver_sql(_insert_sql(conn.dialect, rows.table, rows.columns, skip_conflicts_on), rows.values)


@cache
def _insert_sql(dialect: Dialect, table: Table, columns: tuple[str, ...], skip_conflicts_on: str | None) -> str:
    """The INSERT in the driver's parameter style."""
    quote = dialect.identifier_preparer.quote
    sql = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in columns)}) "
           f"VALUES ({', '.join(_parameter_marker(dialect) for _ in columns)})")
    if skip_conflicts_on:
        sql += f" ON CONFLICT ({quote(skip_conflicts_on)}) DO NOTHING"
    return sql


@cache
def _json_positions(table: Table, columns: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(i for i, name in enumerate(columns) if isinstance(table.c[name].type, JSON))


def _json_text(value: Any) -> str:
    """JSON columns' encoder: pydantic-core, about six times faster than `json.dumps` (each
    monitoring row carries two such columns, encoded by the flusher on the worker's event
    loop), with NaN and Infinity written as `json.dumps` writes them. The text is compact and
    UTF-8; read back, the values are the same. What pydantic-core cannot encode (a lone
    surrogate in a string) goes through `json.dumps`, as before."""
    try:
        return to_json(value, inf_nan_mode="constants").decode()
    except PydanticSerializationError:
        return json.dumps(value)


def _create_engine(url: str, is_sqlite: bool) -> Engine:
    if not is_sqlite:
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, json_serializer=_json_text)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, json_serializer=_json_text)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" hook below emits BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_sqlite_transaction(conn: Connection) -> None:
    if conn.get_execution_options().get("sqlite_immediate", False):
        _take_write_lock(conn.connection.dbapi_connection)
    else:
        conn.exec_driver_sql("BEGIN")


def _take_write_lock(dbapi_connection: Any) -> None:
    """BEGIN IMMEDIATE, waiting for another writer with `time.sleep` between tries instead of
    in SQLite's busy handler. That handler sleeps in C, up to 100 ms a time, and under an async
    worker (eventlet, gevent) a sleep in C stalls every request of the process, not one: under
    load the workers' monitoring flushes queued on each other's locks and p99 reached hundreds
    of milliseconds. `time.sleep` is the event loop's own sleep there (monkey-patched), and an
    ordinary one under threads. The busy timeout stays for the statements that follow. Errors
    leave as SQLAlchemy's, as every other statement's do (the "begin" hook runs outside its
    wrapping)."""
    if not isinstance(dbapi_connection, sqlite3.Connection):  # another SQLite driver: its own busy handler
        dbapi_connection.execute("BEGIN IMMEDIATE")
        return
    try:
        _retry_begin_immediate(dbapi_connection)
    except sqlite3.Error as exc:
        raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc


def _retry_begin_immediate(dbapi_connection: sqlite3.Connection) -> None:
    started = time.monotonic()
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:  # SQLITE_BUSY and its extended codes (e.g. WAL recovery)
                waited = time.monotonic() - started
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or waited >= WRITE_LOCK_WAIT_SECONDS:
                    raise
            time.sleep(WRITE_LOCK_POLL_SECONDS if waited < WRITE_LOCK_SLOW_POLL_AFTER else WRITE_LOCK_SLOW_POLL_SECONDS)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
