"""The audit log: who did what, when, from where, with what outcome (kept in the store)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from utils.store import AuditRow, Store
from utils.timestamps import iso_utc


def audit_row(
    actor: str,
    action: str,
    outcome: str,
    target: str | None = None,
    status: int | None = None,
    ip: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditRow:
    return AuditRow(at=time.time(), actor=actor[:200], action=action[:100], target=target[:200] if target else None,
                    outcome=outcome, status=status, ip=ip[:64] if ip else None, details=details or {})


def record(store: Store, actor: str, action: str, outcome: str, **fields: Any) -> None:
    store.audit.record(audit_row(actor, action, outcome, **fields))


def recent(store: Store, limit: int = 100, action: str | None = None, actor: str | None = None) -> list[dict[str, Any]]:
    """The newest records first; `at` in ISO 8601 UTC."""
    return [{**asdict(entry), "at": iso_utc(entry.at)} for entry in store.audit.list(limit, action, actor)]
