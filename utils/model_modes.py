"""Modes: INFERENCE (default), TRAINING, MAINTENANCE.

INFERENCE serves predictions and refuses training. TRAINING serves predictions and allows
training jobs. MAINTENANCE refuses predictions (503) but lets operators retrain, load,
promote, roll back and reset the baseline.

A manager given a store holds the deployment's mode there: a change made anywhere (a worker,
the CLI, a console) is read back at once by `state()` in every process, the per-prediction
check sees it within `refresh_seconds`, and callbacks fire in each process when it observes
the change. The service's manager and this module's
`mode_manager` are such managers. A `ModelModeManager(initial_mode=...)` built without a
store is process-local: it starts in `initial_mode` and only this object changes it.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from functools import wraps
from typing import Any, TypeVar

from utils.errors import InvalidMode, WrongMode
from utils.store import ModeRecord, Store, UsesConfiguredStore
from utils.timestamps import iso_utc

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("quadra.modes")


class ModelMode(str, Enum):
    INFERENCE = "inference"
    TRAINING = "training"
    MAINTENANCE = "maintenance"

    @classmethod
    def parse(cls, value: ModelMode | str) -> ModelMode:
        try:
            return cls(value.value if isinstance(value, ModelMode) else str(value).lower())
        except ValueError:
            raise InvalidMode(f"unknown mode {value!r}; expected one of {', '.join(m.value for m in cls)}") from None


SERVES_PREDICTIONS = {ModelMode.INFERENCE, ModelMode.TRAINING}
ALLOWS_TRAINING = {ModelMode.TRAINING, ModelMode.MAINTENANCE}
ModeCallback = Callable[..., None]  # (old_mode, new_mode) or no arguments


class ModelModeManager:
    """A mode: process-local without a store, the deployment's with one (see the module doc)."""

    def __init__(self, initial_mode: ModelMode | str = ModelMode.INFERENCE, store: Store | None = None,
                 refresh_seconds: float = 0.5) -> None:
        self._store = store
        self.initial_mode = ModelMode.parse(initial_mode)
        self.refresh_seconds = refresh_seconds
        self._callbacks: dict[ModelMode, list[ModeCallback]] = {mode: [] for mode in ModelMode}
        self._cached: dict[str, Any] | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """Whether the mode lives in a store (the deployment's) rather than in this object."""
        return self._shared_store() is not None

    def _shared_store(self) -> Store | None:
        return self._store

    # -- reading ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """{"mode", "reason", "changed_by", "changed_at"} (ISO 8601 UTC, None if the mode never
        changed), read from the store: a client that switched the mode through one worker reads
        the new mode back from any other (only the per-prediction check may lag)."""
        return _public(self._current(fresh=True))

    def _current(self, fresh: bool = False) -> dict[str, Any]:
        """The stored state as cached (changed_at in epoch seconds), refreshed when `fresh` or
        at most every refresh_seconds; `mode` reads it on every prediction, so it converts nothing."""
        store = self._shared_store()
        initial = {"mode": self.initial_mode.value, "reason": "initial mode", "changed_by": "system", "changed_at": None}
        stale = self._cached is None or fresh or time.monotonic() - self._read_at >= self.refresh_seconds
        if store is not None and stale:
            stored = store.modes.get()
            self._observe(asdict(stored) if stored else initial)
        elif self._cached is None:
            self._observe(initial)
        return self._cached or {}

    @property
    def mode(self) -> ModelMode:
        return ModelMode(self._current()["mode"])

    def is_inference_mode(self) -> bool:
        return self.mode is ModelMode.INFERENCE

    def is_training_mode(self) -> bool:
        return self.mode is ModelMode.TRAINING

    def is_maintenance_mode(self) -> bool:
        return self.mode is ModelMode.MAINTENANCE

    def serves_predictions(self) -> bool:
        return self.mode in SERVES_PREDICTIONS

    def allows_training(self) -> bool:
        return self.mode in ALLOWS_TRAINING

    # -- changing -----------------------------------------------------------------------

    def set_mode(self, mode: ModelMode | str, reason: str = "", changed_by: str = "console") -> dict[str, Any]:
        """Switch the mode; returns the new state with the previous mode. Entering the current
        mode logs "Already in <mode> mode" and changes nothing."""
        new = ModelMode.parse(mode)
        current = self.state()
        previous = ModelMode(current["mode"])
        if previous is new:
            log.info("Already in %s mode", new.value)
            return {**current, "previous_mode": previous.value}
        record = ModeRecord(mode=new.value, reason=reason, changed_by=changed_by, changed_at=time.time())
        store = self._shared_store()
        if store is not None:
            store.modes.set(record)
        state = asdict(record)
        self._observe(state)
        log.info("mode %s -> %s by %s (%s)", previous.value, new.value, changed_by, reason or "no reason given")
        return {**_public(state), "previous_mode": previous.value}

    def enter_inference_mode(self, reason: str = "") -> dict[str, Any]:
        return self.set_mode(ModelMode.INFERENCE, reason)

    def enter_training_mode(self, reason: str = "") -> dict[str, Any]:
        return self.set_mode(ModelMode.TRAINING, reason)

    def enter_maintenance_mode(self, reason: str = "") -> dict[str, Any]:
        return self.set_mode(ModelMode.MAINTENANCE, reason)

    def register_callback(self, mode: ModelMode | str, callback: ModeCallback) -> None:
        """Call `callback(old_mode, new_mode)`, or `callback()` if it takes no arguments, when
        this process sees the mode become `mode`."""
        self._callbacks[ModelMode.parse(mode)].append(callback)

    def _observe(self, state: dict[str, Any]) -> None:
        with self._lock:
            old = ModelMode(self._cached["mode"]) if self._cached else None
            self._cached, self._read_at = state, time.monotonic()
        new = ModelMode(state["mode"])
        if old is not None and old is not new:
            for callback in self._callbacks[new]:
                try:
                    _call(callback, old, new)
                except Exception:
                    log.exception("mode callback %r failed", callback)


def _public(state: dict[str, Any]) -> dict[str, Any]:
    """A stored mode state as the API shows it (changed_at in ISO 8601 UTC)."""
    return {**state, "changed_at": iso_utc(state.get("changed_at"))}


def _call(callback: ModeCallback, old: ModelMode, new: ModelMode) -> None:
    """Call with (old, new) when the callback takes them, else with nothing."""
    try:
        takes_arguments = bool(inspect.signature(callback).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        takes_arguments = True
    if takes_arguments:
        callback(old, new)
    else:
        callback()


class _DeploymentModeManager(UsesConfiguredStore, ModelModeManager):
    """`mode_manager`: the deployment's mode, in the store of the QUADRA_* settings (opened on
    first use, so importing this module touches no database)."""

    def _shared_store(self) -> Store | None:
        return self.store


mode_manager: ModelModeManager = _DeploymentModeManager()


class InferenceGuard:
    """`with InferenceGuard(manager):` runs only where predictions are served."""

    def __init__(self, manager: ModelModeManager | None = None) -> None:
        self.manager = manager or mode_manager

    def __enter__(self) -> InferenceGuard:
        mode = self.manager.mode
        if mode not in SERVES_PREDICTIONS:
            raise WrongMode(f"Cannot perform inference in {mode.value} mode")
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class TrainingGuard:
    """`with TrainingGuard(manager):` runs only in TRAINING or MAINTENANCE mode."""

    def __init__(self, manager: ModelModeManager | None = None) -> None:
        self.manager = manager or mode_manager

    def __enter__(self) -> TrainingGuard:
        mode = self.manager.mode
        if mode not in ALLOWS_TRAINING:
            raise WrongMode(f"Cannot perform training in {mode.value} mode")
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def require_mode(*modes: ModelMode | str, manager: ModelModeManager | None = None) -> Callable[[F], F]:
    """Run the function only in one of `modes`; WrongMode (a RuntimeError) otherwise."""
    allowed = {ModelMode.parse(m) for m in modes}

    def decorator(function: F) -> F:
        @wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            current = (manager or mode_manager).mode
            if current not in allowed:
                names = " or ".join(sorted(m.value for m in allowed))
                raise WrongMode(f"This operation requires {names} mode; the current mode is {current.value}")
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def inference_only(function: F) -> F:
    """Run only where predictions are served (INFERENCE or TRAINING)."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with InferenceGuard():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def training_only(function: F) -> F:
    """Run only where training is allowed (TRAINING or MAINTENANCE)."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with TrainingGuard():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
