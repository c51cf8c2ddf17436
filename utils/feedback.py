"""Label feedback: the true classes of predictions the service made, joined to them by the
prediction ids its answers gave (`<request_id>:<row>`), in any order, late or twice.

Each item is judged on its own: a bad one is reported in its result and never rejects the
others. The last label of an id wins (within a request: its last item; across requests: the
latest), and an id is counted once however often it is labelled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from utils.config import Settings
from utils.errors import TooManyLabels
from utils.request_ids import made_at
from utils.schemas import FeedbackItem
from utils.serving import class_names_of
from utils.store import Store
from utils.store.outcomes import StoredOutcome

ACCEPTED = ("recorded", "relabelled")
EXPIRED = "the prediction is older than the label horizon (QUADRA_FEEDBACK_HORIZON_DAYS)"


@dataclass(frozen=True)
class _Item:
    index: int
    id: str
    label: str | int


@dataclass(frozen=True)
class FeedbackPolicy:
    """Labels are taken for predictions made within `horizon_seconds`, at most `max_labels`
    per call. A prediction reaches the store within its worker's flush interval, so a label
    can arrive first (another worker answered the prediction a moment ago): an id the service
    made (a UUIDv7 request id tells when) that is not found yet but is younger than
    `settle_seconds` is looked for again once that much time has passed since it was made."""

    horizon_seconds: float = 30 * 86400.0
    max_labels: int = 10_000
    settle_seconds: float = 2.5

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackPolicy:
        return cls(settings.feedback_horizon_days * 86400.0, settings.feedback_max_labels,
                   2 * settings.monitoring_flush_seconds + 0.5)


class LabelFeedback:
    """Records labels in `store` under a `FeedbackPolicy`."""

    def __init__(self, store: Store, policy: FeedbackPolicy) -> None:
        self.store = store
        self.policy = policy

    def record(self, items: Sequence[Any], now: float | None = None) -> dict[str, Any]:
        """Judge and record `items` ({"id", "label"} each); returns the FeedbackResponse's fields."""
        if len(items) > self.policy.max_labels:
            raise TooManyLabels(f"{len(items)} labels in one request; at most {self.policy.max_labels} "
                                "(QUADRA_FEEDBACK_MAX_LABELS): send them in several requests")
        now = time.time() if now is None else now
        results: list[dict[str, Any]] = [{}] * len(items)
        parsed: dict[str, _Item] = {}
        for index, raw in enumerate(items):
            item = _parse(index, raw)
            if isinstance(item, str):
                results[index] = _result(index, raw.get("id") if isinstance(raw, dict) else None, "invalid_item", item)
                continue
            earlier = parsed.pop(item.id, None)
            if earlier is not None:
                results[earlier.index] = _result(earlier.index, earlier.id, "superseded",
                                                 f"item {index} labels the same prediction later in this request")
            parsed[item.id] = item
        labels: dict[str, str] = {}
        found = self._find_settled(list(parsed), now)
        classes = _ClassNames(self.store)
        for item in parsed.values():
            status, message, label = self._judge(item, found.get(item.id), classes, now)
            results[item.index] = _result(item.index, item.id, status, message)
            if label is not None:
                labels[item.id] = label
        self.store.outcomes.set_labels(labels, now)
        counts = {status: sum(1 for r in results if r["status"] == status) for status in ACCEPTED}
        return {**counts, "rejected": len(items) - sum(counts.values()), "results": results}

    def _find_settled(self, ids: list[str], now: float) -> dict[str, StoredOutcome]:
        found = self.store.outcomes.find(ids)
        made = [made_at(key) for key in ids if key not in found]
        settle = self.policy.settle_seconds
        recent = [at for at in made if at is not None and now - settle < at <= now + 1.0]
        if recent:
            time.sleep(max(recent) + settle - now)
            found.update(self.store.outcomes.find(key for key in ids if key not in found))
        return found

    def _judge(self, item: _Item, stored: StoredOutcome | None, classes: _ClassNames,
               now: float) -> tuple[str, str | None, str | None]:
        """(status, message, the class name to record or None)."""
        oldest = now - self.policy.horizon_seconds
        if stored is None:
            made = made_at(item.id)
            if made is not None and made < oldest:
                return "expired", EXPIRED, None
            return "unknown_id", "no prediction has this id (or it expired; only ids the service made tell)", None
        if stored.at < oldest:
            return "expired", EXPIRED, None
        names = classes.of(stored.model_version)
        if names is None:
            return "invalid_label", f"version {stored.model_version} is no longer registered", None
        label = _class_name(item.label, names)
        if label is None:
            return "invalid_label", f"not a class of version {stored.model_version}: {', '.join(names)} " \
                                    f"(or an index 0 to {len(names) - 1})", None
        return ("relabelled" if stored.label is not None else "recorded"), None, label


class _ClassNames:
    """Each version's class names, looked up once per request."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, list[str] | None] = {}

    def of(self, version: str) -> list[str] | None:
        if version not in self._known:
            row = self.store.versions.get(version)
            self._known[version] = class_names_of(row.config) if row is not None else None
        return self._known[version]


def _parse(index: int, raw: Any) -> _Item | str:
    """The item, or why it is not one."""
    try:
        item = FeedbackItem.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors(include_url=False, include_input=False)[0]
        where = str(problem["loc"][0]) if problem["loc"] else ""
        if where == "label":
            return "label: must be a class name (1 to 128 characters) or a class index (an integer from 0)"
        return f"{where}: {problem['msg']}" if where else "must be an object {\"id\": ..., \"label\": ...}"
    return _Item(index, item.id, item.label)


def _class_name(label: str | int, names: list[str]) -> str | None:
    if isinstance(label, int):
        return names[label] if label < len(names) else None
    return label if label in names else None


def _result(index: int, prediction_id: Any, status: str, message: str | None) -> dict[str, Any]:
    return {"index": index, "id": prediction_id if isinstance(prediction_id, str) else None, "status": status,
            "message": message}
