"""The storage contract: a :class:`Remote` moves files and bytes, nothing else.

Hashing, manifests, retries, parallelism and run semantics live one layer up
(:mod:`phd_flow.storage.sync`, :class:`phd_flow.storage.Storage`) and are shared by every
backend. A backend translates these few methods to one SDK and translates the SDK's errors to
:mod:`phd_flow.errors` (keeping the original as ``__cause__``):

* :class:`~phd_flow.errors.StorageUnavailableError` for transient faults (retried),
* :class:`~phd_flow.errors.StorageAuthError` / :class:`~phd_flow.errors.StorageConfigError`
  for credentials or configuration (not retried; the message names the key or env var),
* :class:`~phd_flow.errors.StorageNotFoundError` for a missing object or bucket.

Keys are relative POSIX paths below the remote's root (its bucket prefix or directory),
already validated by :func:`phd_flow.keys.normalize`. Names a backend lists are untrusted: the
engine checks each with :func:`phd_flow.keys.remote_relpath` before it touches the local tree.
"""

from __future__ import annotations

import builtins
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phd_flow.errors import StorageNotFoundError

if TYPE_CHECKING:
    from phd_flow.config import Config


@dataclass(frozen=True)
class RemoteFile:
    """One object in the remote: its key (relative to the remote root) and size in bytes."""

    key: str
    size: int


class Remote(ABC):
    """A place run directories are mirrored to. Subclass it to add a backend."""

    #: Transfers the sync engine runs at once for this backend (a backend may lower it).
    max_workers: int = 8

    @classmethod
    @abstractmethod
    def from_config(cls, config: Config) -> Remote:
        """Build the backend from the project config (raise StorageConfigError if incomplete)."""

    @abstractmethod
    def describe(self) -> str:
        """A human-readable location, e.g. ``s3://bucket/prefix``. Never includes secrets."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        """Every object below the directory ``prefix`` (recursively; keys include the prefix).

        ``list("a")`` yields ``a/x`` and ``a/b/y`` but never ``ab/z``. An absent prefix yields
        nothing; ``""`` lists everything.
        """

    @abstractmethod
    def stat(self, key: str) -> RemoteFile | None:
        """The object ``key`` itself (not a directory), or None when it does not exist."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """The names of the immediate "directories" below ``prefix`` (a delimiter listing)."""

    @abstractmethod
    def put(self, local: Path, key: str) -> None:
        """Upload one local file to ``key`` (overwriting)."""

    @abstractmethod
    def get(self, key: str, local: Path) -> None:
        """Download ``key`` into the file ``local`` (its parent exists)."""

    @abstractmethod
    def delete(self, keys: builtins.list[str]) -> None:
        """Delete these objects; missing ones are ignored."""

    def read_bytes(self, key: str) -> bytes | None:
        """The content of a small object, or None when it does not exist."""
        with tempfile.TemporaryDirectory(prefix="phd_flow-") as tmp:
            target = Path(tmp) / "object"
            try:
                self.get(key, target)
            except (FileNotFoundError, StorageNotFoundError):
                return None
            return target.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Upload a small object from memory."""
        with tempfile.TemporaryDirectory(prefix="phd_flow-") as tmp:
            source = Path(tmp) / "object"
            source.write_bytes(data)
            self.put(source, key)

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections (optional)."""
