"""API keys (stored as hashes only) and the audit log of what was done with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update

from utils.store.database import Database, as_row, as_rows, columns_of
from utils.store.tables import api_keys, audit_log


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    name: str
    key_hash: str
    prefix: str
    last4: str
    permissions: list[str]
    rate_limit: str | None
    created_at: float
    created_by: str
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None
    rotated_to: str | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    at: float
    actor: str
    action: str
    target: str | None
    outcome: str
    status: int | None
    ip: str | None
    details: dict[str, Any]
    id: int | None = None  # given by the store


class KeyStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def insert(self, row: ApiKeyRow) -> None:
        with self.database.write() as conn:
            conn.execute(insert(api_keys).values(**columns_of(row)))

    def insert_first(self, row: ApiKeyRow) -> bool:
        """Insert `row` only if no key exists yet (the bootstrap key); True if inserted."""
        with self.database.write() as conn:
            self.database.lock_table(conn, "api_keys")
            if conn.execute(select(func.count()).select_from(api_keys)).scalar_one():
                return False
            conn.execute(insert(api_keys).values(**columns_of(row)))
            return True

    def get(self, key_id: str) -> ApiKeyRow | None:
        with self.database.read() as conn:
            return as_row(ApiKeyRow, conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first())

    def find(self, key_hash: str) -> ApiKeyRow | None:
        """The key whose hash this is."""
        with self.database.read() as conn:
            return as_row(ApiKeyRow, conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first())

    def list(self) -> list[ApiKeyRow]:
        with self.database.read() as conn:
            return as_rows(ApiKeyRow, conn.execute(select(api_keys).order_by(api_keys.c.created_at)))

    def revoke(self, key_id: str, at: float) -> bool:
        """Revoke a key that is not revoked yet; False if there was nothing to revoke."""
        with self.database.write() as conn:
            statement = update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            return conn.execute(statement.values(revoked_at=at)).rowcount > 0

    def note_use(self, key_id: str, at: float) -> None:
        with self.database.write() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=at))

    def rotate(self, old_id: str, new_row: ApiKeyRow, old_expires_at: float) -> None:
        """Insert the replacement and shorten the old key's life in one transaction."""
        with self.database.write() as conn:
            conn.execute(insert(api_keys).values(**columns_of(new_row)))
            conn.execute(update(api_keys).where(api_keys.c.id == old_id)
                         .values(expires_at=old_expires_at, rotated_to=new_row.id))


class AuditStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def record(self, row: AuditRow) -> None:
        values = columns_of(row)
        values.pop("id")
        with self.database.write() as conn:
            conn.execute(insert(audit_log).values(**values))

    def list(self, limit: int = 100, action: str | None = None, actor: str | None = None) -> list[AuditRow]:
        """The newest records first; `action` matches as a prefix."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if action:
            query = query.where(audit_log.c.action.startswith(action))
        if actor:
            query = query.where(audit_log.c.actor == actor)
        with self.database.read() as conn:
            return as_rows(AuditRow, conn.execute(query))
