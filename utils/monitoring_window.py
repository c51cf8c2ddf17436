"""The monitoring window every process shares: the newest records in the store, read column
by column, and the helpers that turn its columns into numbers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from itertools import compress
from typing import Any

import numpy as np
from pydantic_core import from_json

from utils.cooperation import let_other_requests_run
from utils.store import Store

FEATURE_BLOCK = 500


class MonitoringWindow:
    """The last `size` records after the window's start (reset by `reset_counters`)."""

    def __init__(self, store: Store, size: int) -> None:
        self.store = store
        self.size = size

    def columns(self, *names: str, after_id: int = 0) -> dict[str, list[Any]]:
        """The window's records (those after `after_id`, too), column by column, oldest first."""
        start = max(self.store.predictions.window_start(), after_id)
        return self.store.predictions.window(self.size, start, names)

    def successful(self, *names: str, after_id: int = 0) -> dict[str, list[Any]]:
        """The window's successful records, column by column, oldest first."""
        window = self.columns(*names, "success", after_id=after_id)
        success = window.pop("success")
        return {name: list(compress(values, success)) for name, values in window.items()}


def present(values: Iterable[Any]) -> list[Any]:
    """The values that are not None (missing features or confidence)."""
    return [value for value in values if value is not None]


def feature_rows(texts: Iterable[str | None]) -> list[list[float]]:
    """The kept feature rows of a window (JSON texts, None where not kept), parsed in one go.

    pydantic_core's parser gives the same values as `json.loads` (floats bit for bit, ints as
    ints) in a third of the time, which is most of the cost of drift over a large window."""
    rows: list[list[float]] = from_json("[" + ",".join(present(texts)) + "]")
    return rows


def feature_matrix(texts: list[str]) -> np.ndarray:
    """Feature rows (JSON texts) as one float matrix, parsed FEATURE_BLOCK rows at a time: a
    Python list per row of a 100k window, all alive at once, costs more in garbage collection
    than in parsing (a block stays under the collector's first threshold, 700). The worker's
    other requests run between two blocks."""
    blocks = []
    for start in range(0, len(texts), FEATURE_BLOCK):
        blocks.append(np.array(feature_rows(texts[start:start + FEATURE_BLOCK]), dtype=float))
        let_other_requests_run()
    return np.concatenate(blocks)


def counts(values: Iterable[Any]) -> dict[str, int]:
    """Occurrences by text, in order of first appearance (None counts as "None")."""
    result: dict[str, int] = {}
    for value, count in Counter(values).items():
        key = str(value)
        result[key] = result.get(key, 0) + count
    return result
