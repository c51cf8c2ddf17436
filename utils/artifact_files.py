"""The registry's file handling on this host: artifacts stay inside their folder, are read
only from regular files, are written only as new files, and crash leftovers are found.

An artifact or version folder may be replaced by someone with access to the models folder.
Its SHA-256 guards the content; these checks guard where it comes from and where saves go:
a path that resolves outside its folder (a symlinked file or version folder), a directory,
a FIFO or an unreadable file is refused as `UnsafeArtifact`, which the registry reports as
a failed integrity check. Files are opened with O_NOFOLLOW, so a link swapped in after the
check is refused too, and written with O_EXCL, so a save never writes through a link.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from utils.journal import process_alive

ARTIFACT_NAME = "model.safetensors"
ARCHIVE_NAME = "model.safetensors.gz"
CONFIG_NAME = "config.json"

STAGING = ".staging"
TEMP_SUFFIXES = (".tmp", ".download")
ORPHAN_GRACE_SECONDS = 3600.0  # leftovers not named after a process are removed when this old
_SEPARATOR = "__"


class UnsafeArtifact(OSError):
    """An artifact path that must not be read or written (outside its folder, not a file)."""


def confined(root: Path, relative: str | Path) -> Path:
    """`root / relative`, refused unless it resolves inside `root` (links followed)."""
    path = root / relative
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise UnsafeArtifact(f"{relative} resolves outside its folder")
    return path


def open_regular(path: Path) -> io.BufferedReader:
    """Open `path` for reading only if it is a regular file and not itself a link (no wait
    on a FIFO); UnsafeArtifact otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symbolic link
            raise UnsafeArtifact(f"{path.name} is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeArtifact(f"{path.name} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@contextmanager
def new_file(path: Path) -> Iterator[BinaryIO]:
    """Create `path` for writing (never an existing file or a link); synced to disk when the
    block ends without an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (never an existing file or a link) with `data`, synced to disk."""
    with new_file(path) as handle:
        handle.write(data)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """A model's config.json beside its artifact, as every save, import and restore writes it."""
    write_new_file(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden sibling of `path` named after this process, so a crash leftover is known."""
    return path.with_name(f".{path.name}{_SEPARATOR}{_owner()}{suffix}")


def new_staging_dir(root: Path) -> Path:
    """A fresh folder under `root/.staging`, named after this process, readable only by it."""
    staging_root = confined(root, STAGING)
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = staging_root / _owner()
    staging.mkdir(mode=0o700)
    return confined(root, staging.relative_to(root))


def remove_path(path: Path) -> None:
    """Remove a folder with its content, a file, or only the link if it is a symbolic link
    (never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def crash_leftovers(root: Path) -> list[Path]:
    """Staging folders and temporary files under `root` whose process is gone.

    Names carry host and pid (see `_owner`); a leftover of another host, or with a name of
    an earlier release, counts once it is ORPHAN_GRACE_SECONDS old."""
    if not root.is_dir():
        return []
    candidates: list[Path] = []
    for folder, subfolders, files in os.walk(root):  # never into linked folders
        if Path(folder) == root / STAGING:
            candidates += [Path(folder, name) for name in subfolders + files]
            subfolders.clear()
            continue
        candidates += [Path(folder, name) for name in files if name.startswith(".") and name.endswith(TEMP_SUFFIXES)]
    return [path for path in candidates if _abandoned(path)]


def _owner() -> str:
    return _SEPARATOR.join((socket.gethostname(), str(os.getpid()), uuid.uuid4().hex))


def _abandoned(path: Path) -> bool:
    parts = path.name.lstrip(".").split(_SEPARATOR)
    if len(parts) >= 3 and parts[-3] == socket.gethostname() and parts[-2].isdigit():
        return not process_alive(int(parts[-2]))
    try:
        return time.time() - path.lstat().st_mtime > ORPHAN_GRACE_SECONDS
    except FileNotFoundError:
        return False


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: new temp file, fsync, rename."""
    temp = temp_name(path)
    write_new_file(temp, text.encode())
    os.replace(temp, path)
