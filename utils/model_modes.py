"""Modes: INFERENCE (default), TRAINING, MAINTENANCE, kept in the store for every process.

INFERENCE serves predictions and refuses training. TRAINING serves predictions and allows
training jobs. MAINTENANCE refuses predictions (503) but lets operators retrain, load,
promote, roll back and reset the baseline. A change made anywhere (a worker, the CLI, a
console) is seen by every process within `refresh_seconds`; callbacks registered for a mode
fire in each process when it observes the change.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum
from functools import wraps
from typing import Any, Callable, TypeVar

from utils.store import Store, UsesConfiguredStore

F = TypeVar("F", bound=Callable[..., Any])
MODE_STATE = "mode"
log = logging.getLogger("quadra.modes")


class ModelMode(str, Enum):
    INFERENCE = "inference"
    TRAINING = "training"
    MAINTENANCE = "maintenance"

    @classmethod
    def parse(cls, value: "ModelMode | str") -> "ModelMode":
        try:
            return cls(value.value if isinstance(value, ModelMode) else str(value).lower())
        except ValueError:
            raise ValueError(f"unknown mode {value!r}; expected one of {', '.join(m.value for m in cls)}") from None


SERVES_PREDICTIONS = {ModelMode.INFERENCE, ModelMode.TRAINING}
ALLOWS_TRAINING = {ModelMode.TRAINING, ModelMode.MAINTENANCE}
ModeCallback = Callable[[ModelMode, ModelMode], None]


class ModelModeManager(UsesConfiguredStore):
    """The deployment's mode. `initial_mode` applies only when the store has none yet."""

    def __init__(self, initial_mode: ModelMode | str = ModelMode.INFERENCE, store: Store | None = None,
                 refresh_seconds: float = 0.5) -> None:
        self._store = store
        self.initial_mode = ModelMode.parse(initial_mode)
        self.refresh_seconds = refresh_seconds
        self._callbacks: dict[ModelMode, list[ModeCallback]] = {mode: [] for mode in ModelMode}
        self._cached: dict[str, Any] | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """{"mode", "reason", "changed_by", "changed_at"}, refreshed at most every refresh_seconds."""
        if self._cached is None or time.monotonic() - self._read_at >= self.refresh_seconds:
            stored = self.store.get_state(MODE_STATE) or {
                "mode": self.initial_mode.value, "reason": "initial mode", "changed_by": "system", "changed_at": None,
            }
            self._observe(stored)
        return dict(self._cached or {})

    @property
    def mode(self) -> ModelMode:
        return ModelMode(self.state()["mode"])

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
        """Switch the deployment's mode; returns the new state with the previous mode."""
        new = ModelMode.parse(mode)
        previous = self.mode
        state = {"mode": new.value, "reason": reason, "changed_by": changed_by, "changed_at": time.time()}
        self.store.set_state(MODE_STATE, state, actor=changed_by)
        self._observe(state)
        log.info("mode %s -> %s by %s (%s)", previous.value, new.value, changed_by, reason or "no reason given")
        return {**state, "previous_mode": previous.value}

    def enter_inference_mode(self, reason: str = "") -> dict[str, Any]:
        return self.set_mode(ModelMode.INFERENCE, reason)

    def enter_training_mode(self, reason: str = "") -> dict[str, Any]:
        return self.set_mode(ModelMode.TRAINING, reason)

    def enter_maintenance_mode(self, reason: str = "") -> dict[str, Any]:
        return self.set_mode(ModelMode.MAINTENANCE, reason)

    def register_callback(self, mode: ModelMode | str, callback: ModeCallback) -> None:
        """Call `callback(old_mode, new_mode)` when this process sees the deployment enter `mode`."""
        self._callbacks[ModelMode.parse(mode)].append(callback)

    def _observe(self, state: dict[str, Any]) -> None:
        with self._lock:
            old = ModelMode(self._cached["mode"]) if self._cached else None
            self._cached, self._read_at = state, time.monotonic()
        new = ModelMode(state["mode"])
        if old is not None and old is not new:
            for callback in self._callbacks[new]:
                try:
                    callback(old, new)
                except Exception:
                    log.exception("mode callback %r failed", callback)


mode_manager = ModelModeManager()


class InferenceGuard:
    """`with InferenceGuard(manager):` runs only where predictions are served."""

    def __init__(self, manager: ModelModeManager | None = None) -> None:
        self.manager = manager or mode_manager

    def __enter__(self) -> "InferenceGuard":
        mode = self.manager.mode
        if mode not in SERVES_PREDICTIONS:
            raise RuntimeError(f"Inference is not allowed in {mode.value} mode")
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class TrainingGuard:
    """`with TrainingGuard(manager):` runs only in TRAINING or MAINTENANCE mode."""

    def __init__(self, manager: ModelModeManager | None = None) -> None:
        self.manager = manager or mode_manager

    def __enter__(self) -> "TrainingGuard":
        mode = self.manager.mode
        if mode not in ALLOWS_TRAINING:
            raise RuntimeError(f"Training is not allowed in {mode.value} mode")
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def require_mode(*modes: ModelMode | str, manager: ModelModeManager | None = None) -> Callable[[F], F]:
    """Run the function only in one of `modes`; RuntimeError otherwise."""
    allowed = {ModelMode.parse(m) for m in modes}

    def decorator(function: F) -> F:
        @wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            current = (manager or mode_manager).mode
            if current not in allowed:
                names = " or ".join(sorted(m.value for m in allowed))
                raise RuntimeError(f"This operation requires {names} mode; the current mode is {current.value}")
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
