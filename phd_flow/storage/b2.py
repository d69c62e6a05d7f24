"""The ``b2`` backend: Backblaze B2 through b2sdk's stable v2 API.

Config (``config/default.toml``)::

    [storage]
    backend = "b2"
    bucket = "my-bucket"
    prefix = "my_project"          # or: uri = "b2://my-bucket/my_project"

Credentials come from ``B2_APPLICATION_KEY_ID`` / ``B2_APPLICATION_KEY`` (the names the b2
CLI uses), else from ``[storage] key_id`` / ``key`` (the seed's flat ``b2_key_id`` /
``b2_key``). They are never printed, logged or written anywhere.

B2 keeps every version of a file: :meth:`B2Remote.delete` removes all of them. Files of more
than one part size are uploaded as multi-part "large files" by b2sdk, which also checks SHA-1
on upload and (for simple files) on download. A file of
:data:`~phd_flow.storage.progress.MIN_BYTES` or more shows a byte-level progress bar on a
terminal (b2sdk's progress listener). b2sdk is imported only when this module is.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from b2sdk.v2 import AbstractProgressListener, B2Api, InMemoryAccountInfo
from b2sdk.v2 import exception as b2_exc

from phd_flow.errors import (
    InvalidKeyError,
    StorageAuthError,
    StorageConfigError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
)
from phd_flow.storage import progress
from phd_flow.storage.base import Remote, RemoteFile

if TYPE_CHECKING:
    from phd_flow.config import Config

ENV_KEY_ID = "B2_APPLICATION_KEY_ID"
ENV_KEY = "B2_APPLICATION_KEY"
_CREDENTIALS_HINT = (
    f"Set the environment variables {ENV_KEY_ID} and {ENV_KEY} (preferred), or [storage] "
    "key_id and key in the config (the seed's b2_key_id / b2_key)."
)
_MAX_NAME_BYTES = 1000  # b2sdk's client-side limit (B2 itself allows 1024)
_MAX_SEGMENT_BYTES = 250


class B2Remote(Remote):
    """Mirror runs into the B2 bucket ``bucket`` below ``prefix``.

    ``api`` is a ``b2sdk.v2.B2Api``; pass one that is already authorized (e.g. on b2sdk's
    ``RawSimulator`` in tests), or give ``credentials=(key_id, key)`` and the account is
    authorized on first use.
    """

    def __init__(
        self,
        api: B2Api,
        bucket: str,
        prefix: str = "",
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.api = api
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self._credentials = credentials
        self._secrets = [s for s in credentials or () if s]
        self._bucket: Any = None
        self._unreachable: b2_exc.B2Error | None = None
        self._lock = threading.Lock()
        _quiet_b2sdk()

    @classmethod
    def from_config(cls, config: Config) -> B2Remote:
        storage = config.storage
        bucket, prefix = storage.bucket, storage.prefix
        if storage.uri:
            bucket, _, prefix = storage.uri.removeprefix("b2://").partition("/")
        if not bucket:
            raise StorageConfigError(
                'The b2 storage backend needs a bucket: set [storage] bucket = "my-bucket" '
                '(or uri = "b2://my-bucket/prefix") in the config.'
            )
        key_id = os.environ.get(ENV_KEY_ID) or storage.key_id
        key = os.environ.get(ENV_KEY) or storage.key
        if not key_id or not key:
            missing = ENV_KEY_ID if not key_id else ENV_KEY
            raise StorageAuthError(f"No B2 credentials for bucket {bucket!r} ({missing} is unset). {_CREDENTIALS_HINT}")
        return cls(B2Api(InMemoryAccountInfo()), bucket, prefix, credentials=(key_id, key))

    def describe(self) -> str:
        return f"b2://{self.bucket_name}/{self.prefix}" if self.prefix else f"b2://{self.bucket_name}"

    def __repr__(self) -> str:
        return f"B2Remote({self.describe()!r})"

    # --- names --------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (key or self.prefix)

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def _checked_name(self, key: str) -> str:
        name = self._name(key)
        problem = b2_name_problem(name)
        if problem:
            raise InvalidKeyError(
                f"B2 refuses the file name {name!r} in bucket {self.bucket_name!r}: {problem}. "
                "Rename the file (or shorten [storage] prefix)."
            )
        return name

    # --- operations ---------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        folder = self._name(prefix)
        with self._translate(folder):
            for version, _folder in self._bucket_handle().ls(folder, recursive=True):
                yield RemoteFile(self._key(version.file_name), int(version.size))

    def stat(self, key: str) -> RemoteFile | None:
        if not key or b2_name_problem(self._name(key)):
            return None
        try:
            with self._translate(self._name(key)):
                info = self._bucket_handle().get_file_info_by_name(self._name(key))
        except StorageNotFoundError:
            return None
        return RemoteFile(key, int(info.size))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        folder = self._name(prefix)
        with self._translate(folder):
            listing = self._bucket_handle().ls(folder, recursive=False)
            return sorted(sub.rstrip("/").rsplit("/", 1)[-1] for _version, sub in listing if sub)

    def put(self, local: Path, key: str) -> None:
        name = self._checked_name(key)
        with self._translate(name), progress.ByteProgress(f"↑ {key}") as bar:
            self._bucket_handle().upload_local_file(str(local), name, progress_listener=_Listener(bar))

    def get(self, key: str, local: Path) -> None:
        name = self._checked_name(key)
        with self._translate(name), progress.ByteProgress(f"↓ {key}") as bar:
            self._bucket_handle().download_file_by_name(name, progress_listener=_Listener(bar)).save_to(str(local))

    def delete(self, keys: builtins.list[str]) -> None:
        bucket = self._bucket_handle()
        for key in keys:
            name = self._name(key)
            if b2_name_problem(name):
                continue  # such a file cannot exist
            with self._translate(name):
                for version in builtins.list(bucket.list_file_versions(name)):
                    with contextlib.suppress(b2_exc.FileNotPresent):
                        bucket.delete_file_version(version.id_, version.file_name)

    # --- plumbing -----------------------------------------------------------------------------

    def _bucket_handle(self) -> Any:
        """The b2sdk Bucket, authorizing the account and looking the bucket up once."""
        if self._bucket is None:
            with self._lock, self._translate(self.prefix):
                if self._unreachable is not None:
                    # b2sdk already retried with backoff; an offline node must not wait again
                    # for every file (sync retries later, from the run directory).
                    raise self._unreachable
                if self._bucket is None:
                    try:
                        if self._credentials is not None:
                            self.api.authorize_account("production", *self._credentials)
                        self._bucket = self.api.get_bucket_by_name(self.bucket_name)
                    except (b2_exc.B2ConnectionError, b2_exc.B2RequestTimeout) as exc:
                        self._unreachable = exc
                        raise
        return self._bucket

    @contextlib.contextmanager
    def _translate(self, where: str) -> Iterator[None]:
        """Turn b2sdk exceptions into phd_flow ones (message scrubbed of secrets)."""
        try:
            yield
        except StorageError:
            raise
        except b2_exc.B2Error as exc:
            raise self._translated(exc, where) from exc
        except ValueError as exc:  # b2sdk's own file-name validation
            raise InvalidKeyError(f"B2 refuses {where!r}: {self._scrub(str(exc))}.") from exc

    def _translated(self, exc: b2_exc.B2Error, where: str) -> StorageError:
        detail = self._scrub(f"{type(exc).__name__}: {exc}")
        bucket = self.bucket_name
        if isinstance(exc, b2_exc.NonExistentBucket):
            return StorageNotFoundError(
                f"The B2 bucket {bucket!r} does not exist or the key cannot see it ({detail}). "
                "Create it, or fix [storage] bucket / uri (or the seed's b2_bucket)."
            )
        if isinstance(exc, b2_exc.FileNotPresent):
            return StorageNotFoundError(f"b2://{bucket}/{where} does not exist.")
        if isinstance(exc, (b2_exc.Unauthorized, b2_exc.AccessDenied, b2_exc.RestrictedBucket)):
            return StorageAuthError(f"B2 refused access to bucket {bucket!r} ({detail}). {_CREDENTIALS_HINT}")
        # MaxRetriesExceeded: b2sdk gave up after retrying only transient upload errors.
        transient = (
            b2_exc.TooManyRequests,
            b2_exc.B2ConnectionError,
            b2_exc.B2RequestTimeout,
            b2_exc.MaxRetriesExceeded,
        )
        if isinstance(exc, transient) or (exc.should_retry_http() or exc.should_retry_upload()):
            return StorageUnavailableError(f"B2 is unavailable for b2://{bucket}/{where} ({detail}).")
        return StorageError(f"B2 failed on b2://{bucket}/{where} ({detail}).")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _quiet_b2sdk() -> None:
    """b2sdk logs "download stats" at INFO for every file; a run's log is the wrong place for
    them (they would also change output.log while it is being synced). Keep WARNING and above,
    unless the user set a level for the "b2sdk" logger themselves."""
    b2_logger = logging.getLogger("b2sdk")
    if b2_logger.level == logging.NOTSET:
        b2_logger.setLevel(logging.WARNING)


def b2_name_problem(name: str) -> str | None:
    """Why B2 would refuse ``name`` as a file name, or None when it is fine."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode"
    if not name:
        return "the name is empty"
    if len(encoded) > _MAX_NAME_BYTES:
        return f"it is {len(encoded)} UTF-8 bytes long, at most {_MAX_NAME_BYTES} are allowed"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character"
    if "\\" in name:
        return "it contains a backslash"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it has a leading, trailing or double '/'"
    longest = max(name.split("/"), key=lambda segment: len(segment.encode("utf-8")))
    if len(longest.encode("utf-8")) > _MAX_SEGMENT_BYTES:
        return f"the path segment {longest[:40]!r}... is over {_MAX_SEGMENT_BYTES} UTF-8 bytes"
    return None


class _Listener(AbstractProgressListener):  # type: ignore[misc]
    """b2sdk's progress listener, feeding a :class:`~phd_flow.storage.progress.ByteProgress`
    (which draws only for a big file on a terminal)."""

    def __init__(self, bar: progress.ByteProgress) -> None:
        super().__init__()
        self._bar = bar

    def set_total_bytes(self, total_byte_count: int) -> None:
        self._bar.set_total_bytes(total_byte_count)

    def bytes_completed(self, byte_count: int) -> None:
        self._bar.bytes_completed(byte_count)
