"""Readiness (GET /api/health/detailed): can this process serve correctly right now?

Checks the store, Redis and the artifact folder when configured, the seed's file checks
(models folder, model_registry.json, free disk space), and that the model this process serves
is loaded, is the one the store names, and still matches its recorded SHA-256. The report
names no paths and no secrets, so it can stay public.

Redis is optional for correctness: while it is down every process limits in memory and the
dashboards poll (utils.outage), so an unreachable Redis is reported under `degraded`, not as
a reason to take the host out of a load balancer."""

from __future__ import annotations

import time
from typing import Any

import redis

from utils.config import Settings
from utils.errors import ServiceUnavailable, VersionNotFound
from utils.model_modes import ModelModeManager
from utils.model_monitoring import HealthChecker
from utils.model_versioning import REGISTRY_MIRROR, ModelVersionManager
from utils.serving import ModelServer
from utils.store import Deployment, Store
from utils.timestamps import iso_utc


class Readiness:
    def __init__(self, settings: Settings, store: Store, registry: ModelVersionManager, model_server: ModelServer,
                 modes: ModelModeManager) -> None:
        self.settings, self.store, self.registry, self.model_server, self.modes = settings, store, registry, model_server, modes
        self._verified: dict[str, tuple[tuple[int, int], bool]] = {}

    def report(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"store": self._store_ok()}
        if self.settings.redis_url:
            checks["redis"] = _redis_ok(self.settings.redis_url)
        checks["artifact_store"] = self._artifacts_ok()
        min_free_bytes = self.settings.min_free_disk_mb * 1024 * 1024
        files = HealthChecker(self.registry.models_dir, [REGISTRY_MIRROR], min_free_bytes).check_health()["checks"]
        checks["model_directory"] = files["model_directory"]
        checks["required_files"] = files["required_files"]
        checks["disk_space"] = files["disk_space"]
        deployment = self.store.versions.deployment() if checks["store"] else Deployment(production=None, serving=None)
        checks["serving_model"] = self._serving_model(deployment.serving)
        reasons = _reasons(checks)
        served = self.model_server.current
        return {
            "status": "ready" if not reasons else "not_ready",
            "ready": not reasons,
            "reasons": reasons,
            "degraded": _degradations(checks),
            "checks": checks,
            "current_version": served.version if served else None,
            "production_version": deployment.production,
            "mode": self.modes.mode.value if checks["store"] else None,
            "timestamp": iso_utc(time.time()),
        }

    def _store_ok(self) -> bool:
        try:
            self.store.database.ping()
            return True
        except Exception:
            return False

    def _artifacts_ok(self) -> bool:
        return self.registry.artifacts.check()

    def _serving_model(self, expected: str | None) -> dict[str, Any]:
        served = self.model_server.current
        state = {"loaded": served is not None, "version": served.version if served else None,
                 "expected_version": expected, "warmed_up": served is not None, "hash_verified": False,
                 "error": self.model_server.last_error}
        if served is not None:
            state["hash_verified"] = self._artifact_matches(served.version, served.sha256)
        return state

    def _artifact_matches(self, version: str, sha256: str) -> bool:
        """Re-hash the artifact only when its fingerprint (size and mtime, or ETag) changed."""
        row = self.store.versions.get(version)
        if row is None or row.sha256 != sha256:
            return False
        key = self.registry.artifacts.fingerprint(row.artifact_key)
        if key is None:
            return False
        cached = self._verified.get(version)
        if cached is None or cached[0] != key:
            try:
                matches = self.registry.verify_version(version)["ok"]  # streamed: never the whole artifact in memory
            except (ServiceUnavailable, VersionNotFound):
                return False
            cached = (key, matches)
            self._verified[version] = cached
        return cached[1]


def _reasons(checks: dict[str, Any]) -> list[str]:
    reasons = []
    if not checks["store"]:
        reasons.append("the store is unreachable")
    if not checks["artifact_store"]:
        reasons.append("the artifact folder is missing or not writable")
    if not checks["model_directory"] or not all(checks["required_files"].values()):
        reasons.append("the models folder or model_registry.json is missing")
    if not checks["disk_space"]["ok"]:
        reasons.append("free disk space is below QUADRA_MIN_FREE_DISK_MB")
    model = checks["serving_model"]
    if not model["loaded"]:
        reasons.append("no model is loaded")
    elif not model["hash_verified"]:
        reasons.append(f"the serving artifact of {model['version']} does not match its recorded SHA-256")
    elif model["expected_version"] and model["version"] != model["expected_version"]:
        reasons.append(f"serving {model['version']} while the store names {model['expected_version']}")
    return reasons


def _degradations(checks: dict[str, Any]) -> list[str]:
    """What works in a reduced way while the process stays ready."""
    if checks.get("redis") is False:
        return ["Redis is unreachable: rate limits are counted per process until it is back"]
    return []


def _redis_ok(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False
