"""The served model: architectures built from config, input validation, predict, hot swap.

Each process holds its serving model in memory. A background watcher polls the store; when
the serving version changes it loads the new version, verifies its hash, warms it up and
swaps one reference, so requests in flight finish on the model they started with.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from utils.errors import InvalidInput, ModelNotReady
from utils.model_versioning import ModelVersionManager

ArchitectureBuilder = Callable[[dict[str, Any]], nn.Module]
ARCHITECTURES: dict[str, ArchitectureBuilder] = {}
RETRY_FAILED_SECONDS = 30.0
log = logging.getLogger("quadra.serving")


def register_architecture(name: str) -> Callable[[ArchitectureBuilder], ArchitectureBuilder]:
    """Register a builder `config -> nn.Module` under `name` (the config's "architecture").

    The module must map a float tensor [batch, input_dim] to logits [batch, num_classes]."""

    def decorator(builder: ArchitectureBuilder) -> ArchitectureBuilder:
        ARCHITECTURES[name] = builder
        return builder

    return decorator


def import_architecture_modules(modules: tuple[str, ...]) -> None:
    """Import user modules whose @register_architecture calls add architectures."""
    for module in modules:
        importlib.import_module(module)


class MLPClassifier(nn.Module):
    """A feed-forward classifier that standardises its inputs with stored mean and std."""

    def __init__(self, input_dim: int, num_classes: int, hidden_dims: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.input_mean: torch.Tensor
        self.input_std: torch.Tensor
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_std", torch.ones(input_dim))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.input_mean) / self.input_std)


@register_architecture("mlp")
def _build_mlp(config: dict[str, Any]) -> nn.Module:
    return MLPClassifier(
        input_dim=int(config["input_dim"]),
        num_classes=int(config["num_classes"]),
        hidden_dims=[int(h) for h in config.get("hidden_dims", [64, 32])],
        dropout=float(config.get("dropout", 0.0)),
    )


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build an untrained model from its config; the config is kept on it as `quadra_config`."""
    name = config.get("architecture")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; registered: {', '.join(sorted(ARCHITECTURES))}")
    for key in ("input_dim", "num_classes"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise ValueError(f"model config needs a positive integer {key!r}")
    model = ARCHITECTURES[name](config)
    model.quadra_config = dict(config)  # type: ignore[assignment]  # Module.__setattr__ is typed for tensors and modules only
    return model


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def rows_to_tensor(rows: list[list[float]], input_dim: int, max_batch: int) -> torch.Tensor:
    """The checks that depend on the served model and the configuration (batch size, row
    width); the values themselves must already be valid numbers."""
    if len(rows) > max_batch:
        raise InvalidInput(f"batch of {len(rows)} rows exceeds the limit of {max_batch}")
    for i, row in enumerate(rows):
        if len(row) != input_dim:
            raise InvalidInput(f"inputs[{i}] must be a list of {input_dim} numbers")
    return torch.tensor(rows, dtype=torch.float32)


def class_names_of(config: dict[str, Any]) -> list[str]:
    """A model config's class names: its `class_names`, else the class indices as text."""
    names = config.get("class_names")
    return list(names) if names else [str(i) for i in range(int(config["num_classes"]))]


@dataclass(frozen=True)
class ServedModel:
    """One loaded, verified, warmed-up version."""

    version: str
    sha256: str
    model: nn.Module
    config: dict[str, Any]

    @property
    def input_dim(self) -> int:
        return int(self.config["input_dim"])

    @property
    def class_names(self) -> list[str]:
        return class_names_of(self.config)

    def predict(self, inputs: torch.Tensor) -> list[dict[str, Any]]:
        """Class, confidence and probabilities per row. Inputs far outside what the model was
        trained on (float32 values near 3.4e38) can overflow its arithmetic: such logits are
        clamped to the float32 range (NaN to 0) first, so every answer is a distribution."""
        with torch.inference_mode():
            logits = torch.nan_to_num(self.model(inputs), nan=0.0)
            probabilities = torch.softmax(logits, dim=1)
        confidence, index = probabilities.max(dim=1)
        names = self.class_names
        return [
            {
                "class": names[i],
                "class_index": i,
                "confidence": c,
                "probabilities": dict(zip(names, p, strict=False)),
            }
            for i, c, p in zip(index.tolist(), confidence.tolist(), probabilities.tolist(), strict=True)
        ]


def load_served_model(registry: ModelVersionManager, version: str) -> ServedModel:
    """Load `version` from the registry (hash-checked), build it, warm it up."""
    state, row = registry.read_state_dict(version)
    model = build_model(row.config)
    model.load_state_dict(state, strict=True)
    model.eval()
    served = ServedModel(version, row.sha256, model, row.config)
    served.predict(torch.zeros(1, served.input_dim))
    return served


CANARY_BUCKETS = 10_000


def takes_candidate(rollout_id: int, request_id: str, percent: float) -> bool:
    """Whether a request goes to a canary's candidate: the same request id always lands on the
    same arm of a rollout (in every process and host), and `percent` of ids on the candidate."""
    return zlib.crc32(f"{rollout_id}:{request_id}".encode()) % CANARY_BUCKETS < percent * (CANARY_BUCKETS // 100)


@dataclass(frozen=True)
class Canary:
    """This process's part of an active rollout (`utils.rollout`): the loaded candidate, its
    share, and whether it answers that share ("canary") or runs beside production ("shadow")."""

    rollout_id: int
    percent: float
    model: ServedModel
    mode: str = "canary"

    def takes(self, request_id: str) -> bool:
        return takes_candidate(self.rollout_id, request_id, self.percent)


class ModelServer:
    """This process's serving model, the candidate of an active canary, and the watcher that
    keeps both in step with the store."""

    def __init__(self, registry: ModelVersionManager, poll_seconds: float = 0.5) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self.last_error: str | None = None
        self.candidate_error: str | None = None  # a rollout's candidate this process could not load
        self._current: ServedModel | None = None
        self._canary: Canary | None = None
        self._failed_version: str | None = None
        self._failed_at = 0.0
        self._failed_rollout: int | None = None
        self._failed_rollout_at = 0.0
        self._lock = threading.Lock()
        self._started = False
        self._stopping = threading.Event()

    @property
    def current(self) -> ServedModel | None:
        return self._current

    @property
    def canary(self) -> Canary | None:
        return self._canary

    def route(self, request_id: str) -> ServedModel | None:
        """The model that answers a request: the candidate for its share of an active canary,
        else the current one (None while nothing is loaded)."""
        canary = self._canary
        if canary is not None and canary.mode == "canary" and canary.takes(request_id):
            return canary.model
        return self._current

    def shadow_for(self, request_id: str) -> Canary | None:
        """The shadow rollout whose candidate also runs this request, if it is in its sample."""
        canary = self._canary
        return canary if canary is not None and canary.mode == "shadow" and canary.takes(request_id) else None

    def adopt_candidate(self, canary: Canary) -> None:
        """Route by a rollout whose candidate the caller already loaded (the process that starts it)."""
        self._canary = canary

    def require_current(self) -> ServedModel:
        served = self._current
        if served is None:
            raise ModelNotReady(self.last_error or "the serving model is still loading")
        return served

    def start(self, bootstrap: Callable[[ModelVersionManager], None] | None = None) -> None:
        """Load the serving model now (bootstrapping an empty registry), then watch the store."""
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            if bootstrap is not None:
                bootstrap(self.registry)
            self.sync()
        except Exception as exc:  # keep the process up; readiness reports the reason
            self.last_error = f"start-up load failed: {exc}"
            log.exception("serving model start-up failed")
        threading.Thread(target=self._watch, name="quadra-model-watcher", daemon=True).start()

    def stop(self) -> None:
        """Stop watching the store (the model stays loaded)."""
        self._stopping.set()

    def sync(self) -> bool:
        """Swap to the store's serving version if it changed, and follow the store's active
        canary (load its candidate, or drop it once the rollout ended); True when the serving
        model was swapped.

        A version that fails to load is retried only after RETRY_FAILED_SECONDS (or when the
        store names another one); the current model keeps serving meanwhile."""
        swapped = self._sync_serving()
        self._sync_canary()
        return swapped

    def _sync_serving(self) -> bool:
        target = self.registry.get_serving_version()
        current = self._current
        if target is None or (current is not None and current.version == target):
            return False
        if target == self._failed_version and time.monotonic() - self._failed_at < RETRY_FAILED_SECONDS:
            return False
        with self._lock:
            if self._current is not None and self._current.version == target:
                return False
            canary = self._canary
            try:
                self._current = (canary.model if canary is not None and canary.model.version == target
                                 else load_served_model(self.registry, target))
            except Exception as exc:
                self._failed_version, self._failed_at = target, time.monotonic()
                self.last_error = f"could not load version {target}: {exc}"
                log.error("hot swap to %s refused: %s", target, exc)
                return False
            self._failed_version = None
            self.last_error = None
        log.info("now serving version %s", target)
        return True

    def _sync_canary(self) -> None:
        rollout = self.registry.store.rollouts.route()
        canary = self._canary
        if canary is not None and (rollout is None or canary.rollout_id != rollout.id):
            self._canary = None  # that rollout ended: nothing more goes to its candidate
        if rollout is None or (canary is not None and canary.rollout_id == rollout.id):
            return
        if rollout.id == self._failed_rollout and time.monotonic() - self._failed_rollout_at < RETRY_FAILED_SECONDS:
            return
        try:
            candidate = load_served_model(self.registry, rollout.version)
        except Exception as exc:  # this process serves production only until a retry succeeds
            self._failed_rollout, self._failed_rollout_at = rollout.id, time.monotonic()
            self.candidate_error = f"could not load the {rollout.mode} candidate {rollout.version}: {exc}"
            log.error("%s", self.candidate_error)
            return
        self.candidate_error = None
        self._canary = Canary(rollout.id, rollout.percent, candidate, rollout.mode)
        log.info("%s: %s takes %g%% of predictions here", rollout.mode, rollout.version, rollout.percent)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self.sync()
            except Exception:
                log.exception("model watcher could not read the store")
