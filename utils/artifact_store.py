"""What the registry needs of an artifact store, and the configured one."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from utils.local_artifacts import LocalArtifactStore
from utils.s3_artifacts import S3ArtifactStore


class ArtifactStore(Protocol):
    """Version folders (`<version>/model.safetensors`, `config.json`) somewhere: a local
    directory (`LocalArtifactStore`) or an S3 bucket (`S3ArtifactStore`). Keys are
    `<version>/<file name>`."""

    def new_staging_dir(self) -> Path:
        """A fresh local folder to write a version into before `publish`."""

    def discard(self, staging: Path) -> None:
        """Remove a staging folder (after `publish`, or instead of it)."""

    def publish(self, staging: Path, version: str) -> None:
        """Make a staged folder the version's, all at once."""

    def read(self, key: str, sha256: str | None = None) -> bytes:
        """A file's bytes (`sha256`: the recorded hash, where the store can use it)."""

    def local_file(self, key: str, sha256: str | None = None) -> AbstractContextManager[Path]:
        """A local path to the file for the duration of the `with` block."""

    def write(self, key: str, data: bytes) -> None:
        """Create or replace one file."""

    def delete(self, key: str) -> None:
        """Remove one file (no error when it is gone)."""

    def location(self, key: str) -> str:
        """Where the file is, for people (a path or an s3:// URI)."""

    def remove_version(self, version: str) -> None:
        """Remove a version's folder."""

    def fingerprint(self, key: str) -> tuple[Any, ...] | None:
        """Something that changes when the file changes (None when it is missing)."""

    def check(self) -> bool:
        """Whether the store is reachable and writable."""


def artifact_store_for(artifact_uri: str | None, models_dir: Path, cache_dir: Path) -> ArtifactStore:
    """The configured artifact store: S3 for s3:// URIs, else a local folder."""
    if artifact_uri and artifact_uri.startswith("s3://"):
        return S3ArtifactStore(artifact_uri, models_dir, cache_dir)
    if artifact_uri:
        return LocalArtifactStore(Path(urlparse(artifact_uri).path if artifact_uri.startswith("file://") else artifact_uri))
    return LocalArtifactStore(models_dir)
