"""The ``local`` backend: a second directory (NFS, shared drive, external disk) as the remote."""

from __future__ import annotations

import builtins
import os
import shutil
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

    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        base = self._path(prefix)
        if base.is_file():
            yield RemoteFile(prefix, base.stat().st_size)
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(".phd_flow-tmp"):
                    continue
                path = Path(dirpath) / name
                yield RemoteFile(path.relative_to(self.root).as_posix(), path.stat().st_size)

    def stat(self, key: str) -> RemoteFile | None:
        path = self._path(key)
        return RemoteFile(key, path.stat().st_size) if path.is_file() else None

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(prefix)) if e.is_dir())
        except FileNotFoundError:
            return []

    def put(self, local: Path, key: str) -> None:
        target = self._path(key)
        tmp = target.with_name(target.name + ".phd_flow-tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageUnavailableError(f"Cannot write {target}: {exc.strerror or exc}") from exc

    def get(self, key: str, local: Path) -> None:
        source = self._path(key)
        try:
            shutil.copyfile(source, local)
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"{source} does not exist.") from exc
        except OSError as exc:
            raise StorageUnavailableError(f"Cannot read {source}: {exc.strerror or exc}") from exc

    def delete(self, keys: builtins.list[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
