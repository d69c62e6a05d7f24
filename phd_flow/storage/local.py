"""The ``local`` backend: a second directory (NFS, shared drive, external disk) as the remote."""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from phd_flow.errors import StorageConfigError, StorageNotFoundError, StorageUnavailableError
from phd_flow.storage.base import Remote, RemoteFile

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

if TYPE_CHECKING:
    from phd_flow.config import Config


class LocalRemote(Remote):
    """Mirror runs into ``[storage] remote`` (a directory), below ``[storage] prefix``."""

    def __init__(self, root: Path, base: Path | None = None) -> None:
        self.root = root
        #: The configured directory (``[storage] remote``): every component from it down to a
        #: file, the prefix folders included, must be a real folder (never a symlink).
        self.base = base if base is not None and _is_below(root, base) else root

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
        return cls(root / storage.prefix if storage.prefix else root, root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _below_root_is_plain(self, path: Path) -> bool:
        """False when a component of ``path`` below the configured directory (the prefix folders
        included) is a symlink: nothing is read, written or deleted through a link."""
        try:
            rel = path.relative_to(self.base)
        except ValueError:
            return False
        current = self.base
        for part in rel.parts:
            current = current / part
            try:
                if stat.S_ISLNK(current.lstat().st_mode):
                    return False
            except (FileNotFoundError, NotADirectoryError):
                return True  # nothing below a missing component can be a link
            except OSError:
                return False
        return True

    def _open_dir(self, path: Path, create: bool) -> int:
        """A descriptor of the folder ``path``, opened component by component from the
        configured directory with ``O_NOFOLLOW`` (a symlink anywhere raises, no race between
        a check and the use); ``create`` makes missing folders."""
        rel = path.relative_to(self.base)
        if create:
            self.base.mkdir(parents=True, exist_ok=True)  # the configured directory itself
        fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in rel.parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

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
        """Copy ``local`` to a fresh, uniquely named temporary file (``O_CREAT|O_EXCL|O_NOFOLLOW``)
        in the target's folder, opened without following any link, then rename it into place: a
        planted symlink (at the temp name, the target or a folder on the way) is never written through."""
        target = self._path(key)
        if not self._below_root_is_plain(target.parent):
            raise StorageUnavailableError(f"Cannot write {target}: a folder on its way is a symlink.")
        try:
            folder = self._open_dir(target.parent, create=True)
        except OSError as exc:
            raise StorageUnavailableError(
                f"Cannot write {target}: a folder on its way is a symlink or unusable ({exc.strerror or exc})."
            ) from exc
        tmp = f".{target.name[:200]}.{secrets.token_hex(8)}.phd_flow-tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW, 0o644, dir_fd=folder)
            try:
                with os.fdopen(fd, "wb") as out, open(local, "rb") as source:
                    shutil.copyfileobj(source, out)
                os.replace(tmp, target.name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                raise
        except OSError as exc:
            raise StorageUnavailableError(f"Cannot write {target}: {exc.strerror or exc}") from exc
        finally:
            os.close(folder)

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
            try:
                folder = self._open_dir(path.parent, create=False)
            except OSError:
                continue  # missing, or a symlink appeared on the way
            try:
                os.unlink(path.name, dir_fd=folder)  # removes a link itself, never its target
            except (FileNotFoundError, IsADirectoryError):
                pass
            except OSError as exc:
                raise StorageUnavailableError(f"Cannot delete {path}: {exc.strerror or exc}") from exc
            finally:
                os.close(folder)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and _is_below(parent, self.root) and self._rmdir_empty(parent):
                parent = parent.parent

    def _rmdir_empty(self, path: Path) -> bool:
        """Remove the empty folder ``path`` (through no link); False when it stays."""
        try:
            folder = self._open_dir(path.parent, create=False)
        except OSError:
            return False
        try:
            os.rmdir(path.name, dir_fd=folder)  # refuses a link and a non-empty folder
        except OSError:
            return False
        finally:
            os.close(folder)
        return True


def _is_below(path: Path, base: Path) -> bool:
    try:
        path.relative_to(base)
    except ValueError:
        return False
    return True


def _report(path: Path) -> None:
    from phd_flow.log import logger

    logger.warning(f"{path} is a symlink or not a regular file: skipped (links are never followed).")
