"""Archiving versions that are not in use: the artifact is kept gzip-compressed beside its
recorded hash, and restored (checked against that hash) when it is needed again."""

from __future__ import annotations

import gzip
import hashlib
from typing import Any

from utils.artifact_files import ARCHIVE_NAME, ARTIFACT_NAME
from utils.errors import VersionConflict
from utils.model_versioning import ModelVersionManager, check_digest


def archive(registry: ModelVersionManager, version: str) -> dict[str, Any]:
    """Compress an unused version's artifact; its metadata and recorded hash stay."""
    row = registry.version_row(version)
    if row.archived:
        return registry.get_version_info(version)
    if registry.store.versions.deployment().role_of(version) is not None:
        raise VersionConflict(f"version {version} is in use and cannot be archived")
    registry.refuse_rollout_candidate(version, "archived")
    data = registry.read_artifact(row)
    check_digest(version, row.sha256, hashlib.sha256(data).hexdigest())
    key = f"{version}/{ARCHIVE_NAME}"
    registry.artifacts.write(key, gzip.compress(data, compresslevel=6))
    registry.store.versions.move_artifact(version, key, archived=True)
    registry.artifacts.delete(row.artifact_key)
    registry.write_registry_mirror()
    return registry.get_version_info(version)


def restore_archived(registry: ModelVersionManager, version: str) -> dict[str, Any]:
    """Decompress an archived artifact, check it against the recorded hash, make it loadable."""
    row = registry.version_row(version)
    if not row.archived:
        return registry.get_version_info(version)
    data = gzip.decompress(registry.read_artifact(row))
    check_digest(version, row.sha256, hashlib.sha256(data).hexdigest())
    key = f"{version}/{ARTIFACT_NAME}"
    registry.artifacts.write(key, data)
    registry.store.versions.move_artifact(version, key, archived=False)
    registry.artifacts.delete(row.artifact_key)
    registry.write_registry_mirror()
    return registry.get_version_info(version)
