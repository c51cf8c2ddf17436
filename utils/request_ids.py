"""Request ids: the service makes UUIDv7s (RFC 9562), so an id tells when it was made.

A prediction's id is `<request_id>:<row>`; feedback uses the time in an id the service made
to tell an expired prediction (older than the label horizon) from one that never existed.
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62
_RANDOM_A = (1 << 12) - 1
_RANDOM_B = (1 << 62) - 1


def new_request_id() -> str:
    """A UUIDv7 as 32 hex digits: 48 bits of Unix milliseconds, then 74 random bits."""
    milliseconds = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (milliseconds << 80) | _VERSION_7 | ((random_bits >> 62) & _RANDOM_A) << 64 | _VARIANT_RFC | (random_bits & _RANDOM_B)
    return f"{value:032x}"


def prediction_id(request_id: str, row: int) -> str:
    """The id of row `row` of a request's answer, by which feedback labels it."""
    return f"{request_id}:{row}"


def made_at(prediction_or_request_id: str) -> float | None:
    """When a request id the service made (a UUIDv7, with or without dashes, optionally
    followed by `:<row>`) was made, in epoch seconds; None for any other id."""
    request_id = prediction_or_request_id.rpartition(":")[0] or prediction_or_request_id
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return None
    if parsed.version != 7 or parsed.variant != uuid.RFC_4122:
        return None
    return (parsed.int >> 80) / 1000.0
