"""One database: the SQLAlchemy engine, transactions, the SQLite/PostgreSQL differences and
schema upgrades. The domain stores run their statements through it.

SQLite (the embedded default) runs in WAL mode with a busy timeout; write transactions start
with BEGIN IMMEDIATE so concurrent writers from several processes queue instead of failing
half-way. PostgreSQL is used unchanged when the database URL says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from sqlalchemy import Connection, Engine, Row, create_engine, event, insert, select, text, update
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import OperationalError

from utils.store.tables import MIGRATIONS, SCHEMA_VERSION, metadata, schema_info

_PG_UPGRADE_LOCK = 0x51_75_61_64  # arbitrary advisory-lock id for schema upgrades


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

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(schema_info.c.version)).scalar_one())


class _Dataclass(Protocol):
    __dataclass_fields__: ClassVar[dict[str, Any]]


RowType = TypeVar("RowType", bound=_Dataclass)


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


def _create_engine(url: str, is_sqlite: bool) -> Engine:
    if not is_sqlite:
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


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
