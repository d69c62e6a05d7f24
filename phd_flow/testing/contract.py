"""The storage contract: one pytest suite every :class:`~phd_flow.storage.base.Remote` passes.

Subclass :class:`RemoteContract` in a test module and provide a ``remote`` fixture that returns
a fresh, empty remote; every ``test_*`` method then runs against your backend, both through the
raw :class:`Remote` API and through the shared sync engine (:class:`phd_flow.storage.Storage`)::

    import pytest
    from phd_flow.testing import RemoteContract

    class TestMyContract(RemoteContract):
        large_file_size = 9 << 20            # above the backend's multipart threshold
        refused_keys = ["a//b"]              # names the store refuses (none: no such case)
        credentials_hint = ("MY_STORE_KEY",)  # the error for bad credentials names one of these
        bad_secret = "not-the-real-secret"   # ... and never contains this

        @pytest.fixture
        def remote(self, tmp_path):
            return MyRemote(...)

        @pytest.fixture
        def bad_credentials_remote(self):      # a store with credentials: one it rejects
            return MyRemote(..., secret=self.bad_secret)

A case that cannot apply to a backend is not generated at all (never skipped): the
bad-credentials case exists only where the subclass defines ``bad_credentials_remote`` (a
local directory has no credentials), the refused-names case only where ``refused_keys`` is
not empty (a store that refuses no name beyond phd_flow's own key rules).

Nothing here depends on phd_flow's own ``tests/`` package, so third-party backends can use it.
"""

from __future__ import annotations

import builtins
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from phd_flow.config import Config, StorageConfig
from phd_flow.errors import StorageAuthError, StorageNotFoundError, UserError
from phd_flow.storage import engine
from phd_flow.storage.base import Remote, RemoteFile
from phd_flow.storage.facade import Storage

#: A run-like directory: names exercise nesting, empty files and unicode.
RUN_TREE: dict[str, bytes] = {
    "run.json": b'{"status": "completed"}\n',
    "output.log": b"2024-01-01 00:00:00.000 | INFO | x:y:1 - hello\n" * 50,
    "results.pickle": bytes(range(256)) * 8,
    "empty.txt": b"",
    "nested/a/b/c/deep.txt": b"deep\n",
    "nested/a/sibling.bin": b"\x00\xff" * 1000,
    "données/résumé ✓.txt": "unicode ✓ content\n".encode(),
    **{f"many/file_{i:03d}.txt": f"small file {i}\n".encode() for i in range(30)},
}


def storage_for(remote: Remote, local_path: Path, *, workers: int = 8, retries: int = 2) -> Storage:
    """A :class:`Storage` over ``local_path`` that mirrors into ``remote`` (no config file)."""
    config = Config(
        local_path=local_path,
        project_root=local_path.parent,
        storage=StorageConfig(workers=workers, retries=retries),
    )
    return Storage(config, remote)


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    """Create ``files`` (relative POSIX path -> content) below ``root``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative POSIX path -> content), phd_flow's own bookkeeping
    (``.phd_flow-*``: manifests, journals, locks; never synced) left out."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if not name.startswith(".phd_flow-"):
                path = Path(dirpath) / name
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class GatedRemote(Remote):
    """``inner`` with a pause: writing a manifest first sets ``blocked`` and waits for ``gate``.

    It forces the interleaving that mixed versions before pushes took turns: this push has
    uploaded every file and not yet written its manifest when another push to the same path
    runs (``gate`` is set once that one wrote its manifest or waits for its turn)."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.max_workers = inner.max_workers
        self.blocked, self.gate = threading.Event(), threading.Event()

    @classmethod
    def from_config(cls, config: Config) -> Remote:
        raise NotImplementedError

    def describe(self) -> str:
        return self.inner.describe()

    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        return self.inner.list(prefix)

    def stat(self, key: str) -> RemoteFile | None:
        return self.inner.stat(key)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.list_dirs(prefix)

    def put(self, local: Path, key: str) -> None:
        self.inner.put(local, key)

    def get(self, key: str, local: Path) -> None:
        self.inner.get(key, local)

    def delete(self, keys: builtins.list[str]) -> None:
        self.inner.delete(keys)

    def read_bytes(self, key: str) -> bytes | None:
        return self.inner.read_bytes(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(engine.MANIFEST) and not self.gate.is_set():
            self.blocked.set()
            until(self.gate.is_set, "the other push to write its manifest or wait for its turn")
        self.inner.write_bytes(key, data)


class RemoteContract:
    """Behaviour shared by every storage backend. Subclass it; provide the ``remote`` fixture."""

    #: Cases generated only for backends that declare the capability (see the module docstring).
    _CAPABILITIES: ClassVar[dict[str, Callable[[type[RemoteContract]], bool]]] = {
        "test_wrong_credentials_name_the_fix_and_hide_the_secret": lambda cls: any(
            "bad_credentials_remote" in vars(k) for k in cls.__mro__
        ),
        "test_refused_names_raise_a_user_error": lambda cls: bool(cls.refused_keys),
    }

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for name, capable in RemoteContract._CAPABILITIES.items():
            if not capable(cls):
                setattr(cls, name, None)  # pytest collects no case from it

    #: Size of the file that must cross the backend's multipart / large-file threshold.
    large_file_size: ClassVar[int] = 6 << 20
    #: Keys the store refuses (e.g. B2's file-name rules); each must raise a clear UserError.
    refused_keys: ClassVar[list[str]] = []
    #: The bad-credentials error names at least one of these (env vars or config keys).
    credentials_hint: ClassVar[tuple[str, ...]] = ()
    #: The secret ``bad_credentials_remote`` uses; it must never appear in an error message.
    bad_secret: ClassVar[str] = ""

    # --- fixtures ---------------------------------------------------------------------------

    @pytest.fixture
    def remote(self) -> Remote:
        """A fresh, empty remote. Subclasses must override this fixture."""
        raise NotImplementedError("Override the `remote` fixture in your RemoteContract subclass.")

    @pytest.fixture
    def storage(self, remote: Remote, tmp_path: Path) -> Storage:
        """The first machine: a local_path mirrored into ``remote``."""
        return storage_for(remote, tmp_path / "machine1")

    @pytest.fixture
    def second(self, remote: Remote, tmp_path: Path) -> Storage:
        """A second machine: an empty local_path over the same remote."""
        return storage_for(remote, tmp_path / "machine2")

    # --- raw Remote API -----------------------------------------------------------------------

    def test_write_read_bytes_round_trip_and_overwrite(self, remote: Remote) -> None:
        remote.write_bytes("dir/blob.bin", b"\x00first")
        assert remote.read_bytes("dir/blob.bin") == b"\x00first"
        remote.write_bytes("dir/blob.bin", b"second")
        assert remote.read_bytes("dir/blob.bin") == b"second"
        remote.write_bytes("dir/empty", b"")
        assert remote.read_bytes("dir/empty") == b""

    def test_put_get_stat(self, remote: Remote, tmp_path: Path) -> None:
        source = tmp_path / "source.bin"
        source.write_bytes(os.urandom(3000))
        remote.put(source, "x/y/source.bin")
        stat = remote.stat("x/y/source.bin")
        assert stat is not None and stat.key == "x/y/source.bin" and stat.size == 3000
        assert remote.stat("x/y") is None, "stat() of a directory prefix must be None"
        target = tmp_path / "target.bin"
        remote.get("x/y/source.bin", target)
        assert target.read_bytes() == source.read_bytes()

    def test_missing_key(self, remote: Remote, tmp_path: Path) -> None:
        assert remote.stat("absent/file.txt") is None
        assert remote.read_bytes("absent/file.txt") is None
        assert list(remote.list("absent")) == []
        assert remote.list_dirs("absent") == []
        with pytest.raises(StorageNotFoundError):
            remote.get("absent/file.txt", tmp_path / "out")
        remote.delete(["absent/file.txt"])  # deleting what is not there is not an error

    def test_list_is_recursive_and_respects_directory_boundaries(self, remote: Remote) -> None:
        for key in ["a/x", "a/b/y", "ab/z", "top.txt"]:
            remote.write_bytes(key, key.encode())
        assert sorted(f.key for f in remote.list("a")) == ["a/b/y", "a/x"]
        assert sorted(f.key for f in remote.list("a/")) == ["a/b/y", "a/x"]
        assert sorted(f.key for f in remote.list("")) == ["a/b/y", "a/x", "ab/z", "top.txt"]
        assert {f.key: f.size for f in remote.list("ab")} == {"ab/z": 4}
        assert remote.list_dirs("") == ["a", "ab"]
        assert remote.list_dirs("a") == ["b"]
        assert remote.list_dirs("a/b") == []

    def test_delete_many(self, remote: Remote) -> None:
        names = [f"d/{i}" for i in range(25)] + ["keep/me"]
        for name in names:
            remote.write_bytes(name, b"1")
        remote.delete([*names[:-1], "d/never-existed"])
        assert [f.key for f in remote.list("")] == ["keep/me"]

    def test_unicode_key(self, remote: Remote) -> None:
        key = "données/résumé ✓.txt"
        remote.write_bytes(key, "✓".encode())
        assert [f.key for f in remote.list("données")] == [key]
        assert remote.read_bytes(key) == "✓".encode()

    def test_describe_is_a_nonempty_location(self, remote: Remote) -> None:
        assert remote.describe().strip()

    # --- the sync engine over this backend ----------------------------------------------------

    def test_round_trip_to_a_second_machine_is_byte_identical(self, storage: Storage, second: Storage) -> None:
        write_tree(storage.path("run_1"), RUN_TREE)
        report = storage.upload("run_1")
        assert sorted(report.transferred) == sorted(RUN_TREE) and report.skipped == 0
        assert storage.remote_ls("run_1") == sorted(f"run_1/{rel}" for rel in RUN_TREE)
        local = second.download("run_1")
        assert local == second.path("run_1") and second.last_report is not None
        assert len(second.last_report.transferred) == len(RUN_TREE)
        assert read_tree(second.path("run_1")) == RUN_TREE
        again = second.download_report("run_1")
        assert again.transferred == [] and again.skipped == len(RUN_TREE)

    def test_unchanged_resync_transfers_nothing_and_a_change_only_itself(self, storage: Storage) -> None:
        write_tree(storage.path("run_1"), RUN_TREE)
        storage.upload("run_1")
        again = storage.upload("run_1")
        assert again.transferred == [] and again.skipped == len(RUN_TREE) and again.bytes == 0
        storage.path("run_1/nested/a/b/c/deep.txt").write_bytes(b"changed, and longer\n")
        storage.path("run_1/new.txt").write_bytes(b"new")
        changed = storage.upload("run_1")
        assert sorted(changed.transferred) == ["nested/a/b/c/deep.txt", "new.txt"]

    #: run.json edited in place to other bytes of the same size.
    SAME_SIZE_EDIT: ClassVar[bytes] = b'{"status": "failed!!!"}\n'

    def _edited_in_place(self, storage: Storage) -> tuple[Path, os.stat_result]:
        write_tree(storage.path("run_1"), RUN_TREE)
        storage.upload("run_1")
        path = storage.path("run_1/run.json")
        assert len(self.SAME_SIZE_EDIT) == len(RUN_TREE["run.json"]) != 0
        return path, path.stat()

    def _assert_remote_holds(self, storage: Storage, second: Storage, data: bytes) -> None:
        # a second machine's download is verified against the remote manifest: bytes and
        # manifest agree, and both are the new version
        second.download("run_1")
        assert second.path("run_1/run.json").read_bytes() == data
        assert read_tree(second.path("run_1")) == {**RUN_TREE, "run.json": data}
        assert storage.upload("run_1").transferred == [], "once sent, an unchanged re-sync sends nothing"

    def test_a_same_size_edit_is_sent(self, storage: Storage, second: Storage) -> None:
        path, old = self._edited_in_place(storage)
        path.write_bytes(self.SAME_SIZE_EDIT)
        # a newer mtime, whatever the filesystem's timestamp granularity
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 2_000_000_000))
        report = storage.upload("run_1")
        assert report.transferred == ["run.json"], "a same-size edit with a new mtime must be sent"
        self._assert_remote_holds(storage, second, self.SAME_SIZE_EDIT)

    def test_checksum_mode_sends_a_same_size_edit_with_the_old_mtime_restored(
        self, storage: Storage, second: Storage
    ) -> None:
        path, old = self._edited_in_place(storage)
        path.write_bytes(self.SAME_SIZE_EDIT)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
        with engine.checksum_mode():
            report = storage.upload("run_1")
        assert report.transferred == ["run.json"], "checksum mode must see an edit size and mtime hide"
        self._assert_remote_holds(storage, second, self.SAME_SIZE_EDIT)

    def test_checksum_mode_sends_a_file_replaced_by_one_of_same_size_and_mtime(
        self, storage: Storage, second: Storage
    ) -> None:
        path, old = self._edited_in_place(storage)
        replacement = path.with_name("replacement.tmp")
        replacement.write_bytes(self.SAME_SIZE_EDIT)
        os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(replacement, path)
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
        with engine.checksum_mode():
            report = storage.upload("run_1")
        assert report.transferred == ["run.json"], "checksum mode must see a replaced file"
        self._assert_remote_holds(storage, second, self.SAME_SIZE_EDIT)

    def test_two_pushes_to_one_path_at_once_leave_one_whole_version(
        self, remote: Remote, storage: Storage, second: Storage, tmp_path: Path
    ) -> None:
        """Two machines push different contents (same names and sizes) to one path at once; the
        first is held after its uploads, before its manifest, while the second runs."""
        from phd_flow.log import logger

        first_tree = {**RUN_TREE, "run.json": b'{"status": "first!!!!"}\n'}
        second_tree = {
            rel: data.upper() if rel != "run.json" else self.SAME_SIZE_EDIT for rel, data in RUN_TREE.items()
        }
        gated = GatedRemote(remote)
        first = storage_for(gated, tmp_path / "first")
        write_tree(first.path("shared/data"), first_tree)
        write_tree(second.path("shared/data"), second_tree)
        errors: list[BaseException] = []

        def push(machine: Storage) -> None:
            try:
                machine.upload("shared/data")
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        def on_log(message: object) -> None:
            if "waiting for it to finish" in str(message):
                gated.gate.set()

        held = threading.Thread(target=push, args=(first,))
        held.start()
        until(lambda: gated.blocked.is_set() or not held.is_alive(), "the first push to finish its uploads")
        sink = logger.add(on_log, level="INFO")
        try:
            push(second)  # returns after its manifest, or waits for its turn (and opens the gate)
        finally:
            gated.gate.set()
            held.join()
            logger.remove(sink)
        assert not errors, errors
        third = storage_for(remote, tmp_path / "third")
        third.download("shared/data")  # verified against the remote manifest: raises on a mix
        assert read_tree(third.path("shared/data")) in (first_tree, second_tree)
        assert storage.remote_ls("shared/data") == sorted(f"shared/data/{rel}" for rel in RUN_TREE)

    def test_large_file_above_multipart_threshold(self, storage: Storage, second: Storage) -> None:
        data = random.Random(0).randbytes(self.large_file_size)
        write_tree(storage.path("big"), {"large.bin": data, "small.txt": b"s"})
        assert sorted(storage.upload("big").transferred) == ["large.bin", "small.txt"]
        remote = storage.remote
        assert remote is not None
        stat = remote.stat("big/large.bin")
        assert stat is not None and stat.size == len(data)
        second.download("big")
        assert second.path("big/large.bin").read_bytes() == data

    def test_download_a_subpath_and_open_fetches_on_read(self, storage: Storage, second: Storage) -> None:
        write_tree(storage.path("run_1"), RUN_TREE)
        storage.upload("run_1")
        second.download("run_1/nested/a/b/c/deep.txt")
        assert second.path("run_1/nested/a/b/c/deep.txt").read_bytes() == b"deep\n"
        assert not second.path("run_1/run.json").exists()
        second.download("run_1/données")
        assert read_tree(second.path("run_1/données")) == {"résumé ✓.txt": RUN_TREE["données/résumé ✓.txt"]}
        with second.open("run_1/results.pickle", "rb") as f:
            assert f.read() == RUN_TREE["results.pickle"]

    def test_exists_and_remove(self, storage: Storage) -> None:
        write_tree(storage.path("run_1"), {"a.txt": b"a", "sub/b.txt": b"b"})
        write_tree(storage.path("run_2"), {"c.txt": b"c"})
        storage.upload("run_1")
        storage.upload("run_2")
        storage.remove("run_1")  # local only, by default
        assert not storage.path("run_1").exists()
        assert storage.exists("run_1") and storage.exists("run_1/sub/b.txt")
        assert not storage.exists("run_1/nope.txt") and not storage.exists("run_3")
        storage.remove("run_1", local=True, remote=True)
        assert not storage.exists("run_1") and storage.remote_ls("run_1") == []
        storage.remove("run_2/c.txt", local=False, remote=True)  # one remote file
        assert storage.path("run_2/c.txt").is_file()
        assert storage.remote_ls("run_2") == []

    def test_upload_restores_files_removed_from_the_remote(self, storage: Storage) -> None:
        write_tree(storage.path("datasets/run_1"), {"a.txt": b"a", "sub/b.txt": b"b", "c.txt": b"c"})
        storage.upload("datasets/run_1")
        storage.remove("datasets/run_1/sub/b.txt", local=False, remote=True)
        storage.remove("datasets/run_1/c.txt", local=False, remote=True)
        assert storage.remote_ls("datasets/run_1") == ["datasets/run_1/a.txt"]
        report = storage.upload("datasets/run_1")
        assert sorted(report.transferred) == ["c.txt", "sub/b.txt"]
        assert storage.remote_ls("datasets") == [f"datasets/run_1/{n}" for n in ["a.txt", "c.txt", "sub/b.txt"]]

    def test_download_of_a_missing_run_is_a_clear_error(self, second: Storage) -> None:
        with pytest.raises(StorageNotFoundError):
            second.download("never_uploaded")
        assert not second.exists("never_uploaded")

    # --- refusals -----------------------------------------------------------------------------

    def test_wrong_credentials_name_the_fix_and_hide_the_secret(
        self, bad_credentials_remote: Remote, tmp_path: Path
    ) -> None:
        for attempt in (
            lambda: bad_credentials_remote.write_bytes("x.txt", b"1"),
            lambda: list(bad_credentials_remote.list("")),
        ):
            with pytest.raises(StorageAuthError) as info:
                attempt()
            message = str(info.value)
            if self.credentials_hint:
                assert any(hint in message for hint in self.credentials_hint), message
            if self.bad_secret:
                assert self.bad_secret not in message
        storage = storage_for(bad_credentials_remote, tmp_path / "m")
        write_tree(storage.path("run_1"), {"a.txt": b"a"})
        with pytest.raises(StorageAuthError):
            storage.upload("run_1")
        assert storage.path("run_1/a.txt").read_bytes() == b"a", "local files must survive"

    def test_refused_names_raise_a_user_error(self, remote: Remote, tmp_path: Path) -> None:
        source = tmp_path / "f.txt"
        source.write_bytes(b"x")
        for key in self.refused_keys:
            with pytest.raises(UserError) as info:
                remote.put(source, key)
            assert str(info.value).strip()
