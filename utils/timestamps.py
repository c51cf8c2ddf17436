"""Timestamps as the API shows them: ISO 8601 in UTC, e.g. "2026-11-30T15:50:00.123456Z"
(HTTP responses, the live channel, backups and the registry mirror). The store keeps epoch
seconds; this is the one conversion."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso_utc(timestamp: float) -> str: ...
@overload
def iso_utc(timestamp: None) -> None: ...
@overload
def iso_utc(timestamp: float | None) -> str | None: ...


def iso_utc(timestamp: float | None) -> str | None:
    """`timestamp` (epoch seconds) as ISO 8601 UTC with a "Z"; None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
