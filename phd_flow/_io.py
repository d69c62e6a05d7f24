"""Small file helpers: atomic writes, hashing."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
#: File names phd_flow keeps for itself (temp files of atomic writes, lock files, sync
#: manifests): the sync engine never uploads them.
PRIVATE_PREFIX = ".phd_flow-"


@functools.cache
def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes, make_parents: bool = True, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    The temp file's name starts with :data:`PRIVATE_PREFIX`, so a sync running meanwhile skips
    it. ``make_parents=False``: a missing directory raises ``FileNotFoundError`` (a run's record
    never recreates a run directory deleted behind its back).

    Either way a reader sees the old file or the new one whole, and a killed process loses
    nothing (the kernel has the data). ``durable`` (the default) also calls ``fsync`` on the data
    before the rename, so the new file survives a power cut or a crashed machine too; a run
    asks for it only where a state must outlive the machine (its first record, its final status,
    its result): ~3 ms each on an idle disk, far more on a busy or network filesystem.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{PRIVATE_PREFIX}{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any, make_parents: bool = True, durable: bool = True) -> None:
    """Atomically write ``data`` as indented JSON (``durable``: see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode(), make_parents, durable)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    with open(path, "rb") as handle:
        return json.load(handle)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (empty when absent); a torn line after a crash is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries
