"""The :class:`Storage` a node sees as ``self.storage``: local paths plus sync to the remote.

Identical files are stored once: :func:`link_or_copy` puts a file's content at a second local
path as a reflink, else a read-only hardlink, else a copy; and a tree in the remote may hold a
references object (:data:`REFS`) naming, for some of its files, the remote key that holds
their bytes (with size and sha256), which every download resolves and verifies. Which files
are stored by reference is the uploader's decision (a run's loaded stages: ``run/push.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from phd_flow import keys
from phd_flow._io import sha256_file
from phd_flow.errors import ConfigError, InvalidKeyError, StorageError, StorageNotFoundError
from phd_flow.storage import engine
from phd_flow.storage.base import Remote

if TYPE_CHECKING:
    from phd_flow.config import Config

KeyLike = str | PurePosixPath


#: Below local_path: one empty file per top-level folder (a run) that ``download`` wrote.
DOWNLOADED = ".phd_flow/downloaded"
#: In a remote folder: ``{"files": {relative path: {"key", "size", "sha256"}}}``, files of the
#: folder whose bytes are stored once, at ``key`` (another run's copy), instead of here.
REFS = ".phd_flow-refs.json"
#: How identical files are stored once: ``auto`` (default), ``hardlink`` or ``off``.
DEDUP_ENV = "PHD_FLOW_DEDUP"
DEDUP_MODES = ("auto", "hardlink", "off")
_FICLONE = 0x40049409  # Linux ioctl: share the extents of another file (btrfs, XFS, bcachefs)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Ref:
    """Where a file's bytes are in the remote, and what they must be."""

    key: str
    size: int
    sha256: str


def dedup_mode() -> str:
    """``$PHD_FLOW_DEDUP``: ``auto`` stores identical stage files once (locally a reflink, else a
    read-only hardlink when read-only files stop this process, else a copy; remotely by
    reference), ``hardlink`` links even where read-only bits do not stop writes (root), ``off``
    copies and uploads every file (phd_flow before deduplication)."""
    value = os.environ.get(DEDUP_ENV, "").strip().lower() or "auto"
    if value not in DEDUP_MODES:
        raise ConfigError(f"{DEDUP_ENV}={value!r} is not one of {', '.join(DEDUP_MODES)}: fix or unset it.")
    return value


def link_or_copy(src: Path, dst: Path, mode: str | None = None, hardlink: bool = True) -> str:
    """Put the content of file ``src`` at the new path ``dst`` without storing it twice where
    that is safe; returns how: ``"reflink"`` (copy-on-write: writes to either never reach the
    other), ``"hardlink"`` (only with ``hardlink``; see :func:`hardlink_read_only`) or
    ``"copy"`` (no reflink and no safe hardlink, or ``mode`` ``"off"``)."""
    mode = mode or dedup_mode()
    if mode != "off":
        if _reflink(src, dst):
            return "reflink"
        if hardlink and hardlink_read_only(src, dst, mode):
            return "hardlink"
    shutil.copyfile(src, dst)
    st = os.stat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return "copy"


def hardlink_read_only(src: Path, dst: Path, mode: str | None = None) -> bool:
    """Make the new path ``dst`` a hardlink of ``src`` (one inode) and the file read-only, so
    that a write through either name fails instead of changing both. Only done where that
    holds: read-only files must stop this process (not root, and not a filesystem that ignores
    permission bits) unless ``mode`` is ``"hardlink"``; never with ``mode`` ``"off"``, across
    filesystems, or where hardlinks are not supported. False when not linked."""
    mode = mode or dedup_mode()
    if mode == "off" or not (mode == "hardlink" or _read_only_protects(dst.parent)):
        return False
    return _hardlink(src, dst, mode == "hardlink")


_NO_REFLINK: set[int] = set()  # st_dev of filesystems that refused a reflink
_PROTECTS: dict[int, bool] = {}  # st_dev -> read-only files stop this process from writing


def _hardlink(src: Path, dst: Path, force: bool) -> bool:
    """Hardlink ``dst`` to ``src`` and make the file read-only; undone (False) when this process
    could still write it (not its owner and it is writable to us), unless ``force``."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, no hardlinks (FAT, some FUSE/SMB), a protected file
        return False
    with contextlib.suppress(OSError):  # not the owner: safe only if we cannot write it anyway
        os.chmod(dst, os.stat(dst).st_mode & ~0o222)
    if force or not os.access(dst, os.W_OK):
        return True
    dst.unlink()
    return False


def _reflink(src: Path, dst: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    device = os.stat(dst.parent).st_dev
    if device in _NO_REFLINK:
        return False
    with open(src, "rb") as source, open(dst, "xb") as target:
        try:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
            ok = True
        except OSError:  # ext4, tmpfs, NFS, another filesystem: not supported
            ok = False
    if not ok:
        _NO_REFLINK.add(device)
        dst.unlink()
        return False
    st = os.stat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


def _read_only_protects(folder: Path) -> bool:
    """True when a read-only file in ``folder`` cannot be written by this process (false for
    root, and on filesystems that ignore permission bits): only then is a hardlink safe."""
    device = os.stat(folder).st_dev
    if device not in _PROTECTS:
        import tempfile

        fd, probe = tempfile.mkstemp(dir=folder, prefix=".phd_flow-probe.")
        os.close(fd)
        try:
            os.chmod(probe, 0o444)
            _PROTECTS[device] = not os.access(probe, os.W_OK)
        finally:
            os.unlink(probe)
    return _PROTECTS[device]


def parse_refs(raw: bytes | None, where: str) -> dict[str, Ref]:
    """Decode a :data:`REFS` object (it comes from a remote: data of any shape is refused with a
    :class:`StorageError` naming ``where``)."""
    if not raw:
        return {}
    try:
        files = json.loads(raw).get("files")
        refs = {}
        for rel, v in files.items():
            key, size, digest = v["key"], v["size"], v["sha256"]
            if not (isinstance(size, int) and size >= 0 and isinstance(digest, str) and _SHA256.fullmatch(digest)):
                raise ValueError(rel)
            refs[keys.remote_relpath(str(rel))] = Ref(keys.remote_relpath(str(key)), size, digest)
        return refs
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, InvalidKeyError) as exc:
        raise StorageError(
            f"{where} is not a valid references file ({type(exc).__name__}: {exc}); files it "
            "should point to cannot be found. Upload the run again (`sync --checksum KEY`)."
        ) from None


def dump_refs(refs: dict[str, Ref]) -> bytes:
    """Encode a :data:`REFS` object."""
    files = {rel: {"key": r.key, "size": r.size, "sha256": r.sha256} for rel, r in sorted(refs.items())}
    return json.dumps({"version": 1, "files": files}, indent=1).encode()


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
        #: What the last :meth:`download` transferred (None before the first one).
        self.last_report: engine.SyncReport | None = None

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

    def download(self, key: KeyLike) -> Path:
        """Pull ``key`` (a run, a subdirectory or one file) from the remote, verified, and return
        its local path (``local_path / key``). What was transferred is in :attr:`last_report`;
        :meth:`download_report` returns it instead of the path."""
        self.last_report = self.download_report(key)
        return self.path(key)

    def download_report(self, key: KeyLike) -> engine.SyncReport:
        """Like :meth:`download`, but returns the :class:`~phd_flow.storage.engine.SyncReport`
        (files transferred, unchanged, bytes, seconds)."""
        rel = keys.normalize(key)
        if rel.split("/", 1)[0] == ".phd_flow":  # the local indexes and the ledger of what was made here
            raise InvalidKeyError(f"{rel!r} is phd_flow's own bookkeeping in local_path; it is never downloaded.")
        remote = self._require_remote(rel)
        if _is_single_file(remote, rel):
            report = self._download_file(remote, rel)
        else:
            report = self.pull_tree(rel, self.local_path / rel)
        self.downloaded_mark(rel.split("/", 1)[0]).touch()  # this tree came from the remote
        return report

    def pull_tree(self, key: KeyLike, dest: Path) -> engine.SyncReport:
        """Download the remote tree (or file) ``key`` into ``dest``, every file verified by its
        sha256: the files stored there, and those it stores by reference (:data:`REFS`) from
        wherever their bytes are: linked from ``local_path`` when a verified copy is there,
        else downloaded."""
        rel = keys.normalize(key)
        remote = self._require_remote(rel)
        retries, workers = self.config.storage.retries, self.config.storage.workers
        refs = self._refs_above(remote, rel)
        try:
            report = engine.pull(remote, rel, dest, retries=retries, workers=workers, label=rel)
        except StorageNotFoundError:
            if not refs:
                raise
            report = engine.SyncReport()
        if dest.is_dir():  # references of trees inside it (a pipeline's child runs) came with the pull
            for found in sorted(dest.rglob(REFS)):
                sub = found.parent.relative_to(dest).as_posix()
                if sub != ".":
                    inner = parse_refs(found.read_bytes(), f"{remote.describe()}/{rel}/{sub}/{REFS}")
                    refs.update({f"{sub}/{r}": ref for r, ref in inner.items()})
        for target_rel, ref in sorted(refs.items()):
            target = keys.safe_join(dest, target_rel) if target_rel else dest
            if self._resolve(remote, ref, target):
                report.transferred.append(f"{rel}/{target_rel}" if target_rel else rel)
                report.bytes += ref.size
            else:
                report.skipped += 1
        return report

    def stored_files(self, key: KeyLike) -> dict[str, Ref]:
        """``{path relative to key: Ref}`` of every file the remote holds below ``key``: those its
        manifests list (at ``key``, or a tree above it) and those stored there by reference."""
        rel = keys.normalize(key)
        remote = self._require_remote(rel)
        retries = self.config.storage.retries
        found: dict[str, Ref] = {}
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            manifest = engine._remote_manifest(remote, prefix, retries)
            listed = {r: Ref(f"{prefix}/{r}", e.size, e.sha256) for r, e in manifest.items()}
            listed.update(self._refs_at(remote, prefix))
            for r, ref in listed.items():
                full = f"{prefix}/{r}"
                if full.startswith(f"{rel}/"):
                    found[full[len(rel) + 1 :]] = ref
        return found

    def _refs_at(self, remote: Remote, prefix: str) -> dict[str, Ref]:
        where = f"{prefix}/{REFS}"
        raw = engine._retry(lambda: remote.read_small(where), self.config.storage.retries)
        return parse_refs(raw, f"{remote.describe()}/{where}")

    def _refs_above(self, remote: Remote, rel: str) -> dict[str, Ref]:
        """References (:data:`REFS` at ``rel`` or a folder above it) to files at or below ``rel``,
        by path relative to ``rel`` (``""``: ``rel`` itself is such a file)."""
        refs: dict[str, Ref] = {}
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            for r, ref in self._refs_at(remote, prefix).items():
                full = f"{prefix}/{r}"
                if full == rel or full.startswith(f"{rel}/"):
                    refs[full[len(rel) + 1 :]] = ref
        return refs

    def _resolve(self, remote: Remote, ref: Ref, target: Path) -> bool:
        """Make ``target`` hold the bytes ``ref`` describes; False when it already did."""
        if _holds(target, ref):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".phd_flow-part")
        part.unlink(missing_ok=True)
        entry = engine.Entry(ref.size, ref.sha256)
        try:
            local = keys.safe_join(self.local_path, ref.key)
            # a verified copy on this machine: stored once here too; never phd_flow's own
            # bookkeeping (".phd_flow/..."), since the remote names ref.key
            if not ref.key.startswith(".") and _holds(local, ref):
                link_or_copy(local, part)
                engine._verify(part, entry, str(local))
                part.replace(target)
                return True
        except (InvalidKeyError, StorageError, OSError):
            part.unlink(missing_ok=True)

        def fetch() -> None:
            try:
                remote.get(ref.key, part)
                engine._verify(part, entry, f"{remote.describe()}/{ref.key}")
                part.replace(target)
            finally:
                part.unlink(missing_ok=True)

        engine._retry(fetch, self.config.storage.retries)
        return True

    def downloaded_mark(self, top: str) -> Path:
        """The local sidecar saying ``local_path/<top>`` was filled by :meth:`download`: a
        run that came from the bucket is data, so ``sync`` never pushes it back nor records it
        in MLflow (its run.json's sync and MLflow sections are not instructions)."""
        folder = self.local_path / DOWNLOADED
        folder.mkdir(parents=True, exist_ok=True)
        return folder / keys.remote_relpath(top)

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
        """True if ``key`` exists locally or in the remote (stored there, or by reference)."""
        rel = keys.normalize(key)
        if (self.local_path / rel).exists():
            return True
        remote = self.remote
        if remote is None:
            return False
        stored = _is_single_file(remote, rel) or any(True for _ in remote.list(rel))
        return stored or bool(self._refs_above(remote, rel))

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


def _holds(path: Path, ref: Ref) -> bool:
    """True when ``path`` is a regular file with the size and sha256 of ``ref``."""
    try:
        return (
            path.is_file()
            and not path.is_symlink()
            and path.stat().st_size == ref.size
            and sha256_file(path) == ref.sha256
        )
    except OSError:
        return False


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
