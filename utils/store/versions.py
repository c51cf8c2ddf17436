"""Model versions, which one is in production and serving, and the history of changes."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from utils.store.database import Database, StoreConflict, as_row, as_rows, columns_of
from utils.store.service_state import lock_states, read_states, write_state
from utils.store.tables import model_versions, promotions

PRODUCTION = "production_version"
SERVING = "serving_version"


@dataclass(frozen=True, slots=True)
class VersionRow:
    version: str
    created_at: float
    created_by: str
    description: str
    tags: list[str]
    metrics: dict[str, Any]
    config: dict[str, Any]
    training_info: dict[str, Any]
    artifact_key: str
    sha256: str
    size_bytes: int
    archived: bool


@dataclass(frozen=True, slots=True)
class PromotionRow:
    id: int
    at: float
    actor: str
    action: str
    from_version: str | None
    to_version: str


@dataclass(frozen=True, slots=True)
class Deployment:
    """The production version (what a restart serves) and the serving one (what is loaded)."""

    production: str | None
    serving: str | None

    @classmethod
    def of(cls, state: dict[str, Any]) -> Deployment:
        return cls(production=state.get(PRODUCTION), serving=state.get(SERVING) or state.get(PRODUCTION))

    def role_of(self, version: str) -> str | None:
        """"production", "the serving version", or None when `version` is neither."""
        if version == self.production:
            return "production"
        return "the serving version" if version == self.serving else None


class VersionStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    @contextmanager
    def adding(self, row: VersionRow) -> Iterator[None]:
        """Insert a version row and keep its transaction open while the caller publishes the
        artifact; the row commits only if the body finishes, so no half version is ever visible.
        A concurrent insert of the same version waits for this transaction, then conflicts."""
        try:
            with self.database.write() as conn:
                conn.execute(insert(model_versions).values(**columns_of(row)))
                yield
        except IntegrityError:
            raise StoreConflict(f"version {row.version} already exists") from None

    def get(self, version: str) -> VersionRow | None:
        with self.database.read() as conn:
            return as_row(VersionRow, conn.execute(select(model_versions).where(model_versions.c.version == version)).first())

    def list(self) -> list[VersionRow]:
        with self.database.read() as conn:
            rows = conn.execute(select(model_versions).order_by(model_versions.c.created_at, model_versions.c.version))
            return as_rows(VersionRow, rows)

    def move_artifact(self, version: str, artifact_key: str, archived: bool) -> None:
        """Point a version at its artifact's new place (archived: gzip-compressed)."""
        with self.database.write() as conn:
            conn.execute(update(model_versions).where(model_versions.c.version == version)
                         .values(artifact_key=artifact_key, archived=archived))

    def delete(self, version: str) -> VersionRow | None:
        """Delete a version unless it is in production or serving; returns the deleted row."""
        with self.database.write() as conn:
            role = Deployment.of(lock_states(conn, (PRODUCTION, SERVING))).role_of(version)
            if role is not None:
                raise StoreConflict(f"version {version} is in use as {role}")
            row = as_row(VersionRow, conn.execute(select(model_versions).where(model_versions.c.version == version)).first())
            if row is not None:
                conn.execute(delete(model_versions).where(model_versions.c.version == version))
        return row

    def deployment(self) -> Deployment:
        with self.database.read() as conn:
            return Deployment.of(read_states(conn, (PRODUCTION, SERVING)))

    def restore_deployment(self, deployment: Deployment, actor: str) -> None:
        """Set production and serving as a backup recorded them (a None is left as it is)."""
        with self.database.write() as conn:
            lock_states(conn, (PRODUCTION, SERVING))
            for name, version in ((PRODUCTION, deployment.production), (SERVING, deployment.serving)):
                if version:
                    write_state(conn, name, version, actor)

    def deploy(self, action: str, version: str, actor: str, set_production: bool,
               expected_production: str | None = None) -> str | None:
        """Make `version` serving (and production when `set_production`), append the history
        row in the same transaction, and return the version it replaced.

        Deployments are serialised (`lock_states`), so each history row names what it really
        replaced. Making the production version production again changes nothing and writes no
        history; a version that is already serving is not loaded again. With
        `expected_production`, the change is refused (StoreConflict) if another process changed
        production since the caller read it."""
        with self.database.write() as conn:
            current = Deployment.of(lock_states(conn, (PRODUCTION, SERVING)))
            if expected_production is not None and current.production != expected_production:
                raise StoreConflict(f"production changed to {current.production} meanwhile")
            replaced = current.production if set_production else current.serving
            if replaced == version:
                if current.serving != version:  # production again, while another version was loaded: serve it
                    _insert_deployment(conn, "load", current.serving, version, actor)
                return replaced
            _insert_deployment(conn, action, replaced, version, actor)
            if set_production:
                write_state(conn, PRODUCTION, version, actor)
        return replaced

    def history(self, limit: int = 100) -> builtins.list[PromotionRow]:
        with self.database.read() as conn:
            return as_rows(PromotionRow, conn.execute(select(promotions).order_by(promotions.c.id.desc()).limit(limit)))

    def rollback_target(self, current: str | None) -> str | None:
        """The newest production version before `current` that is not archived, if any."""
        for candidate in reversed(self.production_stack()):
            row = self.get(candidate) if candidate != current else None
            if row is not None and not row.archived:
                return candidate
        return None

    def production_stack(self) -> builtins.list[str]:
        """Production versions in the order they were put there; a rollback pops the top.

        A promote of the version already on top adds nothing (earlier releases recorded such
        repeats; they must not make a rollback stay where it is)."""
        stack: builtins.list[str] = []
        with self.database.read() as conn:
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


def _insert_deployment(conn: Connection, action: str, replaced: str | None, version: str, actor: str) -> None:
    write_state(conn, SERVING, version, actor)
    conn.execute(insert(promotions).values(at=time.time(), actor=actor, action=action, from_version=replaced,
                                           to_version=version))
