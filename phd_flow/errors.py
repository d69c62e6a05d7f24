"""The phd_flow exception hierarchy.

Every error a user can fix derives from :class:`UserError`; the CLI prints its message as one
paragraph (no traceback) and exits with code 2. Anything else is a bug and gets a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PhdFlowError(Exception):
    """Root of every exception phd_flow raises on purpose."""


class UserError(PhdFlowError):
    """Bad input a user can fix: the message names the culprit and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """The TOML config (or an environment variable it refers to) is invalid."""


class NodeNotFoundError(UserError):
    """No Node class of that name exists in the package."""


class NodeDefinitionError(UserError):
    """A Node subclass is declared wrongly (e.g. without ``Node[Args, Result]``)."""


class ArgsError(UserError):
    """The arguments given to a node do not fit its Args dataclass."""


class RunNotFoundError(UserError):
    """No run matches a key or key prefix (or the prefix is ambiguous)."""


class CorruptRunError(UserError):
    """A run's record (run.json) or result (results.pickle) cannot be read."""

    #: The run directory's name, when a listing of local_path found it.
    run_name: str | None = None


class UntrustedResultError(UserError):
    """A result from a remote is not known to be authentic (not made here, not validly signed,
    not trusted by the caller), so it is not unpickled."""


class NoResultError(UserError):
    """A run has no result to load (it failed, was killed or is still running)."""


class InvalidKeyError(UserError):
    """A storage key is not a safe relative path (``..``, absolute, forbidden characters)."""


class UnsafeRemoteNameError(UserError):
    """A name listed by the remote storage is not a safe relative path: nothing of that run is written."""


class StageError(UserError):
    """A stage rule or stage load cannot be honoured."""


class StorageError(PhdFlowError):
    """A remote storage operation failed (after retries)."""


class StorageConfigError(StorageError, UserError):
    """The storage is configured wrongly: unknown backend, missing bucket or credentials."""


class StorageAuthError(StorageConfigError):
    """The storage rejected the credentials."""


class StorageNotFoundError(StorageError, UserError):
    """A key, run or bucket does not exist in the remote storage."""


class StorageUnavailableError(StorageError):
    """The storage could not be reached (network down, endpoint wrong, server errors)."""


class ChecksumMismatchError(StorageError):
    """A transferred file does not match its recorded checksum."""


class RunFailedError(PhdFlowError):
    """The node's ``_run`` raised; the original exception is the ``__cause__``."""

    exit_code = 1


class RunKilledError(BaseException):
    """Raised in the main thread when the run receives SIGTERM (scancel, preemption)."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
