"""The :class:`Storage` a node sees as ``self.storage``: local paths plus sync to the remote."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from phd_flow import keys
from phd_flow.errors import InvalidKeyError, StorageError, StorageNotFoundError
from phd_flow.storage import engine
from phd_flow.storage.base import Remote

if TYPE_CHECKING:
    from phd_flow.config import Config

KeyLike = str | PurePosixPath


class Storage:
    """Files below ``local_path``, mirrored to a remote (S3, B2, MLflow, shared directory).

    Keys are relative paths such as ``"datasets" / self.key / "data.pickle"``.

    >>> with self.storage.open("datasets" / self.key / "d.pickle", "wb") as f:  # doctest: +SKIP
    ...     pickle.dump(data, f)
    >>> self.storage.upload("datasets" / self.key)                            # doctest: +SKIP
    """

    def __init__(self, config: Config, remote: Remote | None = None) -> None:
        self.config = config
        self.local_path = config.local_path
        self._remote = remote
        self._remote_built = remote is not None
        #: When True (inside a run), a failed :meth:`upload` is logged and its key recorded in
        #: :attr:`deferred` instead of raising, so the run goes on; the run's final sync and
        #: ``sync`` push the deferred keys later.
        self.defer_failed_uploads = False
        self.deferred: list[str] = []

    # --- local side ---------------------------------------------------------------------------

    def path(self, key: KeyLike) -> Path:
        """The local path of ``key`` (validated: never outside ``local_path``)."""
        return self.local_path / keys.normalize(key)

    def __truediv__(self, key: KeyLike) -> Path:
        return self.path(key)

    def open(self, key: KeyLike, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """Open ``key`` below ``local_path``. Reading a file that only exists remotely downloads
        it first; writing creates the parent directories."""
        path = self.path(key)
        if any(m in mode for m in "wax"):
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.exists() and self.remote is not None:
            self.download(key)
        return open(path, mode, **kwargs)

    # --- remote side --------------------------------------------------------------------------

    @property
    def remote(self) -> Remote | None:
        """The configured remote (built on first access), or None for local-only storage."""
        if not self._remote_built:
            from phd_flow.storage.registry import make_remote

            self._remote = make_remote(self.config)
            self._remote_built = True
        return self._remote

    def upload(self, key: KeyLike, exclude: list[str] | None = None) -> engine.SyncReport:
        """Push ``key`` (a file or a directory tree) to the remote; only changes are sent.

        ``exclude``: subfolders left out (a run's local-only stages: the caller knows them).
        Raises a :class:`~phd_flow.errors.StorageError` after the last retry (unless
        :attr:`defer_failed_uploads`).
        """
        rel = keys.normalize(key)
        path = self.local_path / rel
        try:
            return self._upload(rel, path, exclude)
        except StorageError as exc:
            if not self.defer_failed_uploads or not path.exists():
                raise
            from phd_flow.log import logger

            logger.error(
                f"Could not upload {rel!r} ({type(exc).__name__}: {exc}). It stays in "
                "local_path; the end of the run and `sync` will retry it."
            )
            if rel not in self.deferred:
                self.deferred.append(rel)
            return engine.SyncReport()

    def _upload(self, rel: str, path: Path, exclude: list[str] | None) -> engine.SyncReport:
        remote = self.remote
        if remote is None:
            return engine.SyncReport()
        if not path.exists():
            raise StorageNotFoundError(f"Cannot upload {rel!r}: {path} does not exist.")
        retries, workers = self.config.storage.retries, self.config.storage.workers
        if path.is_file():
            engine._retry(lambda: remote.put(path, rel), retries)
            return engine.SyncReport(transferred=[rel], bytes=path.stat().st_size)
        return engine.push(remote, path, rel, exclude=list(exclude or []), retries=retries, workers=workers, label=rel)

    def download(self, key: KeyLike) -> engine.SyncReport:
        """Pull ``key`` (a run, a subdirectory or one file) from the remote, verified."""
        rel = keys.normalize(key)
        if rel.split("/", 1)[0] == ".phd_flow":  # the local indexes and the ledger of what was made here
            raise InvalidKeyError(f"{rel!r} is phd_flow's own bookkeeping in local_path; it is never downloaded.")
        remote = self._require_remote(rel)
        retries, workers = self.config.storage.retries, self.config.storage.workers
        if _is_single_file(remote, rel):
            return self._download_file(remote, rel)
        return engine.pull(remote, rel, self.local_path / rel, retries=retries, workers=workers, label=rel)

    def _download_file(self, remote: Remote, rel: str) -> engine.SyncReport:
        parent, _, name = rel.rpartition("/")
        # A file inside a synced tree is verified against the nearest manifest above it.
        entry = _manifest_entry(remote, parent, name, self.config.storage.retries)
        target = keys.safe_join(self.local_path, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".phd_flow-part")

        def fetch() -> None:
            try:
                remote.get(rel, part)
                if entry is not None:
                    engine._verify(part, entry, f"{remote.describe()}/{rel}")
                part.replace(target)
            finally:
                part.unlink(missing_ok=True)

        engine._retry(fetch, self.config.storage.retries)
        return engine.SyncReport(transferred=[rel], bytes=target.stat().st_size)

    def remote_ls(self, prefix: KeyLike = "") -> list[str]:
        """Keys of every remote file below ``prefix`` (manifests left out)."""
        remote = self._require_remote(str(prefix))
        rel = keys.normalize(prefix) if str(prefix) else ""
        return sorted(f.key for f in remote.list(rel) if not f.key.endswith(engine.MANIFEST))

    def exists(self, key: KeyLike) -> bool:
        """True if ``key`` exists locally or in the remote."""
        rel = keys.normalize(key)
        if (self.local_path / rel).exists():
            return True
        remote = self.remote
        if remote is None:
            return False
        return _is_single_file(remote, rel) or any(True for _ in remote.list(rel))

    def remove(self, key: KeyLike, local: bool = True, remote: bool = False) -> None:
        """Delete ``key`` locally and/or in the remote (a file or a whole tree)."""
        rel = keys.normalize(key)
        if remote and self.remote is not None:
            target = self.remote
            names = [f.key for f in target.list(rel)] or ([rel] if _is_single_file(target, rel) else [])
            target.delete(names)
            _forget(target, set(names), self.config.storage.retries)
        if local:
            path = self.local_path / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _require_remote(self, what: str) -> Remote:
        remote = self.remote
        if remote is None:
            raise StorageNotFoundError(
                f"No remote storage is configured, so {what!r} cannot be fetched or listed "
                "remotely. Configure [storage] (see docs/storage.md)."
            )
        return remote

    def __repr__(self) -> str:
        remote = self._remote.describe() if self._remote is not None else "not built"
        return f"Storage(local_path={str(self.local_path)!r}, remote={remote})"


def _forget(remote: Remote, removed: set[str], retries: int) -> None:
    """Drop removed files from the remote manifests above them, so a manifest never vouches
    for a file that is gone (uploads trust it; the next upload re-sends what is missing)."""
    prefixes = {"/".join(n.split("/")[:i]) for n in removed for i in range(1, n.count("/") + 1)}
    for prefix in sorted(p for p in prefixes if f"{p}/{engine.MANIFEST}" not in removed):
        manifest = engine._remote_manifest(remote, prefix, retries)
        kept = {rel: e for rel, e in manifest.items() if f"{prefix}/{rel}" not in removed}
        if len(kept) != len(manifest):
            key, data = f"{prefix}/{engine.MANIFEST}", engine.dump_manifest(kept)
            engine._retry(functools.partial(remote.write_bytes, key, data), retries)


def _is_single_file(remote: Remote, rel: str) -> bool:
    return remote.stat(rel) is not None


def _manifest_entry(remote: Remote, parent: str, name: str, retries: int) -> engine.Entry | None:
    parts = parent.split("/") if parent else []
    for depth in range(len(parts), -1, -1):
        prefix = "/".join(parts[:depth])
        manifest = engine._remote_manifest(remote, prefix, retries) if prefix else {}
        rel = "/".join([*parts[depth:], name])
        if rel in manifest:
            return manifest[rel]
    return None


def make_storage(config: Config, remote: Remote | None = None) -> Storage:
    """A :class:`Storage` over ``config.local_path`` and the configured (or given) remote.

    The remote is built lazily, on first use, so runs that never sync never import an SDK.
    """
    return Storage(config, remote)
