"""The local artifact store: version folders under one directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utils.artifact_files import confined, fsync_dir, new_staging_dir, open_regular, remove_path, temp_name, write_new_file


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
