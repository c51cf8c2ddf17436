"""Named service state, shared by every process: the statements other stores use inside their
own transactions (deployments, prediction totals, drift results, alert episodes):
`lock_states` before reading what a write will change, `write_state` to change it; and the
two small stores of this kind of their own, the mode and leases.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from utils.store.database import Database
from utils.store.tables import leases, service_state

MODE = "mode"
_PG_STATE_LOCK_SPACE = 0x51_53_54  # first key of the (int, int) advisory locks on state names
_PG_STATE_LOCK = text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))")


def read_states(conn: Connection, names: tuple[str, ...]) -> dict[str, Any]:
    rows = conn.execute(select(service_state.c.name, service_state.c.value).where(service_state.c.name.in_(names))).all()
    return {name: value for name, value in rows}


def lock_states(conn: Connection, names: tuple[str, ...]) -> dict[str, Any]:
    """Read state values that this write transaction will change from what it read.

    SQLite's BEGIN IMMEDIATE already lets one writer in at a time. PostgreSQL's default READ
    COMMITTED does not: two transactions would read the same value and the later write would
    undo the earlier one (two workers flushing at once lost a flush from the totals). There
    each name is locked first, with a transaction-scoped advisory lock (a name with no row
    yet can be locked too), in name order so that two lockers never deadlock."""
    if conn.dialect.name != "sqlite":
        for name in sorted(set(names)):
            conn.execute(_PG_STATE_LOCK, {"space": _PG_STATE_LOCK_SPACE, "name": name})
    return read_states(conn, names)


def write_state(conn: Connection, name: str, value: Any, actor: str) -> None:
    values = {"value": value, "updated_at": time.time(), "updated_by": actor}
    dialect_insert = sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert
    statement = dialect_insert(service_state).values(name=name, **values)
    conn.execute(statement.on_conflict_do_update(index_elements=[service_state.c.name], set_=values))


@dataclass(frozen=True, slots=True)
class ModeRecord:
    """The deployment's mode and the last change of it."""

    mode: str
    reason: str
    changed_by: str
    changed_at: float | None


class ModeStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def get(self) -> ModeRecord | None:
        """The stored mode; None until the mode was first changed."""
        with self.database.read() as conn:
            stored = read_states(conn, (MODE,)).get(MODE)
        return ModeRecord(**stored) if stored else None

    def set(self, record: ModeRecord) -> None:
        with self.database.write() as conn:
            lock_states(conn, (MODE,))
            write_state(conn, MODE, asdict(record), record.changed_by)


class LeaseStore:
    """Named leases across processes and hosts (one cleaner, one bootstrap at a time)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def try_acquire(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take (or renew) a named lease; False while another owner holds it."""
        now = time.time()
        with self.database.write() as conn:
            self.database.lock_name(conn, name)
            row = conn.execute(select(leases).where(leases.c.name == name)).first()
            if row is None:
                conn.execute(insert(leases).values(name=name, owner=owner, expires_at=now + ttl_seconds))
                return True
            if row.owner != owner and row.expires_at > now:
                return False
            conn.execute(update(leases).where(leases.c.name == name).values(owner=owner, expires_at=now + ttl_seconds))
            return True

    def release(self, name: str, owner: str) -> None:
        with self.database.write() as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.owner == owner))
