"""The sync engine shared by every backend: manifests, diffing, parallel verified transfers.

A synced tree carries a manifest (``.phd_flow-manifest.json``) with size, mtime and sha256 of
every file. Pushing compares the local manifest with the remote's manifest and listing and
sends only what differs; the remote manifest is written last, so it never claims a file that
did not arrive (and ``Storage.remove`` drops removed files from it). When the remote manifest
already vouches for every local file, the listing is skipped: an unchanged re-sync costs one
GET. Pulling verifies every downloaded file against the manifest's sha256 and
retries a mismatch; a file is only renamed into place once verified.

What a push notices (like rsync): by default a file is re-hashed when its size or mtime differs
from the local manifest's, so any edit that changes either is sent, whatever its size. An edit
that keeps the size *and* sets the old mtime back (``touch -d``, ``os.utime``, a restore that
preserves times), or a file replaced by another of the same size and mtime, is only seen in
checksum mode (``checksum=True``, :func:`checksum_mode`, ``sync --checksum``/``--verify``),
which re-hashes every file like ``rsync --checksum``.

Pushes to one remote path take turns (:class:`PushLock`): two machines pushing different
contents to the same path at once leave one whole version, never a mix of both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import socket
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from phd_flow import keys
from phd_flow._io import PRIVATE_PREFIX, atomic_write_bytes, sha256_file
from phd_flow.errors import (
    ChecksumMismatchError,
    InvalidKeyError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
    UnsafeRemoteNameError,
    UserError,
)
from phd_flow.storage.base import Remote

MANIFEST = ".phd_flow-manifest.json"
#: Left next to the local manifest by an interrupted push: which files did arrive, and where.
#: The next push to the same place skips them (when the listing shows them at the same size)
#: instead of re-sending the whole tree; a completed push deletes it.
JOURNAL = ".phd_flow-pushed.json"
#: Files up to this size are uploaded from an in-memory snapshot (consistent even while written).
SNAPSHOT_BYTES = 4 * 1024 * 1024
#: Folder inside a pushed path holding one marker per push to that path (see :class:`PushLock`).
LOCKS = ".phd_flow-pushing"
#: A push holding its turn rewrites its marker this often; a marker from another host that has
#: not changed for ``STALE_SECONDS`` belongs to a push that died, and is removed by the next one.
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
_T = TypeVar("_T")
#: Checksum mode for pushes in this context (see :func:`checksum_mode`).
_CHECKSUM: ContextVar[bool] = ContextVar("phd_flow_sync_checksum", default=False)


@contextmanager
def checksum_mode(on: bool = True) -> Iterator[None]:
    """Within this block every push re-hashes every local file instead of trusting an unchanged
    size and mtime (``sync --checksum``): same-size edits with the old mtime set back, and files
    replaced by others of the same size and mtime, are then sent too."""
    token = _CHECKSUM.set(on)
    try:
        yield
    finally:
        _CHECKSUM.reset(token)


@dataclass
class Entry:
    """One file of a manifest."""

    size: int
    sha256: str
    mtime_ns: int = 0


@dataclass
class SyncReport:
    """What one push or pull did."""

    transferred: list[str] = field(default_factory=list)
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{len(self.transferred)} files ({self.bytes / 1e6:.1f} MB) transferred, "
            f"{self.skipped} unchanged, in {self.seconds:.2f} s"
        )


# --- manifests --------------------------------------------------------------------------------


def scan(root: Path, exclude: Iterable[str] = (), *, checksum: bool | None = None) -> dict[str, Entry]:
    """Hash every file below ``root``, reusing the stored manifest for unchanged size+mtime
    (unless ``checksum``, default: :func:`checksum_mode`, asks to re-hash every file)."""
    previous = {} if (_CHECKSUM.get() if checksum is None else checksum) else load_manifest(root)
    skip = tuple(e.rstrip("/") + "/" for e in exclude)
    entries: dict[str, Entry] = {}
    for path, rel in _walk(root):
        if rel.startswith(skip) or rel + "/" in skip:
            continue
        try:
            st = path.stat()
            old = previous.get(rel)
            if old and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                entries[rel] = old
            else:
                entries[rel] = Entry(st.st_size, sha256_file(path), st.st_mtime_ns)
        except FileNotFoundError:
            continue  # gone since the walk (a file replaced or deleted meanwhile): not part of the tree
    return entries


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            # phd_flow's own files: manifests, temp files of atomic writes, lock files, partial downloads
            if name.startswith(PRIVATE_PREFIX) or name.endswith(".phd_flow-part"):
                continue
            path = base / name
            if path.is_symlink() or not path.is_file():
                continue
            yield path, path.relative_to(root).as_posix()


def load_manifest(root: Path) -> dict[str, Entry]:
    """The manifest stored in ``root`` (empty when absent or unreadable)."""
    try:
        return parse_manifest((root / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return {}


_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_manifest(raw: bytes | None) -> dict[str, Entry]:
    """Decode manifest JSON: ``{"files": {name: {"size": int >= 0, "sha256": 64 hex}}}``;
    raises ValueError on anything else (it may come from a remote: data of any shape)."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (RecursionError, OverflowError) as exc:
        raise ValueError(f"not a manifest ({type(exc).__name__})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ValueError("not a manifest (no 'files' object)")
    entries = {}
    for name, v in files.items():
        v = v if isinstance(v, dict) else {}
        size, digest, mtime = v.get("size"), v.get("sha256"), v.get("mtime_ns", 0)
        if not (_count(size) and _count(mtime) and isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ValueError(f"not a manifest (bad entry for {name!r})")
        entries[name] = Entry(typing.cast(int, size), digest, typing.cast(int, mtime))
    return entries


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def dump_manifest(entries: dict[str, Entry]) -> bytes:
    """Encode a manifest as JSON."""
    files = {k: {"size": e.size, "sha256": e.sha256, "mtime_ns": e.mtime_ns} for k, e in sorted(entries.items())}
    return json.dumps({"version": 1, "files": files}, indent=1).encode()


# --- push / pull ------------------------------------------------------------------------------


def push(
    remote: Remote,
    local_root: Path,
    remote_prefix: str,
    *,
    exclude: Iterable[str] = (),
    retries: int = 4,
    workers: int | None = None,
    label: str = "",
    checksum: bool | None = None,
) -> SyncReport:
    """Upload what differs between ``local_root`` and ``remote_prefix``, verified by sha256
    (``checksum``: re-hash every local file, see :func:`checksum_mode`)."""
    started = time.perf_counter()
    entries = scan(local_root, exclude, checksum=checksum)
    atomic_write_bytes(local_root / MANIFEST, dump_manifest(entries))
    target = f"{remote.describe()}/{remote_prefix}"
    delivered = _load_journal(local_root, target)  # {} when none, or one of another remote
    if _vouched(entries, _remote_manifest(remote, remote_prefix, retries)):
        # The remote manifest is written after its files and dropped when any of them is
        # removed (Storage.remove), so it vouches for them: no listing needed (the listing is
        # most of the cost of an unchanged re-sync), and nothing to write, so no turn to take.
        if delivered:
            (local_root / JOURNAL).unlink(missing_ok=True)
        return SyncReport(skipped=len(entries), seconds=time.perf_counter() - started)
    with PushLock(remote, remote_prefix, retries, label or remote_prefix):
        # Read again in our turn: a push that ran meanwhile may have changed the remote.
        remote_entries = _remote_manifest(remote, remote_prefix, retries)
        if _vouched(entries, remote_entries):
            report = SyncReport(skipped=len(entries))
        else:
            report = _send(
                remote, local_root, remote_prefix, entries, remote_entries, delivered, retries, workers, label
            )
    if delivered:
        (local_root / JOURNAL).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - started
    return report


def _vouched(entries: dict[str, Entry], remote_entries: dict[str, Entry]) -> bool:
    return all(_same(remote_entries.get(rel), entry) for rel, entry in entries.items())


def _send(
    remote: Remote,
    local_root: Path,
    remote_prefix: str,
    entries: dict[str, Entry],
    remote_entries: dict[str, Entry],
    delivered: dict[str, Entry],
    retries: int,
    workers: int | None,
    label: str,
) -> SyncReport:
    """Upload what the listing and manifests say is missing, then the merged manifest (the
    caller holds the path's :class:`PushLock`)."""
    target = f"{remote.describe()}/{remote_prefix}"
    listed = {f.key: f.size for f in _retry(lambda: list(remote.list(remote_prefix)), retries)}
    known = {**delivered, **remote_entries}
    todo = [
        rel
        for rel, entry in entries.items()
        if not (
            rel in known and known[rel].sha256 == entry.sha256 and listed.get(_join(remote_prefix, rel)) == entry.size
        )
    ]
    report = SyncReport(skipped=len(entries) - len(todo))

    changed: list[str] = []
    vanished: set[str] = set()

    def upload(rel: str) -> None:
        path = local_root / rel
        try:
            stat = path.stat()
        except FileNotFoundError:
            vanished.add(rel)  # deleted since the scan: skipped, and the manifest does not claim it
            return
        if (stat.st_size, stat.st_mtime_ns) == (entries[rel].size, entries[rel].mtime_ns):
            if stat.st_size > SNAPSHOT_BYTES:
                remote.put(path, _join(remote_prefix, rel))
                if path.stat().st_size != entries[rel].size:
                    raise StorageError(f"{path} changed while it was being uploaded; sync again.")
                return
        elif stat.st_size > SNAPSHOT_BYTES:
            raise StorageError(f"{path} changed while it was being uploaded; sync again.")
        # Small files (logs still being appended to, run.json) are sent from one in-memory
        # snapshot, so the manifest always describes exactly the bytes the remote got.
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            vanished.add(rel)
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest != entries[rel].sha256:
            entries[rel] = Entry(len(data), digest, stat.st_mtime_ns)
            changed.append(rel)
        remote.write_bytes(_join(remote_prefix, rel), data)

    try:
        _run_parallel(todo, upload, entries, report, retries, workers or remote.max_workers, label)
        for rel in vanished:
            report.bytes -= entries.pop(rel).size
            report.transferred.remove(rel)
            report.skipped += 1
        if changed or vanished:
            atomic_write_bytes(local_root / MANIFEST, dump_manifest(entries))
        merged = {**remote_entries, **entries}
        _retry(lambda: remote.write_bytes(_join(remote_prefix, MANIFEST), dump_manifest(merged)), retries)
    except BaseException:
        # The remote manifest was not written; remember what did arrive for the next push.
        arrived = {**delivered, **{rel: entries[rel] for rel in report.transferred}}
        journal = {"remote": target, **json.loads(dump_manifest(arrived))}
        atomic_write_bytes(local_root / JOURNAL, json.dumps(journal, indent=1).encode())
        raise
    return report


def pull(
    remote: Remote,
    remote_prefix: str,
    local_root: Path,
    *,
    retries: int = 4,
    workers: int | None = None,
    label: str = "",
) -> SyncReport:
    """Download what differs from ``remote_prefix`` into ``local_root``, verified by sha256."""
    started = time.perf_counter()
    manifest = _remote_manifest(remote, remote_prefix, retries)
    files = _retry(lambda: list(remote.list(remote_prefix)), retries)
    files = [f for f in files if LOCKS not in f.key.split("/")]  # markers of pushes in progress
    # Every name crosses into the local tree: all of them are checked before anything is written.
    listed = _checked_names(remote, remote_prefix, [(f.key, f.size) for f in files], manifest)
    listed.pop(MANIFEST, None)
    if not listed:
        raise StorageNotFoundError(f"Nothing found at {remote.describe()}/{remote_prefix}.")
    targets = {rel: _safe_target(remote, remote_prefix, local_root, rel) for rel in listed}
    local = load_manifest(local_root)
    todo = []
    for rel, size in listed.items():
        target = targets[rel]
        expected = manifest.get(rel)
        if target.is_file() and target.stat().st_size == size:
            known = local.get(rel)
            if expected is None or (known and known.sha256 == expected.sha256):
                continue
            if sha256_file(target) == expected.sha256:
                continue
        todo.append(rel)
    entries = {rel: manifest.get(rel) or Entry(size, "") for rel, size in listed.items()}
    report = SyncReport(skipped=len(listed) - len(todo))

    def download(rel: str) -> None:
        target = _safe_target(remote, remote_prefix, local_root, rel)  # no symlink appeared since
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".phd_flow-part")
        try:
            remote.get(_join(remote_prefix, rel), part)
            _verify(part, entries[rel], f"{remote.describe()}/{_join(remote_prefix, rel)}")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)

    _run_parallel(todo, download, entries, report, retries, workers or remote.max_workers, label)
    if manifest:
        fresh = {
            rel: Entry(e.size, e.sha256, (local_root / rel).stat().st_mtime_ns)
            for rel, e in manifest.items()
            if (local_root / rel).is_file() and not (local_root / rel).is_symlink()
        }
        atomic_write_bytes(local_root / MANIFEST, dump_manifest(fresh))
    report.seconds = time.perf_counter() - started
    return report


def _checked_names(
    remote: Remote, prefix: str, files: list[tuple[str, int]], manifest: dict[str, Entry]
) -> dict[str, int]:
    """``{name relative to prefix: size}`` of a listing; raises :class:`UnsafeRemoteNameError`
    for the first name (listed or in the manifest) that could leave the local folder. S3 folder
    markers (names ending in '/') are skipped: they hold no file."""
    base = f"{prefix.rstrip('/')}/" if prefix else ""
    listed: dict[str, int] = {}
    for name, size in files:
        if name.endswith("/"):
            continue
        rel = name[len(base) :] if name.startswith(base) else name
        _check_name(remote, prefix, rel if name.startswith(base) else f"/{name}")
        listed[rel] = size
    for rel in manifest:
        _check_name(remote, prefix, rel)
    folders = {
        "/".join(parts[:i]) for parts in (r.split("/") for r in (*listed, *manifest)) for i in range(1, len(parts))
    }
    for rel in sorted({*listed, *manifest}):
        if rel in folders:  # possible in an object store, never in a folder
            raise _unsafe(remote, prefix, rel, "it is both a file and a folder")
        segments = rel.split("/")
        reserved = [s for s in segments[:-1] if s in (MANIFEST, JOURNAL)]
        reserved += [s for s in segments if s.endswith((".phd_flow-part", ".phd_flow-tmp"))]
        if reserved:
            raise _unsafe(remote, prefix, rel, f"{reserved[0]!r} is a name phd_flow reserves")
    return listed


def _check_name(remote: Remote, prefix: str, rel: str) -> None:
    try:
        keys.remote_relpath(rel)
    except InvalidKeyError as exc:
        raise _unsafe(remote, prefix, rel, str(exc)) from None


def _safe_target(remote: Remote, prefix: str, local_root: Path, rel: str) -> Path:
    try:
        return keys.safe_join(local_root, rel)
    except InvalidKeyError as exc:
        raise _unsafe(remote, prefix, rel, str(exc)) from None


def _unsafe(remote: Remote, prefix: str, rel: str, why: str) -> UnsafeRemoteNameError:
    run = prefix.split("/", 1)[0] or remote.describe()
    return UnsafeRemoteNameError(
        f"Run {run}: {remote.describe()}/{_join(prefix, rel)} has the unsafe name {rel!r} ({why}) "
        f"Nothing of {prefix or 'it'} was written locally. Someone with write access to the "
        "storage planted it or a tool wrote it wrongly: delete that object in the storage."
    )


def _load_journal(local_root: Path, target: str) -> dict[str, Entry]:
    """The files an interrupted push to ``target`` delivered (empty when none or elsewhere)."""
    try:
        raw = (local_root / JOURNAL).read_bytes()
        return parse_manifest(raw) if json.loads(raw).get("remote") == target else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _same(remote: Entry | None, local: Entry) -> bool:
    return remote is not None and remote.size == local.size and remote.sha256 == local.sha256


def _verify(path: Path, expected: Entry, where: str) -> None:
    size = path.stat().st_size
    if size != expected.size:
        raise ChecksumMismatchError(f"{where}: got {size} bytes, expected {expected.size}.")
    if expected.sha256 and sha256_file(path) != expected.sha256:
        raise ChecksumMismatchError(
            f"{where}: sha256 does not match the manifest (the remote copy is damaged or was "
            "changed after it was uploaded). The bad download was discarded."
        )


def _remote_manifest(remote: Remote, prefix: str, retries: int) -> dict[str, Entry]:
    raw = _retry(lambda: remote.read_small(_join(prefix, MANIFEST)), retries)
    try:
        return parse_manifest(raw)
    except ValueError:
        return {}  # a damaged remote manifest only costs a full re-transfer


def _join(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix else rel


# --- taking turns ----------------------------------------------------------------------------

#: Markers this process holds now (a marker of this host and pid that is not here was left by
#: a push of this process that could not remove it, e.g. while the store was down).
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


class PushLock:
    """Pushes to one remote path take turns, so two machines pushing different contents to the
    same path at once leave one whole version (the later turn's), never a mix.

    Without turns they can mix: a push uploads file by file and writes the manifest last, so
    when A uploads ``f``, B uploads ``f`` and A's manifest lands after B's, the remote holds B's
    ``f`` under A's manifest. Object stores have no rename and no common conditional write, so
    the turn is taken with *markers*: objects ``<path>/.phd_flow-pushing/<start time>-<random>``
    holding the pusher's host, pid and a heartbeat counter. A push

    1. writes its marker M (a fresh name), then lists the marker folder;
    2. sees no other live marker: its turn, held until it removes M when done;
    3. sees others, M not the oldest name: removes M, waits until no live marker is left, and
       starts again at 1 with a fresh name;
    4. sees others, M the oldest: keeps M, waits until the others are gone, then has its turn.

    **At most one push has its turn** (needs only what every backend gives: a listing started
    after a write completed shows it). Say P and Q both have their turn, P's last listing (the
    one that gave it its turn, started after P's marker write W_P completed) did not show Q's
    marker. Then Q's marker write W_Q completed after that listing started, so after W_P; Q's
    last listing started after W_Q, so after W_P, and P's marker was still there (P removes it
    only when its turn ends or in step 3, and P took no step 3 after its last listing): Q saw
    it and did not get its turn. Contradiction. A rewrite of a marker (heartbeat) never removes it.

    **Someone gets a turn:** the oldest live marker never steps back (step 4) and every younger
    one that sees it does (step 3); clock skew between machines only changes who is oldest.

    **A push that died** leaves its marker: a marker of this host whose pid is gone, a marker of
    this very process it no longer holds, or one whose heartbeat (rewritten every
    ``HEARTBEAT_SECONDS``) has not changed for ``STALE_SECONDS`` is stale and removed by the
    waiter. A store that cannot delete (some MLflow artifact stores) gets ``"released"`` written
    into the marker instead; such markers count as gone. What turns cannot prevent: a push
    frozen longer than ``STALE_SECONDS`` (a suspended laptop) that wakes up and goes on. Its files
    then disagree with the manifest, and downloads refuse them (sha256), as before.
    """

    def __init__(self, remote: Remote, prefix: str, retries: int, label: str = "") -> None:
        self.remote, self.retries, self.label = remote, retries, label or prefix or remote.describe()
        self.folder = _join(prefix, LOCKS)
        self.where = f"{remote.describe()}/{prefix}"
        self.key = ""
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[bytes, float]] = {}  # other marker -> (body, when it last changed)
        self._told: float | None = None  # when we last said we are waiting

    # --- the protocol ---------------------------------------------------------------------------

    def __enter__(self) -> PushLock:
        try:
            self._take_turn()
        except BaseException:
            self._remove()  # whatever stopped us (the store, Ctrl-C): leave no marker behind
            raise
        self._thread = threading.Thread(target=self._heartbeat, name="phd_flow-push-turn", daemon=True)
        self._thread.start()
        return self

    def _take_turn(self) -> None:
        while True:
            name = f"{time.time_ns():020d}-{secrets.token_hex(6)}"
            self.key = _join(self.folder, name)
            with _HELD_LOCK:
                _HELD.add(self.key)
            self._write()
            while True:
                others = self._live_others(name)
                if not others:
                    return
                if min(others) < name:
                    break  # step 3: an older push goes first
                self._wait(others)  # step 4: ours is the oldest; the younger step back or finish
            self._remove()
            while others := self._live_others(""):
                self._wait(others)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove()

    # --- markers --------------------------------------------------------------------------------

    def _body(self, released: bool = False) -> bytes:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "beat": self._beat, "push": self.label}
        return json.dumps({**info, "released": True} if released else info).encode()

    def _write(self) -> None:
        body = self._body()
        _retry(lambda: self.remote.write_bytes(self.key, body), self.retries)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._beat += 1
            try:
                self.remote.write_bytes(self.key, self._body())
            except Exception:  # a missed beat only matters after STALE_SECONDS
                continue

    def _remove(self) -> None:
        """Remove our marker (best effort: one left behind is stale for the next push)."""
        try:
            _retry(lambda: self.remote.delete([self.key]), self.retries)
        except StorageUnavailableError:
            pass
        except StorageError:  # the store cannot delete: mark it released instead
            with suppress(StorageError):
                self.remote.write_bytes(self.key, self._body(released=True))
        finally:
            with _HELD_LOCK:
                _HELD.discard(self.key)

    def _live_others(self, mine: str) -> dict[str, dict[str, Any]]:
        """The other markers of a running push (stale ones are removed on the way)."""
        live: dict[str, dict[str, Any]] = {}
        for found in _retry(lambda: list(self.remote.list(self.folder)), self.retries):
            name = found.key.rsplit("/", 1)[-1]
            if name == mine:
                continue
            body = _retry(lambda: self.remote.read_small(found.key), self.retries)  # noqa: B023
            if body is None:
                continue  # removed since the listing
            try:
                info = json.loads(body)
                info = info if isinstance(info, dict) else {}
            except ValueError:
                info = {}
            if info.get("released"):
                continue
            if self._stale(found.key, body, info):
                from phd_flow.log import logger

                logger.warning(
                    f"{self.where}: removing the marker of a push that stopped without finishing "
                    f"(host {info.get('host', '?')}, pid {info.get('pid', '?')})."
                )
                with suppress(StorageError):
                    _retry(lambda: self.remote.delete([found.key]), self.retries)  # noqa: B023
                continue
            live[name] = info
        return live

    def _stale(self, key: str, body: bytes, info: dict[str, Any]) -> bool:
        now = time.monotonic()
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            pid = info["pid"]
            if pid == os.getpid():
                with _HELD_LOCK:
                    return key not in _HELD
            if not _pid_alive(pid):
                return True
        seen = self._seen.get(key)
        if seen is None or seen[0] != body:
            self._seen[key] = (body, now)
            return False
        return now - seen[1] > STALE_SECONDS

    def _wait(self, others: dict[str, dict[str, Any]]) -> None:
        if self._told is None or time.monotonic() - self._told > 30:
            from phd_flow.log import logger

            self._told = time.monotonic()
            who = ", ".join(f"host {i.get('host', '?')} pid {i.get('pid', '?')}" for i in others.values())
            logger.info(f"{self.label}: another push to {self.where} is running ({who}); waiting for it to finish.")
        time.sleep(0.1 + random.random() * 0.3)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# --- retries and parallelism ------------------------------------------------------------------

RETRYABLE: tuple[type[BaseException], ...] = (
    StorageUnavailableError,
    ChecksumMismatchError,
    ConnectionError,
    TimeoutError,
)


def _retry(fn: Callable[[], _T], retries: int, base_delay: float = 0.2) -> _T:
    """Call ``fn``; retry transient errors with exponential backoff (0.2 s, 0.4 s, ...)."""
    for attempt in range(max(1, retries)):
        try:
            return fn()
        except UserError:
            raise
        except RETRYABLE:
            if attempt + 1 >= max(1, retries):
                raise
            time.sleep(min(base_delay * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def _run_parallel(
    items: list[str],
    action: Callable[[str], None],
    entries: dict[str, Any],
    report: SyncReport,
    retries: int,
    workers: int,
    label: str,
) -> None:
    if not items:
        return
    progress = _Progress(len(items), sum(entries[i].size for i in items), label)
    lock = threading.Lock()

    def one(rel: str) -> None:
        _retry(lambda: action(rel), retries)
        with lock:
            report.transferred.append(rel)
            report.bytes += entries[rel].size
            progress.advance(entries[rel].size)

    try:
        if workers <= 1 or len(items) == 1:
            for rel in items:
                one(rel)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phd_flow-sync") as pool:
            futures: list[Future[None]] = [pool.submit(one, rel) for rel in items]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                future.result()
    finally:
        progress.close()


class _Progress:
    """A tqdm bar on a TTY, a log line every 10 s otherwise, nothing for tiny transfers."""

    def __init__(self, files: int, size: int, label: str) -> None:
        self.files, self.done, self.label = files, 0, label
        self.last = time.monotonic()
        self.bar: Any = None
        if (files >= 20 or size >= 50 << 20) and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=size, unit="B", unit_scale=True, desc=label or "sync", leave=False)

    def advance(self, size: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(size)
        elif time.monotonic() - self.last > 10:
            from phd_flow.log import logger

            self.last = time.monotonic()
            logger.info(f"{self.label or 'sync'}: {self.done}/{self.files} files")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
