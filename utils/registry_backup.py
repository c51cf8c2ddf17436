"""Backing up a registry to one .tar.gz (every version's metadata and artifact, and which
version is production and serving) and restoring it, every artifact checked against its
recorded hash before anything is written."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from utils.artifact_files import ARTIFACT_NAME, write_config, write_new_file
from utils.errors import InvalidRequest, QuadraError, VersionConflict
from utils.model_versioning import ModelVersionManager, check_digest, validate_version
from utils.store import Deployment, VersionRow
from utils.timestamps import iso_utc

BACKUP_FORMAT = "quadra-registry-backup/1"


def backup(registry: ModelVersionManager, destination: str | Path) -> dict[str, Any]:
    """Write every version (metadata and artifact) and the deployment state to a tar.gz."""
    destination = Path(destination)
    rows = registry.store.versions.list()
    deployment = registry.store.versions.deployment()
    manifest = {
        "format": BACKUP_FORMAT,
        "created_at": iso_utc(time.time()),
        "state": {"production_version": deployment.production, "serving_version": deployment.serving},
        "versions": [asdict(row) for row in rows],
    }
    temp = destination.with_name(f".{destination.name}.tmp")
    with tarfile.open(temp, "w:gz") as archive:
        _add_bytes(archive, "manifest.json", json.dumps(manifest, indent=2).encode())
        for row in rows:
            _add_bytes(archive, f"artifacts/{row.artifact_key}", registry.read_artifact(row))
    os.replace(temp, destination)
    return {"path": str(destination), "versions": len(rows)}


def restore(registry: ModelVersionManager, source: str | Path) -> dict[str, Any]:
    """Restore a backup into this registry, checking every artifact against its hash first.

    Versions already present with the same hash are kept; the same version with another
    hash is a conflict and nothing is written."""
    try:
        manifest, payloads = _read_backup(registry, source)
    except QuadraError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequest(f"not a Quadra registry backup ({type(exc).__name__}: {exc})") from None
    for row, plain in payloads.values():
        _restore_one(registry, row, plain)
    state = manifest.get("state") or {}
    registry.store.versions.restore_deployment(
        Deployment(production=state.get("production_version"), serving=state.get("serving_version")), actor="restore")
    registry.write_registry_mirror()
    return {"restored": sorted(payloads), "skipped": len(manifest["versions"]) - len(payloads)}


def _read_backup(registry: ModelVersionManager, source: str | Path) -> tuple[dict[str, Any], dict[str, tuple[VersionRow, bytes]]]:
    """The backup's manifest and the versions to restore (those this registry lacks), each
    artifact checked against its recorded hash."""
    with tarfile.open(source, "r:gz") as archive:
        manifest = json.loads(_read_member(archive, "manifest.json"))
        if manifest.get("format") != BACKUP_FORMAT:
            raise InvalidRequest("not a Quadra registry backup")
        payloads = {}
        for entry in manifest["versions"]:
            row = VersionRow(**{name: entry[name] for name in VersionRow.__dataclass_fields__})
            validate_version(row.version)
            data = _read_member(archive, f"artifacts/{row.artifact_key}")
            plain = gzip.decompress(data) if row.archived else data
            check_digest(row.version, row.sha256, hashlib.sha256(plain).hexdigest())
            existing = registry.store.versions.get(row.version)
            if existing is not None and existing.sha256 != row.sha256:
                raise VersionConflict(f"version {row.version} exists with a different hash")
            if existing is None:
                payloads[row.version] = (row, plain)
    return manifest, payloads


def _restore_one(registry: ModelVersionManager, row: VersionRow, data: bytes) -> None:
    staging = registry.artifacts.new_staging_dir()
    try:
        write_new_file(staging / ARTIFACT_NAME, data)
        write_config(staging, row.config)
        with registry.store.versions.adding(replace(row, archived=False, artifact_key=f"{row.version}/{ARTIFACT_NAME}")):
            registry.artifacts.publish(staging, row.version)
    finally:
        registry.artifacts.discard(staging)


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    archive.addfile(info, io.BytesIO(data))


def _read_member(archive: tarfile.TarFile, name: str) -> bytes:
    try:
        member = archive.getmember(name)
    except KeyError:
        raise InvalidRequest(f"backup is missing {name}") from None
    handle = archive.extractfile(member)
    if handle is None:
        raise InvalidRequest(f"backup entry {name} is not a file")
    return handle.read()
