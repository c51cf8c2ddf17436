"""The model registry: versions, integrity, promotion, rollback, archive, backup and restore.

Metadata lives in the store (shared by every process); artifacts are safetensors files (no
pickle) in an artifact store. Every artifact's SHA-256 is recorded at save and checked before
it is loaded or promoted, so a corrupted or tampered file is never served.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import mmap
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import torch
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from safetensors.torch import save_file

from utils.artifact_files import UnsafeArtifact, confined, fsync_dir, new_staging_dir, open_regular, remove_path, temp_name, write_new_file
from utils.config import current_settings, is_service_folder
from utils.errors import ArtifactStoreUnavailable, IntegrityCheckFailed, InvalidRequest, InvalidVersion, VersionConflict, VersionNotFound
from utils.store import PRODUCTION, SERVING, Store, StoreConflict, folder_store, store_for

ARTIFACT_NAME = "model.safetensors"
ARCHIVE_NAME = "model.safetensors.gz"
CONFIG_NAME = "config.json"
REGISTRY_MIRROR = "model_registry.json"
MAX_VERSION_LENGTH = 64
_SEMVER_BODY = r"(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})(-[0-9A-Za-z]+(\.[0-9A-Za-z]+)*)?"
_TIMESTAMP_BODY = r"([a-z][a-z0-9_]{0,31}-)?\d{8}-\d{6}(-[1-9]\d{0,3})?"
_SEMVER = re.compile(f"^{_SEMVER_BODY}$", re.ASCII)
_TIMESTAMP = re.compile(f"^{_TIMESTAMP_BODY}$", re.ASCII)
# The same rule for JSON Schema (ECMA-262, where \d is ASCII), with MAX_VERSION_LENGTH beside it.
VERSION_PATTERN = f"^(?:{_SEMVER_BODY}|{_TIMESTAMP_BODY})$"
_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_CHUNK = 1024 * 1024
# hashlib gets the full SHA-NI rate (1.78 GB/s on the benchmark machine, as `openssl speed
# -evp sha256`) from updates of 256 KiB to 16 MiB; one update over a whole 1 GB buffer gets
# 1.2-1.5 GB/s, and 64 KiB updates 1.5 GB/s.
LOAD_CHUNK = 4 * 1024 * 1024
_SMALL_ARTIFACT = 16 * 1024 * 1024
_HEADER_LENGTH_BYTES = 8
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_GENERATED_ATTEMPTS = 50
MAX_ROLLBACK_ATTEMPTS = 5
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


def sha256_file(path: Path) -> str:
    with open_regular(path) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _private_buffer(size: int) -> bytearray | mmap.mmap:
    """Fresh memory for a whole artifact. Small ones come from the heap, which reuses memory
    already faulted in. Large ones get an anonymous mapping on transparent huge pages where
    the kernel grants them: faulting in 4 KiB pages costs more than copying the bytes (reading
    1 GB: 700-1,000 ms against 220-370 ms with huge pages, on the benchmark machine)."""
    if size <= _SMALL_ARTIFACT:
        return bytearray(size)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def read_private(path: Path, verify: bool) -> tuple[memoryview, str | None]:
    """Read `path` once into private memory; with `verify`, also its SHA-256.

    The hash is taken over these very bytes, which no other process can write, so what was
    checked is what gets used. For large artifacts a second thread hashes each chunk while
    this one reads the next (hashlib releases the GIL on large updates), so the cost is about
    max(read, hash), not their sum; small ones are hashed inline, as a thread would cost more
    than it saves. A file that shrinks meanwhile comes back short, so it fails the hash or the
    parse."""
    with open_regular(path) as handle, ThreadPoolExecutor(max_workers=1) as hasher:
        size = os.fstat(handle.fileno()).st_size
        data = memoryview(_private_buffer(size))
        digest = hashlib.sha256()
        def hash_in_background(chunk: memoryview) -> None:
            hasher.submit(digest.update, chunk)

        hash_chunk = hash_in_background if size > _SMALL_ARTIFACT else digest.update
        filled = _read_into(handle, data, hash_chunk if verify else None)
    return data[:filled], digest.hexdigest() if verify else None


def _read_into(handle: io.BufferedReader, data: memoryview, consume: Callable[[memoryview], object] | None) -> int:
    """Fill `data` from `handle` chunk by chunk, handing each chunk to `consume`; returns the
    number of bytes read."""
    filled = 0
    while filled < len(data) and (count := handle.readinto(data[filled:filled + LOAD_CHUNK])):
        if consume is not None:
            consume(data[filled:filled + count])
        filled += count
    return filled


def tensors_from_buffer(data: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file held in `data`, as views of it (no copy).

    safetensors can only build tensors in place from a file it maps itself, which would let
    the file change after it was hashed, and `safetensors.torch.load(bytes)` copies every
    tensor. This reads the same format (8-byte little-endian header length, JSON header,
    tensor data back to back) and checks it as safetensors does: known dtypes, byte sizes that
    match the shapes, tensors tiling the data area with no gap or overlap. Raises ValueError,
    KeyError or TypeError for anything else."""
    if len(data) < _HEADER_LENGTH_BYTES:
        raise ValueError("too short for a safetensors header")
    base = _HEADER_LENGTH_BYTES + int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if base > len(data):
        raise ValueError("the header runs past the end of the file")
    header = json.loads(bytes(data[_HEADER_LENGTH_BYTES:base]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    layouts = sorted(((name, *_tensor_layout(spec)) for name, spec in header.items()), key=lambda item: item[1:3])
    end = 0
    for _, begin, stop, _, _ in layouts:
        if begin != end:
            raise ValueError("tensor data has a gap or an overlap")
        end = stop
    if base + end != len(data):
        raise ValueError("tensor data does not fill the file")
    return {name: _tensor_view(data, base + begin, stop - begin, dtype, shape) for name, begin, stop, dtype, shape in layouts}


def _tensor_layout(spec: Any) -> tuple[int, int, torch.dtype, list[int]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
        raise ValueError(f"not a tensor entry of a known dtype: {spec!r:.100}")
    dtype, shape = _DTYPES[spec["dtype"]], spec["shape"]
    begin, end = spec["data_offsets"]
    if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
        raise ValueError("shapes and offsets must be non-negative integers")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError("a tensor's byte size does not match its shape")
    return begin, end, dtype, shape


def _tensor_view(data: memoryview, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0:  # torch.frombuffer refuses empty tensors
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(shape)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: new temp file, fsync, rename."""
    temp = temp_name(path)
    write_new_file(temp, text.encode())
    os.replace(temp, path)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class LocalArtifactStore:
    """Artifacts as files under one folder: `<version>/model.safetensors` and `config.json`.

    Every path is confined to the folder (utils.artifact_files): a linked artifact or version
    folder resolving outside it is refused."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def new_staging_dir(self) -> Path:
        return new_staging_dir(self.root)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: Path, version: str) -> None:
        """Move a staged version folder into place with one rename.

        Called while the version's row is locked in the store, so a folder (or link) already
        there without a committed row is the leftover of a crashed save and may be replaced."""
        target = self.root / version
        if target.exists() or target.is_symlink():
            remove_path(target)
        os.rename(staging, target)
        fsync_dir(self.root)

    def read(self, key: str, sha256: str | None = None) -> bytes:
        with open_regular(confined(self.root, key)) as handle:
            return handle.read()

    @contextmanager
    def local_file(self, key: str, sha256: str | None = None) -> Iterator[Path]:
        """The artifact's path, to be read (and hash-checked) by the caller."""
        yield confined(self.root, key)

    def write(self, key: str, data: bytes) -> None:
        path = confined(self.root, key)
        temp = temp_name(path)
        write_new_file(temp, data)
        os.replace(temp, path)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def location(self, key: str) -> str:
        """Where the artifact lives, for people (a path)."""
        return str(self.root / key)

    def remove_version(self, version: str) -> None:
        remove_path(self.root / version)

    def fingerprint(self, key: str) -> tuple[Any, ...] | None:
        """Changes whenever the artifact's content may have changed (size, modification time)."""
        try:
            stat = confined(self.root, key).stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def check(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)


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


ArtifactStore = LocalArtifactStore | S3ArtifactStore


def artifact_store_for(artifact_uri: str | None, models_dir: Path, cache_dir: Path) -> ArtifactStore:
    """The configured artifact store: S3 for s3:// URIs, else a local folder."""
    if artifact_uri and artifact_uri.startswith("s3://"):
        return S3ArtifactStore(artifact_uri, models_dir, cache_dir)
    if artifact_uri:
        return LocalArtifactStore(Path(urlparse(artifact_uri).path if artifact_uri.startswith("file://") else artifact_uri))
    return LocalArtifactStore(models_dir)


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
        if version is not None:
            return self._save_as(validate_version(version), model, metrics, config, training_info, description, tags, created_by)
        base = generate_version_string()
        for attempt in range(1, MAX_GENERATED_ATTEMPTS + 1):
            candidate = base if attempt == 1 else f"{base}-{attempt}"
            try:
                return self._save_as(candidate, model, metrics, config, training_info, description, tags, created_by)
            except VersionConflict:
                continue
        raise VersionConflict(f"could not find a free version after {base}")

    def _save_as(
        self,
        version: str,
        model: torch.nn.Module,
        metrics: dict[str, float] | None,
        config: dict[str, Any] | None,
        training_info: dict[str, Any] | None,
        description: str,
        tags: Iterable[str] | None,
        created_by: str,
    ) -> VersionMetadata:
        config = dict(config if config is not None else getattr(model, "quadra_config", {}) or {})
        staging = self.artifacts.new_staging_dir()
        try:
            sha256, size = self._stage_artifact(staging, model, version, config)
            row = {
                "version": version,
                "created_at": time.time(),
                "created_by": created_by,
                "description": description or "",
                "tags": sorted(set(tags or ())),
                "metrics": dict(metrics or {}),
                "config": config,
                "training_info": dict(training_info or {}),
                "artifact_key": f"{version}/{ARTIFACT_NAME}",
                "sha256": sha256,
                "size_bytes": size,
                "archived": False,
            }
            try:
                with self.store.adding_version(row):
                    self.artifacts.publish(staging, version)
            except StoreConflict as exc:
                raise VersionConflict(str(exc)) from None
        finally:
            self.artifacts.discard(staging)
        self.write_registry_mirror()
        return self._metadata(self._row(version))

    def _stage_artifact(
        self, staging: Path, model: torch.nn.Module, version: str, config: dict[str, Any]
    ) -> tuple[str, int]:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
        artifact = staging / ARTIFACT_NAME
        save_file(tensors, artifact, metadata={"format": "pt", "quadra_version": version})
        with ThreadPoolExecutor(max_workers=1) as hasher:  # hash from the page cache while the disk syncs
            sha256 = hasher.submit(sha256_file, artifact)
            with open(artifact, "rb+") as handle:
                os.fsync(handle.fileno())
            write_new_file(staging / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
        return sha256.result(), artifact.stat().st_size

    # -- reading ------------------------------------------------------------------------

    def _row(self, version: str) -> dict[str, Any]:
        validate_version(version)
        row = self.store.get_version(version)
        if row is None:
            raise VersionNotFound(f"version {version} not found")
        return row

    def read_state_dict(self, version: str, verify_integrity: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors of `version` and its metadata row, hash-checked unless told otherwise.

        The artifact is read once into private memory and hashed on the way; the tensors are
        views of that memory, built only once the hash has matched."""
        row = self._row(version)
        if row["archived"]:
            raise VersionConflict(f"version {version} is archived; restore it first")
        check = self.verify_integrity if verify_integrity is None else verify_integrity
        with self._artifact_file(row) as path:
            data, actual = read_private(path, check)
        if check:
            _check_digest(version, row["sha256"], actual)
        try:
            return tensors_from_buffer(data), row
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityCheckFailed(f"integrity check failed for version {version}: unreadable artifact ({exc!r})") from None

    def _read_artifact(self, row: dict[str, Any]) -> bytes:
        with _unreadable_is_integrity_failure(row):
            return self.artifacts.read(row["artifact_key"], None if row["archived"] else row["sha256"])

    @contextmanager
    def _artifact_file(self, row: dict[str, Any]) -> Iterator[Path]:
        """A local path to an unarchived version's artifact."""
        with _unreadable_is_integrity_failure(row), self.artifacts.local_file(row["artifact_key"], row["sha256"]) as path:
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
        row = self._row(version)
        try:
            actual = self._artifact_sha256(row)
        except (IntegrityCheckFailed, OSError, EOFError):
            actual = None
        return {"version": version, "ok": actual == row["sha256"], "expected": row["sha256"], "actual": actual}

    def _artifact_sha256(self, row: dict[str, Any]) -> str:
        """The SHA-256 of the artifact's plain (uncompressed) bytes."""
        if row["archived"]:
            return hashlib.sha256(gzip.decompress(self._read_artifact(row))).hexdigest()
        with self._artifact_file(row) as path:
            return sha256_file(path)

    def list_versions(self, tags: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
        """All versions, oldest first; with `tags`, only those carrying every tag given."""
        wanted = {tags} if isinstance(tags, str) else set(tags or ())
        state = self.store.get_states((PRODUCTION, SERVING))
        rows = [r for r in self.store.list_versions() if wanted <= set(r["tags"])]
        return [_public(r, state) for r in rows]

    def get_version_info(self, version: str) -> dict[str, Any]:
        return _public(self._row(version), self.store.get_states((PRODUCTION, SERVING)))

    def get_latest_version(self) -> str | None:
        rows = self.store.list_versions()
        return rows[-1]["version"] if rows else None

    def get_production_version(self) -> str | None:
        return self.store.get_state(PRODUCTION)

    def get_serving_version(self) -> str | None:
        """What the service serves: the last loaded version, else production."""
        state = self.store.get_states((PRODUCTION, SERVING))
        return state.get(SERVING) or state.get(PRODUCTION)

    @property
    def registry(self) -> dict[str, VersionMetadata]:
        """Every version's metadata by version, oldest first (empty for a new folder)."""
        return {row["version"]: self._metadata(row) for row in self.store.list_versions()}

    def _metadata(self, row: dict[str, Any]) -> VersionMetadata:
        public = _public(row, {})
        return VersionMetadata(**{name: public[name] for name in VERSION_METADATA_FIELDS},
                               file_path=self.artifacts.location(row["artifact_key"]))

    def registry_document(self) -> dict[str, Any]:
        """The registry as model_registry.json mirrors it: versions and deployment state."""
        state = self.store.get_states((PRODUCTION, SERVING))
        return {
            "versions": {r["version"]: _public(r, state) for r in self.store.list_versions()},
            "production_version": state.get(PRODUCTION),
            "serving_version": state.get(SERVING) or state.get(PRODUCTION),
            "updated_at": _iso(time.time()),
        }

    def promotion_history(self, limit: int = 100) -> list[dict[str, Any]]:
        return [
            {**h, "at": _iso(h["at"])} for h in self.store.promotion_history(limit)
        ]

    # -- deploying ----------------------------------------------------------------------

    def promote_to_production(self, version: str, actor: str = "system") -> dict[str, Any]:
        """Verify `version` and make it production and serving; returns what it replaced.

        Promoting the production version again changes nothing (`changed` is false) and
        writes no history, so it never becomes a step that a rollback would return to."""
        self._check_deployable(version)
        previous = self.store.record_deployment("promote", version, actor, set_production=True)
        self.write_registry_mirror()
        return _production_change(version, previous)

    def set_serving_version(self, version: str, actor: str = "system") -> dict[str, Any]:
        """Serve `version` on every process without changing production (the "load" action)."""
        self._check_deployable(version)
        previous = self.store.record_deployment("load", version, actor, set_production=False)
        self.write_registry_mirror()
        return {"serving_version": version, "previous_version": previous, "changed": previous != version}

    def rollback(self, actor: str = "system") -> dict[str, Any]:
        """Return production to the last production version different from the current one;
        each further rollback walks one step further back."""
        for _ in range(MAX_ROLLBACK_ATTEMPTS):
            current = self.get_production_version()
            candidate = self._rollback_target(current)
            self._check_deployable(candidate)
            try:
                previous = self.store.record_deployment("rollback", candidate, actor, set_production=True,
                                                        expected_production=current)
            except StoreConflict:
                continue  # another process changed production meanwhile: decide again
            self.write_registry_mirror()
            return _production_change(candidate, previous)
        raise VersionConflict("production kept changing during the rollback; try again")

    def _rollback_target(self, current: str | None) -> str:
        for candidate in reversed(self.store.production_stack()):
            if candidate == current:
                continue
            row = self.store.get_version(candidate)
            if row is not None and not row["archived"]:
                return candidate
        raise VersionConflict("there is no previous production version to roll back to")

    def _check_deployable(self, version: str) -> None:
        if self.verify_integrity:
            self.read_state_dict(version, verify_integrity=True)
        elif self._row(version)["archived"]:
            raise VersionConflict(f"version {version} is archived; restore it first")

    def delete_version(self, version: str) -> None:
        """Delete a version and its artifact; refused for the production and serving versions."""
        validate_version(version)
        try:
            row = self.store.delete_version(version)
        except StoreConflict as exc:
            raise VersionConflict(str(exc)) from None
        if row is None:
            raise VersionNotFound(f"version {version} not found")
        self.artifacts.remove_version(version)
        self.write_registry_mirror()

    # -- archive ------------------------------------------------------------------------

    def archive_version(self, version: str) -> dict[str, Any]:
        """Compress an unused version's artifact; its metadata and recorded hash stay."""
        row = self._row(version)
        if row["archived"]:
            return self.get_version_info(version)
        if version in self.store.get_states((PRODUCTION, SERVING)).values():
            raise VersionConflict(f"version {version} is in use and cannot be archived")
        data = self._read_artifact(row)
        _check_digest(version, row["sha256"], hashlib.sha256(data).hexdigest())
        key = f"{version}/{ARCHIVE_NAME}"
        self.artifacts.write(key, gzip.compress(data, compresslevel=6))
        self.store.update_version(version, archived=True, artifact_key=key)
        self.artifacts.delete(row["artifact_key"])
        self.write_registry_mirror()
        return self.get_version_info(version)

    def restore_archived_version(self, version: str) -> dict[str, Any]:
        """Decompress an archived artifact, check it against the recorded hash, make it loadable."""
        row = self._row(version)
        if not row["archived"]:
            return self.get_version_info(version)
        data = gzip.decompress(self._read_artifact(row))
        _check_digest(version, row["sha256"], hashlib.sha256(data).hexdigest())
        key = f"{version}/{ARTIFACT_NAME}"
        self.artifacts.write(key, data)
        self.store.update_version(version, archived=False, artifact_key=key)
        self.artifacts.delete(row["artifact_key"])
        self.write_registry_mirror()
        return self.get_version_info(version)

    # -- backup and restore -------------------------------------------------------------

    def backup(self, destination: str | Path) -> dict[str, Any]:
        """Write every version (metadata and artifact) and the deployment state to a tar.gz."""
        destination = Path(destination)
        rows = self.store.list_versions()
        manifest = {
            "format": "quadra-registry-backup/1",
            "created_at": _iso(time.time()),
            "state": self.store.get_states((PRODUCTION, SERVING)),
            "versions": rows,
        }
        temp = destination.with_name(f".{destination.name}.tmp")
        with tarfile.open(temp, "w:gz") as archive:
            _add_bytes(archive, "manifest.json", json.dumps(manifest, indent=2).encode())
            for row in rows:
                _add_bytes(archive, f"artifacts/{row['artifact_key']}", self._read_artifact(row))
        os.replace(temp, destination)
        return {"path": str(destination), "versions": len(rows)}

    def restore(self, source: str | Path) -> dict[str, Any]:
        """Restore a backup into this registry, checking every artifact against its hash first.

        Versions already present with the same hash are kept; the same version with another
        hash is a conflict and nothing is written."""
        with tarfile.open(source, "r:gz") as archive:
            manifest = json.loads(_read_member(archive, "manifest.json"))
            if manifest.get("format") != "quadra-registry-backup/1":
                raise InvalidRequest("not a Quadra registry backup")
            payloads = {}
            for row in manifest["versions"]:
                validate_version(row["version"])
                data = _read_member(archive, f"artifacts/{row['artifact_key']}")
                plain = gzip.decompress(data) if row["archived"] else data
                _check_digest(row["version"], row["sha256"], hashlib.sha256(plain).hexdigest())
                existing = self.store.get_version(row["version"])
                if existing is not None and existing["sha256"] != row["sha256"]:
                    raise VersionConflict(f"version {row['version']} exists with a different hash")
                if existing is None:
                    payloads[row["version"]] = (row, plain)
        for row, plain in payloads.values():
            self._restore_one(row, plain)
        state = manifest.get("state", {})
        for name in (PRODUCTION, SERVING):
            if state.get(name):
                self.store.set_state(name, state[name], actor="restore")
        self.write_registry_mirror()
        return {"restored": sorted(payloads), "skipped": len(manifest["versions"]) - len(payloads)}

    def _restore_one(self, row: dict[str, Any], data: bytes) -> None:
        staging = self.artifacts.new_staging_dir()
        try:
            write_new_file(staging / ARTIFACT_NAME, data)
            write_new_file(staging / CONFIG_NAME, json.dumps(row["config"], indent=2, sort_keys=True).encode())
            restored = {**row, "archived": False, "artifact_key": f"{row['version']}/{ARTIFACT_NAME}"}
            with self.store.adding_version(restored):
                self.artifacts.publish(staging, row["version"])
        finally:
            self.artifacts.discard(staging)

    # -- mirror -------------------------------------------------------------------------

    def write_registry_mirror(self) -> None:
        """Mirror the registry to model_registry.json for people and the seed's health check."""
        atomic_write_text(self.models_dir / REGISTRY_MIRROR, json.dumps(self.registry_document(), indent=2, sort_keys=True))


def _production_change(version: str, previous: str | None) -> dict[str, Any]:
    changed = previous != version
    return {"production_version": version, "previous_version": previous, "changed": changed,
            "message": f"{version} is now production" if changed else f"{version} is already the production version"}


@contextmanager
def _unreadable_is_integrity_failure(row: dict[str, Any]) -> Iterator[None]:
    """A missing, unreadable or unsafe artifact (UnsafeArtifact) fails the integrity check."""
    try:
        yield
    except FileNotFoundError:
        raise IntegrityCheckFailed(f"integrity check failed for version {row['version']}: artifact is missing") from None
    except OSError as exc:
        reason = str(exc) if isinstance(exc, UnsafeArtifact) else f"artifact is unreadable ({exc.strerror or exc})"
        raise IntegrityCheckFailed(f"integrity check failed for version {row['version']}: {reason}") from None


def _check_digest(version: str, expected: str, actual: str | None) -> None:
    if actual != expected:
        raise IntegrityCheckFailed(
            f"integrity check failed for version {version}: expected sha256 {expected}, got {actual}"
        )


def _public(row: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    serving = state.get(SERVING) or state.get(PRODUCTION)
    return {
        "version": row["version"],
        "created_at": _iso(row["created_at"]),
        "created_by": row["created_by"],
        "description": row["description"],
        "tags": row["tags"],
        "metrics": row["metrics"],
        "config": row["config"],
        "training_info": row["training_info"],
        "sha256": row["sha256"],
        "size_bytes": row["size_bytes"],
        "archived": row["archived"],
        "is_production": row["version"] == state.get(PRODUCTION),
        "is_serving": row["version"] == serving,
    }


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
