"""The model registry: versions, integrity, promotion, rollback and archive.

Metadata lives in the store (shared by every process); artifacts are safetensors files (no
pickle) in an artifact store. Every artifact's SHA-256 is recorded at save and checked before
it is loaded or promoted, so a corrupted or tampered file is never served.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from utils.artifact_files import ARTIFACT_NAME, UnsafeArtifact, atomic_write_text, write_config
from utils.artifact_store import ArtifactStore, artifact_store_for
from utils.config import current_settings, is_service_folder
from utils.errors import IntegrityCheckFailed, InvalidVersion, VersionConflict, VersionNotFound
from utils.instruments import MODEL_LOAD_SECONDS, MODEL_SAVE_SECONDS
from utils.local_artifacts import LocalArtifactStore
from utils.safetensors_reader import read_private, sha256_file, tensors_from_buffer
from utils.store import Deployment, Store, StoreConflict, VersionRow, folder_store, store_for
from utils.timestamps import iso_utc

REGISTRY_MIRROR = "model_registry.json"
MAX_VERSION_LENGTH = 64
_SEMVER_BODY = r"(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})(-[0-9A-Za-z]+(\.[0-9A-Za-z]+)*)?"
_TIMESTAMP_BODY = r"([a-z][a-z0-9_]{0,31}-)?\d{8}-\d{6}(-[1-9]\d{0,3})?"
_SEMVER = re.compile(f"^{_SEMVER_BODY}$", re.ASCII)
_TIMESTAMP = re.compile(f"^{_TIMESTAMP_BODY}$", re.ASCII)
# The same rule for JSON Schema (ECMA-262, where \d is ASCII), with MAX_VERSION_LENGTH beside it.
VERSION_PATTERN = f"^(?:{_SEMVER_BODY}|{_TIMESTAMP_BODY})$"
_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_GENERATED_ATTEMPTS = 50
MAX_ROLLBACK_ATTEMPTS = 5
log = logging.getLogger("quadra.registry")
VERSION_METADATA_FIELDS = ("version", "created_at", "created_by", "description", "tags", "metrics", "config",
                           "training_info", "sha256", "size_bytes", "archived")


def validate_version(version: Any) -> str:
    """Return `version` if it is a valid version string, else raise InvalidVersion.

    Runs before any file is touched: only [0-9A-Za-z._-] can pass, so no path trick can.
    """
    if not isinstance(version, str) or not version:
        raise InvalidVersion("version must be a non-empty string")
    if len(version) > MAX_VERSION_LENGTH:
        raise InvalidVersion(f"version must be at most {MAX_VERSION_LENGTH} characters")
    if not (_SEMVER.fullmatch(version) or _TIMESTAMP.fullmatch(version)):
        raise InvalidVersion(
            "version must be semantic (1.2.0, 2.1.3-beta) or a timestamp (20241221-143022, "
            "train-20241221-143022)"
        )
    return version


def generate_version_string(prefix: str | None = None) -> str:
    """A timestamp version such as "20241221-143022", or "train-20241221-143022" with a prefix."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if prefix is None:
        return stamp
    if not _PREFIX.fullmatch(prefix):
        raise InvalidVersion("prefix must be lowercase letters, digits or _ and start with a letter")
    return f"{prefix}-{stamp}"


@dataclass(frozen=True)
class VersionMetadata:
    """What the registry keeps about a version (what `save_model` returns, and the values of
    `registry`); `to_dict()` for JSON."""

    version: str
    created_at: str
    created_by: str
    description: str
    tags: list[str]
    metrics: dict[str, Any]
    config: dict[str, Any]
    training_info: dict[str, Any]
    sha256: str
    size_bytes: int
    archived: bool
    file_path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelVersionManager:
    """The registry: versions in a store, artifacts in an artifact store.

    The folder rule: `ModelVersionManager()` or `ModelVersionManager(<QUADRA_MODELS_DIR>)` is
    the service's registry (its store and artifact store, so the running service sees what it
    saves); one built for any other folder keeps its own SQLite file and artifacts there.
    Arguments left out come from the QUADRA_* settings; the service passes all of them."""

    def __init__(
        self,
        models_dir: str | Path | None = None,
        store: Store | None = None,
        verify_integrity: bool | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        if store is None or models_dir is None or verify_integrity is None:
            settings = current_settings()
            verify_integrity = settings.verify_integrity if verify_integrity is None else verify_integrity
            if store is None and is_service_folder(models_dir, settings.models_dir):
                store = store_for(settings)
                artifacts = artifacts or artifact_store_for(settings.artifact_uri, settings.models_dir,
                                                            settings.artifact_cache_dir)
            models_dir = settings.models_dir if models_dir is None else models_dir
        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or folder_store(self.models_dir)
        self.verify_integrity = verify_integrity
        self.artifacts = artifacts or LocalArtifactStore(self.models_dir)
        # The last generated name's timestamp and attempt: a name this process gave and that was
        # deleted within the same second is not given again to another model (its monitoring
        # records, labels and audit trail name it).
        self._last_generated: tuple[str, int] = ("", 0)
        if not (self.models_dir / REGISTRY_MIRROR).exists():
            self.write_registry_mirror()

    # -- saving -------------------------------------------------------------------------

    def save_model(
        self,
        model: torch.nn.Module,
        version: str | None = None,
        metrics: dict[str, float] | None = None,
        config: dict[str, Any] | None = None,
        training_info: dict[str, Any] | None = None,
        description: str = "",
        tags: Iterable[str] | None = None,
        created_by: str = "system",
    ) -> VersionMetadata:
        """Save a new version; an existing version is a VersionConflict, never an overwrite.

        Without `version`, a timestamp version is generated; saves in the same second get
        "-2", "-3", ... appended instead of conflicting."""
        config = dict(config if config is not None else getattr(model, "quadra_config", {}) or {})

        def save_as(candidate: str) -> VersionMetadata:
            staging = self.artifacts.new_staging_dir()
            try:
                sha256, size = _stage_artifact(staging, model, candidate, config)
                return self.publish_staged(staging, new_version_row(
                    candidate, sha256, size, config, metrics, training_info, description, tags, created_by))
            finally:
                self.artifacts.discard(staging)

        return self.add_version(version, save_as)

    def add_version(self, version: str | None, add: Callable[[str], VersionMetadata]) -> VersionMetadata:
        """`add(version)`; without `version`, `add` under the first free timestamp version."""
        with MODEL_SAVE_SECONDS.time():
            return self._add_version(version, add)

    def _add_version(self, version: str | None, add: Callable[[str], VersionMetadata]) -> VersionMetadata:
        if version is not None:
            return add(validate_version(version))
        base = generate_version_string()
        last_base, last_attempt = self._last_generated
        first = last_attempt + 1 if base == last_base else 1
        for attempt in range(first, first + MAX_GENERATED_ATTEMPTS):
            try:
                added = add(base if attempt == 1 else f"{base}-{attempt}")
            except VersionConflict:
                continue
            if base != self._last_generated[0] or attempt > self._last_generated[1]:
                self._last_generated = (base, attempt)
            return added
        raise VersionConflict(f"could not find a free version after {base}")

    def publish_staged(self, staging: Path, row: VersionRow) -> VersionMetadata:
        """Register `row` and move its staged artifact and config into place, atomically:
        the row commits only once the artifact is published (VersionConflict if it exists)."""
        try:
            with self.store.versions.adding(row):
                self.artifacts.publish(staging, row.version)
        except StoreConflict as exc:
            raise VersionConflict(str(exc)) from None
        self.write_registry_mirror()
        return _metadata(self.version_row(row.version), self.artifacts)

    # -- reading ------------------------------------------------------------------------

    def version_row(self, version: str) -> VersionRow:
        """The stored row of `version` (VersionNotFound when there is none)."""
        validate_version(version)
        row = self.store.versions.get(version)
        if row is None:
            raise VersionNotFound(f"version {version} not found")
        return row

    def read_state_dict(self, version: str, verify_integrity: bool | None = None) -> tuple[dict[str, torch.Tensor], VersionRow]:
        """The tensors of `version` and its metadata row, hash-checked unless told otherwise.

        The artifact is read once into private memory and hashed on the way; the tensors are
        views of that memory, built only once the hash has matched."""
        row = self.version_row(version)
        if row.archived:
            raise VersionConflict(f"version {version} is archived; restore it first")
        check = self.verify_integrity if verify_integrity is None else verify_integrity
        with MODEL_LOAD_SECONDS.time():
            with self.artifact_file(row) as path:
                data, actual = read_private(path, check)
            if check:
                check_digest(version, row.sha256, actual)
            try:
                return tensors_from_buffer(data), row
            except (ValueError, KeyError, TypeError) as exc:
                raise IntegrityCheckFailed(
                    f"integrity check failed for version {version}: unreadable artifact ({exc!r})") from None

    def read_artifact(self, row: VersionRow) -> bytes:
        with _unreadable_is_integrity_failure(row):
            return self.artifacts.read(row.artifact_key, None if row.archived else row.sha256)

    @contextmanager
    def artifact_file(self, row: VersionRow) -> Iterator[Path]:
        """A local path to an unarchived version's artifact."""
        with _unreadable_is_integrity_failure(row), self.artifacts.local_file(row.artifact_key, row.sha256) as path:
            yield path

    def load_model(self, model: torch.nn.Module, version: str | None = None, verify_integrity: bool = True) -> torch.nn.Module:
        """Load `version` (default: production, else latest) into `model` and return it.

        Raises ValueError ("integrity check failed ...") when the artifact does not match."""
        version = version or self.get_production_version() or self.get_latest_version()
        if version is None:
            raise VersionNotFound("the registry has no versions")
        state, _ = self.read_state_dict(version, verify_integrity and self.verify_integrity)
        model.load_state_dict(state, strict=True)
        return model

    def verify_version(self, version: str) -> dict[str, Any]:
        """Recompute an artifact's hash; report instead of raising."""
        row = self.version_row(version)
        try:
            actual = self._artifact_sha256(row)
        except (IntegrityCheckFailed, OSError, EOFError):
            actual = None
        return {"version": version, "ok": actual == row.sha256, "expected": row.sha256, "actual": actual}

    def _artifact_sha256(self, row: VersionRow) -> str:
        """The SHA-256 of the artifact's plain (uncompressed) bytes."""
        if row.archived:
            return hashlib.sha256(gzip.decompress(self.read_artifact(row))).hexdigest()
        with self.artifact_file(row) as path:
            return sha256_file(path)

    def list_versions(self, tags: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
        """All versions, oldest first; with `tags`, only those carrying every tag given."""
        wanted = {tags} if isinstance(tags, str) else set(tags or ())
        deployment = self.store.versions.deployment()
        rows = [r for r in self.store.versions.list() if wanted <= set(r.tags)]
        return [_public(r, deployment) for r in rows]

    def get_version_info(self, version: str) -> dict[str, Any]:
        return _public(self.version_row(version), self.store.versions.deployment())

    def get_latest_version(self) -> str | None:
        rows = self.store.versions.list()
        return rows[-1].version if rows else None

    def get_production_version(self) -> str | None:
        return self.store.versions.deployment().production

    def get_serving_version(self) -> str | None:
        """What the service serves: the last loaded version, else production."""
        return self.store.versions.deployment().serving

    @property
    def registry(self) -> dict[str, VersionMetadata]:
        """Every version's metadata by version, oldest first (empty for a new folder)."""
        return {row.version: _metadata(row, self.artifacts) for row in self.store.versions.list()}

    def registry_document(self) -> dict[str, Any]:
        """The registry as model_registry.json mirrors it: versions and deployment state."""
        deployment = self.store.versions.deployment()
        return {"versions": {r.version: _public(r, deployment) for r in self.store.versions.list()},
                "production_version": deployment.production, "serving_version": deployment.serving,
                "updated_at": iso_utc(time.time())}

    def promotion_history(self, limit: int = 100) -> list[dict[str, Any]]:
        return [{**asdict(h), "at": iso_utc(h.at)} for h in self.store.versions.history(limit)]

    # -- deploying ----------------------------------------------------------------------

    def promote_to_production(self, version: str, actor: str = "system") -> dict[str, Any]:
        """Verify `version` and make it production and serving; returns what it replaced.

        Promoting the production version again changes nothing (`changed` is false) and
        writes no history, so it never becomes a step that a rollback would return to."""
        self.check_deployable(version)
        previous = self.store.versions.deploy("promote", version, actor, set_production=True)
        self.write_registry_mirror()
        return _production_change(version, previous)

    def set_serving_version(self, version: str, actor: str = "system") -> dict[str, Any]:
        """Serve `version` on every process without changing production (the "load" action)."""
        self.check_deployable(version)
        previous = self.store.versions.deploy("load", version, actor, set_production=False)
        self.write_registry_mirror()
        return {"serving_version": version, "previous_version": previous, "changed": previous != version}

    def rollback(self, actor: str = "system") -> dict[str, Any]:
        """Return production to the last production version different from the current one;
        each further rollback walks one step further back."""
        for _ in range(MAX_ROLLBACK_ATTEMPTS):
            current = self.get_production_version()
            candidate = self.store.versions.rollback_target(current)
            if candidate is None:
                raise VersionConflict("there is no previous production version to roll back to")
            self.check_deployable(candidate)
            try:
                previous = self.store.versions.deploy("rollback", candidate, actor, set_production=True,
                                                        expected_production=current)
            except StoreConflict:
                continue  # another process changed production meanwhile: decide again
            self.write_registry_mirror()
            return _production_change(candidate, previous)
        raise VersionConflict("production kept changing during the rollback; try again")

    def refuse_rollout_candidate(self, version: str, what: str) -> None:
        """A version an active rollout serves or shadows cannot be `what` (deleted, archived)."""
        rollout = self.store.rollouts.active()
        if rollout is not None and rollout.version == version:
            raise VersionConflict(f"version {version} is the candidate of the active {rollout.mode} and cannot be {what}")

    def check_deployable(self, version: str) -> None:
        """Refuse a version that cannot be deployed now: its hash (when verifying), archived."""
        if self.verify_integrity:
            self.read_state_dict(version, verify_integrity=True)
        elif self.version_row(version).archived:
            raise VersionConflict(f"version {version} is archived; restore it first")

    def delete_version(self, version: str) -> None:
        """Delete a version and its artifact; refused for the production and serving versions
        and a rollout's candidate."""
        validate_version(version)
        self.refuse_rollout_candidate(version, "deleted")
        try:
            row = self.store.versions.delete(version)
        except StoreConflict as exc:
            raise VersionConflict(str(exc)) from None
        if row is None:
            raise VersionNotFound(f"version {version} not found")
        self.artifacts.remove_version(version)
        self.write_registry_mirror()

    # -- mirror -------------------------------------------------------------------------

    def write_registry_mirror(self) -> None:
        """Mirror the registry to model_registry.json for people and the seed's health check."""
        atomic_write_text(self.models_dir / REGISTRY_MIRROR, json.dumps(self.registry_document(), indent=2, sort_keys=True))


def new_version_row(version: str, sha256: str, size: int, config: dict[str, Any], metrics: dict[str, Any] | None,
                    training_info: dict[str, Any] | None, description: str, tags: Iterable[str] | None,
                    created_by: str) -> VersionRow:
    return VersionRow(version=version, created_at=time.time(), created_by=created_by, description=description or "",
                      tags=sorted(set(tags or ())), metrics=dict(metrics or {}), config=config,
                      training_info=dict(training_info or {}), artifact_key=f"{version}/{ARTIFACT_NAME}", sha256=sha256,
                      size_bytes=size, archived=False)


def _stage_artifact(staging: Path, model: torch.nn.Module, version: str, config: dict[str, Any]) -> tuple[str, int]:
    """Write the model's tensors (safetensors) and config into `staging`; (sha256, size)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    artifact = staging / ARTIFACT_NAME
    save_file(tensors, artifact, metadata={"format": "pt", "quadra_version": version})
    with ThreadPoolExecutor(max_workers=1) as hasher:  # hash from the page cache while the disk syncs
        sha256 = hasher.submit(sha256_file, artifact)
        with open(artifact, "rb+") as handle:
            os.fsync(handle.fileno())
        write_config(staging, config)
    return sha256.result(), artifact.stat().st_size


def _metadata(row: VersionRow, artifacts: ArtifactStore) -> VersionMetadata:
    public = _public(row, Deployment(production=None, serving=None))
    return VersionMetadata(**{name: public[name] for name in VERSION_METADATA_FIELDS},
                           file_path=artifacts.location(row.artifact_key))


def _production_change(version: str, previous: str | None) -> dict[str, Any]:
    changed = previous != version
    return {"production_version": version, "previous_version": previous, "changed": changed,
            "message": f"{version} is now production" if changed else f"{version} is already the production version"}


@contextmanager
def _unreadable_is_integrity_failure(row: VersionRow) -> Iterator[None]:
    """A missing, unreadable or unsafe artifact (UnsafeArtifact) fails the integrity check."""
    try:
        yield
    except FileNotFoundError:
        raise IntegrityCheckFailed(f"integrity check failed for version {row.version}: artifact is missing") from None
    except OSError as exc:
        reason = str(exc) if isinstance(exc, UnsafeArtifact) else f"artifact is unreadable ({exc.strerror or exc})"
        raise IntegrityCheckFailed(f"integrity check failed for version {row.version}: {reason}") from None


def check_digest(version: str, expected: str, actual: str | None) -> None:
    if actual != expected:
        raise IntegrityCheckFailed(
            f"integrity check failed for version {version}: expected sha256 {expected}, got {actual}"
        )


def _public(row: VersionRow, deployment: Deployment) -> dict[str, Any]:
    public = asdict(row)
    del public["artifact_key"]
    return {**public, "created_at": iso_utc(row.created_at), "is_production": row.version == deployment.production,
            "is_serving": row.version == deployment.serving}


LOWER_IS_BETTER = ("loss", "error", "latency", "mae", "mse", "rmse")


def compare_model_versions(manager: ModelVersionManager, v1: str, v2: str) -> dict[str, Any]:
    """Compare the recorded metrics of two versions.

    `improvement` is how much better version2 is: version2 - version1, negated for metrics
    where lower is better (names containing loss, error, latency, mae, mse, rmse)."""
    metrics1 = manager.get_version_info(v1)["metrics"]
    metrics2 = manager.get_version_info(v2)["metrics"]
    comparison = {}
    for metric in sorted(set(metrics1) | set(metrics2)):
        a, b = metrics1.get(metric), metrics2.get(metric)
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float))
        improvement = None
        if numeric:
            improvement = (a - b) if any(w in metric.lower() for w in LOWER_IS_BETTER) else (b - a)
        comparison[metric] = {"version1": a, "version2": b, "improvement": improvement}
    return {"version1": v1, "version2": v2, "metrics_comparison": comparison}
