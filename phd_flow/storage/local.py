"""The ``local`` backend: a second directory (NFS, shared drive, external disk) as the remote."""

from __future__ import annotations

import builtins
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from phd_flow.errors import StorageConfigError, StorageNotFoundError, StorageUnavailableError
from phd_flow.storage.base import Remote, RemoteFile

if TYPE_CHECKING:
    from phd_flow.config import Config


class LocalRemote(Remote):
    """Mirror runs into ``[storage] remote`` (a directory), below ``[storage] prefix``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_config(cls, config: Config) -> LocalRemote:
        storage = config.storage
        target = storage.remote
        if storage.uri:
            target = storage.uri.removeprefix("file://").removeprefix("local://")
        if not target:
            raise StorageConfigError(
                "The local storage backend needs a directory to mirror into: set "
                '[storage] remote = "/path/to/shared/dir" (or remove [storage] to keep runs only '
                "in local_path)."
            )
        root = Path(target).expanduser()
        if not root.is_absolute():
            root = config.project_root / root
        return cls(root / storage.prefix if storage.prefix else root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _below_root_is_plain(self, path: Path) -> bool:
        """False when a component of ``path`` below the root is a symlink (never followed)."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        current = self.root
        for part in rel.parts:
            current = current / part
            if current.is_symlink():
                return False
        return True

    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        base = self._path(prefix)
        if not self._below_root_is_plain(base):
            _report(base)
            return
        if base.is_file():
            yield RemoteFile(prefix, base.stat().st_size)
            return
        yield from self._walk(base)

    def _walk(self, directory: Path) -> Iterator[RemoteFile]:
        """Regular files below ``directory``; symlinks and special files are skipped, reported."""
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(path)
            elif entry.is_file(follow_symlinks=False):
                if not entry.name.endswith(".phd_flow-tmp"):
                    yield RemoteFile(path.relative_to(self.root).as_posix(), entry.stat(follow_symlinks=False).st_size)
            else:
                _report(path)

    def stat(self, key: str) -> RemoteFile | None:
        path = self._path(key)
        if not self._below_root_is_plain(path):
            return None
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return RemoteFile(key, st.st_size) if stat.S_ISREG(st.st_mode) else None

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        base = self._path(prefix)
        if not self._below_root_is_plain(base):
            return []
        try:
            with os.scandir(base) as scan:
                return sorted(e.name for e in scan if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def put(self, local: Path, key: str) -> None:
        target = self._path(key)
        tmp = target.with_name(target.name + ".phd_flow-tmp")
        if not self._below_root_is_plain(target.parent):
            raise StorageUnavailableError(f"Cannot write {target}: a folder on its way is a symlink.")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageUnavailableError(f"Cannot write {target}: {exc.strerror or exc}") from exc

    def get(self, key: str, local: Path) -> None:
        source = self._path(key)
        if not self._below_root_is_plain(source):
            _report(source)
            raise StorageNotFoundError(f"{source} is not a regular file in the shared directory.")
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"{source} does not exist.") from exc
        except OSError as exc:
            raise StorageNotFoundError(f"{source} is not a regular file ({exc.strerror or exc}).") from exc
        try:
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    _report(source)
                    raise StorageNotFoundError(f"{source} is not a regular file.")
                with open(local, "wb") as out:
                    shutil.copyfileobj(handle, out)
        except OSError as exc:
            raise StorageUnavailableError(f"Cannot read {source}: {exc.strerror or exc}") from exc

    def delete(self, keys: builtins.list[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            if not self._below_root_is_plain(path.parent):
                continue  # never delete through a symlink
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


def _report(path: Path) -> None:
    from phd_flow.log import logger

    logger.warning(f"{path} is a symlink or not a regular file: skipped (links are never followed).")
