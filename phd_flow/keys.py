"""Run keys: unique, time-sortable, safe on every filesystem and object store, path-like.

>>> key = RunKey("FitOLS_2026-11-23T10-00-00.000000Z_ab12cd34")
>>> "datasets" / key / "datasets.pickle"
PurePosixPath('datasets/FitOLS_2026-11-23T10-00-00.000000Z_ab12cd34/datasets.pickle')
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Union

from phd_flow.errors import InvalidKeyError

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_TIME_FORMAT = "%Y-%m-%dT%H-%M-%S.%fZ"

KeyLike = Union[str, "RunKey", PurePosixPath]


class RunKey(str):
    """A run key. A ``str`` that also joins like a path: ``"datasets" / key / "x"``."""

    __slots__ = ()

    def __truediv__(self, other: str | PurePosixPath) -> PurePosixPath:
        return PurePosixPath(self) / other

    def __rtruediv__(self, other: str | PurePosixPath) -> PurePosixPath:
        return PurePosixPath(other) / str(self)

    @property
    def node(self) -> str:
        """The node name the key starts with."""
        return self.split("_", 1)[0]

    @property
    def created(self) -> datetime | None:
        """The UTC creation time encoded in the key, if it has one."""
        parts = self.split("_")
        for part in parts[1:]:
            try:
                return datetime.strptime(part, _TIME_FORMAT).replace(tzinfo=timezone.utc)
            except ValueError:
                continue
        return None


def new_key(node_name: str, now: datetime | None = None) -> RunKey:
    """Make ``<NodeName>_<UTC time to the microsecond>_<8 random chars>``.

    The random suffix has 41 bits, so hundreds of processes started in the same microsecond
    on different machines still get distinct keys.
    """
    now = now or datetime.now(timezone.utc)
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return RunKey(f"{node_name}_{now.strftime(_TIME_FORMAT)}_{suffix}")


def normalize(key: KeyLike) -> str:
    """Validate a relative storage key and return it in POSIX form.

    Raises :class:`InvalidKeyError` for absolute paths, ``..``, backslashes, empty segments,
    control characters and names object stores refuse, so nothing outside ``local_path`` can
    ever be written or deleted.
    """
    text = str(key)
    if not text or text in {".", "/"}:
        raise InvalidKeyError("An empty storage key was given; pass a run key or a path inside it.")
    problem = _problem(text)
    if problem:
        raise InvalidKeyError(
            f"Storage key {text!r} is not allowed: {problem}. Keys are relative paths made of "
            "letters, digits and . _ - (e.g. 'datasets/<run key>/data.pickle')."
        )
    return text.strip("/") if text.endswith("/") else text


def _problem(text: str) -> str:
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return "it is an absolute path"
    if "\\" in text:
        return "it contains a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "it contains a control character"
    if len(text.encode()) > 900:
        return "it is longer than 900 bytes"
    for segment in text.rstrip("/").split("/"):
        if segment in {"", ".", ".."}:
            return f"it contains the path segment {segment!r}"
        if len(segment.encode()) > 250:
            return "a path segment is longer than 250 bytes"
    return ""


def remote_relpath(name: str) -> str:
    """Check a name that comes from a remote (a listing, a manifest, a record) before it
    touches the local tree; returns it unchanged.

    The rules of :func:`normalize`, and stricter: no leading or trailing ``/``, no empty, ``.``
    or ``..`` segment, no drive letter (``C:``), no backslash, no NUL or other control
    character anywhere. Raises :class:`InvalidKeyError` naming the problem.
    """
    problem = "it is empty" if not name else _problem(name)
    if not problem and name.endswith("/"):
        problem = "it ends with '/'"
    if not problem and any(0x80 <= ord(c) <= 0x9F for c in name):
        problem = "it contains a control character"
    if not problem and any(len(s) >= 2 and s[1] == ":" and s[0].isalpha() for s in name.split("/")):
        problem = "it contains a drive letter"
    if problem:
        raise InvalidKeyError(f"Remote name {name!r} is not allowed: {problem}.")
    return name


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel`` for a name checked by :func:`remote_relpath`, refused (InvalidKeyError)
    when an existing component below ``root`` is a symlink or the resolved path leaves ``root``."""
    path = root
    for segment in remote_relpath(rel).split("/"):
        path = path / segment
        if path.is_symlink():
            raise InvalidKeyError(f"{path} is a symlink: nothing is written through it.")
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise InvalidKeyError(f"Remote name {rel!r} resolves outside {root}.")
    return path
