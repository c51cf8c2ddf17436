"""The S3 artifact store: version folders in a bucket, with a verified local cache per host."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from utils.artifact_files import ARTIFACT_NAME, CONFIG_NAME, confined, new_staging_dir, temp_name
from utils.errors import ArtifactStoreUnavailable

_CHUNK = 1024 * 1024  # download block


class S3ArtifactStore:
    """Artifacts in an S3-compatible bucket under `prefix/<version>/`.

    Uploads go in parts above MULTIPART_THRESHOLD; downloads are streamed to disk with the
    SHA-256 computed on the way, and only an artifact whose hash matches the recorded one is
    kept in this host's cache (`cache_dir/<sha256>`), so later loads skip the download. The
    endpoint and credentials come from boto3's usual sources (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."""

    MULTIPART_THRESHOLD = 16 * 1024 * 1024

    def __init__(self, uri: str, staging_root: Path, cache_dir: Path, client: Any = None) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = client or boto3.client(
            "s3", region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=BotoConfig(connect_timeout=2, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}),
        )
        self.transfer = TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD, multipart_chunksize=self.MULTIPART_THRESHOLD)
        self.staging_root = Path(staging_root)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def new_staging_dir(self) -> Path:
        return new_staging_dir(self.staging_root)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: Path, version: str) -> None:
        """Upload the staged files; the artifact last, so a listed artifact has its config."""
        with _unavailable_on_errors():
            for name in (CONFIG_NAME, ARTIFACT_NAME):
                self.client.upload_file(str(staging / name), self.bucket, self._object(f"{version}/{name}"), Config=self.transfer)

    def read(self, key: str, sha256: str | None = None) -> bytes:
        with self.local_file(key, sha256) as path:
            return path.read_bytes()

    @contextmanager
    def local_file(self, key: str, sha256: str | None = None) -> Iterator[Path]:
        """A local copy of the object, to be read (and hash-checked) by the caller: this
        host's cached copy of `sha256`, else a fresh download, which enters the cache only if
        its hash matches and is deleted afterwards if not."""
        cached = confined(self.cache_dir, sha256) if sha256 else None
        if cached is not None and (cached.exists() or cached.is_symlink()):
            yield cached
            return
        temp = temp_name(self.cache_dir / "artifact", ".download")
        try:
            if self._download(key, temp) == sha256 and cached is not None:
                os.replace(temp, cached)
                yield cached
            else:
                yield temp
        finally:
            temp.unlink(missing_ok=True)

    def _download(self, key: str, destination: Path) -> str:
        """Stream the object to `destination`; returns its SHA-256."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        except (ClientError, BotoCoreError) as exc:
            raise ArtifactStoreUnavailable(f"the artifact store is unreachable: {exc}") from None
        digest = hashlib.sha256()
        with _unavailable_on_errors(), open(destination, "wb") as handle:
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
        return digest.hexdigest()

    def write(self, key: str, data: bytes) -> None:
        with _unavailable_on_errors():
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data)

    def delete(self, key: str) -> None:
        with _unavailable_on_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def location(self, key: str) -> str:
        """Where the artifact lives, for people (an s3:// URI)."""
        return f"s3://{self.bucket}/{self._object(key)}"

    def remove_version(self, version: str) -> None:
        with _unavailable_on_errors():
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._object(f"{version}/"))
            for item in listing.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=item["Key"])

    def fingerprint(self, key: str) -> tuple[Any, ...] | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except (ClientError, BotoCoreError):
            return None
        return (head["ETag"], head["ContentLength"])

    def check(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except (ClientError, BotoCoreError):
            return False


@contextmanager
def _unavailable_on_errors() -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise ArtifactStoreUnavailable(f"the artifact store is unreachable: {exc}") from None
