"""Models trained elsewhere: import a safetensors artifact and its config as a new version,
and export a version as the pair an import takes, hash preserved.

An import streams the upload to staging while hashing it (never the whole file in memory),
bounded by QUADRA_MAX_ARTIFACT_BYTES, then proves the pair serves: the config names a
registered architecture, the weights load strictly (names, shapes and dtypes), and one
forward pass on a zero row gives finite [1, num_classes] outputs. Any failure leaves nothing
behind in the registry, staging or the artifact store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch

from utils.artifact_files import ARTIFACT_NAME, CONFIG_NAME, new_file, open_regular, write_config
from utils.errors import ArtifactTooLarge, Conflict, IntegrityCheckFailed, InvalidArtifact, VersionConflict
from utils.model_versioning import ModelVersionManager, VersionMetadata, new_version_row
from utils.safetensors_reader import read_private, tensors_from_buffer
from utils.serving import build_model
from utils.store import VersionRow

IMPORT_CHUNK = 4 * 1024 * 1024
EXPORT_CHUNK = 1024 * 1024
MODEL_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError)
REFUSED_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".jit")
CONVERT = ("convert it to safetensors where it was trained: `from safetensors.torch import save_file; "
           "save_file(model.state_dict(), 'model.safetensors')`")


def import_version(
    registry: ModelVersionManager,
    source: IO[bytes],
    config: Mapping[str, Any],
    *,
    max_bytes: int,
    version: str | None = None,
    description: str = "",
    tags: Iterable[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    filename: str | None = None,
    created_by: str = "console",
) -> VersionMetadata:
    """Add the safetensors artifact read from `source` with its `config` as a new version
    (a timestamp version without `version`). `sha256`, when given, must be the artifact's;
    `filename` is only looked at for its suffix (pickles are refused by name too)."""
    _refuse_by_name(filename)
    config = _config(config)
    staging = registry.artifacts.new_staging_dir()
    try:
        digest, size = receive(source, staging / ARTIFACT_NAME, max_bytes)
        if sha256 is not None and sha256.lower() != digest:
            raise IntegrityCheckFailed(f"the artifact's sha256 is {digest}, not the {sha256} given")
        check_artifact(staging / ARTIFACT_NAME, config)
        write_config(staging, config)
        info = {"imported": True, "filename": Path(filename).name if filename else None}
        return registry.add_version(version, lambda candidate: registry.publish_staged(staging, new_version_row(
            candidate, digest, size, config, dict(metrics or {}), info, description, tags, created_by)))
    finally:
        registry.artifacts.discard(staging)


def receive(source: IO[bytes], path: Path, max_bytes: int) -> tuple[str, int]:
    """Copy `source` into the new file `path` chunk by chunk, hashing each chunk in a second
    thread while the next is read and written (hashlib releases the GIL on large updates), so
    the cost is about max(copy, hash); (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    with new_file(path) as target, ThreadPoolExecutor(max_workers=1) as hasher:
        hashed: Future[None] | None = None
        while chunk := source.read(IMPORT_CHUNK):
            if size == 0:
                _refuse_by_content(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ArtifactTooLarge(f"the artifact exceeds QUADRA_MAX_ARTIFACT_BYTES ({max_bytes} bytes)")
            if hashed is not None:
                hashed.result()
            hashed = hasher.submit(digest.update, chunk)
            target.write(chunk)
        if hashed is not None:
            hashed.result()
    if size == 0:
        raise InvalidArtifact("the artifact is empty")
    return digest.hexdigest(), size


def check_artifact(path: Path, config: dict[str, Any]) -> None:
    """Prove that the staged pair serves: build, strict load with matching dtypes, one forward pass."""
    try:
        with torch.device("meta"):  # shapes and dtypes only: no memory, no random initialisation
            model = build_model(config)
    except MODEL_ERRORS as exc:  # a user's architecture may fail any way on a bad config
        raise InvalidArtifact(f"config: {exc}") from None
    data, _ = read_private(path, verify=False)
    try:
        tensors = tensors_from_buffer(data)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise InvalidArtifact(f"not a complete safetensors file: {str(exc)[:200]}") from None
    _check_weights(tensors, model.state_dict(), config["architecture"])
    try:
        outputs = _forward_zero_row(model, tensors, config)
    except MODEL_ERRORS as exc:
        raise InvalidArtifact(f"the model does not run on a zero row: {exc}") from None
    if tuple(outputs.shape) != (1, config["num_classes"]) or not bool(torch.isfinite(outputs).all()):
        raise InvalidArtifact(f"a zero row gives outputs of shape {list(outputs.shape)} that are not "
                              f"[1, {config['num_classes']}] finite numbers")


def _forward_zero_row(model: torch.nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        model = build_model(config)  # state outside the state dict (non-persistent buffers): build for real
        model.load_state_dict(tensors, strict=True)
    model.eval()
    with torch.inference_mode():
        return model(torch.zeros(1, config["input_dim"]))


def export_version(registry: ModelVersionManager, version: str, folder: Path) -> tuple[Path, Path]:
    """Write `version`'s verified artifact and its config into `folder` (the pair `import`
    takes); refuses to overwrite. Returns their paths."""
    row, chunks = verified_artifact(registry, version)
    folder.mkdir(parents=True, exist_ok=True)
    artifact, config = folder / ARTIFACT_NAME, folder / CONFIG_NAME
    taken = [path.name for path in (artifact, config) if path.exists() or path.is_symlink()]
    if taken:
        raise Conflict(f"{folder} already holds {' and '.join(taken)}; export into an empty folder")
    try:
        with new_file(artifact) as target:
            for chunk in chunks:
                target.write(chunk)
        write_config(folder, row.config)
    except BaseException:
        artifact.unlink(missing_ok=True)
        raise
    return artifact, config


def verified_artifact(registry: ModelVersionManager, version: str) -> tuple[VersionRow, Iterator[bytes]]:
    """`version`'s row and its artifact in chunks. The artifact is checked against its recorded
    SHA-256 before this returns (IntegrityCheckFailed otherwise), so a caller can still answer
    with an error; the chunks are read afterwards."""
    row = registry.version_row(version)
    if row.archived:
        raise VersionConflict(f"version {version} is archived; restore it first")
    verified = registry.verify_version(version)
    if not verified["ok"]:
        raise IntegrityCheckFailed(f"integrity check failed for version {version}: expected sha256 "
                                   f"{verified['expected']}, got {verified['actual']}")
    return row, _chunks(registry, row)


def _chunks(registry: ModelVersionManager, row: VersionRow) -> Iterator[bytes]:
    with registry.artifact_file(row) as path, open_regular(path) as source:
        while chunk := source.read(EXPORT_CHUNK):
            yield chunk


def _check_weights(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], architecture: str) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InvalidArtifact(f"the weights do not fit architecture {architecture!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, wanted in expected.items():
        got = tensors[name]
        if got.shape != wanted.shape or got.dtype != wanted.dtype:
            raise InvalidArtifact(f"{name}: {got.dtype} {list(got.shape)} where architecture {architecture!r} "
                                  f"has {wanted.dtype} {list(wanted.shape)}")


def _config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise InvalidArtifact("config: must be a JSON object")
    return dict(config)


def _refuse_by_name(filename: str | None) -> None:
    if filename and filename.lower().endswith(REFUSED_SUFFIXES):
        raise InvalidArtifact(f"{Path(filename).name} is a pickle or TorchScript file, which is never loaded; {CONVERT}")


def _refuse_by_content(head: bytes) -> None:
    """Pickles (protocol 2+ starts with 0x80) and torch.save or TorchScript zip archives are
    refused before anything else is read; so is anything whose first bytes are no safetensors
    header (an 8-byte length, then a JSON object)."""
    if head[:1] == b"\x80":
        raise InvalidArtifact(f"the artifact is a pickle, which is never loaded; {CONVERT}")
    if head[:4] == b"PK\x03\x04":
        raise InvalidArtifact(f"the artifact is a torch.save or TorchScript archive, which is never loaded; {CONVERT}")
    if len(head) > 8 and head[8:9] != b"{":
        raise InvalidArtifact("the artifact is not a safetensors file (an 8-byte header length, then a JSON header)")
