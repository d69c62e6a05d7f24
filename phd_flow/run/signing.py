"""Authenticating what comes from a remote: HMAC signatures with a lab secret, and the ledger of
what this machine made.

A sha256 next to a pickle only catches accidents: whoever can replace the pickle in the bucket can
rewrite the checksum too. What is unpickled or loaded as a stage must therefore be *authentic*:

- **made here**: the run's result (or stage) is in this machine's ledger, written by the run
  itself (:func:`remember_result`, :func:`remember_stage`), never by a download. The ledger lives
  outside the synced tree, in ``<local_path>/.phd_flow/produced/`` and in the user's state
  directory (``$XDG_STATE_HOME/phd_flow/produced/``, so a run copied to another project on this
  machine stays "made here"); it records the sha256, so a replaced file does not match it;
- **signed**: run.json carries ``hmac``, an HMAC-SHA256 with the lab's signing key (env
  ``PHD_FLOW_SIGNING_KEY`` or ``[security] signing_key``) over the run key and the sha256.

The key is read here and nowhere else; it is never logged, printed or written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow._io import atomic_write_json
from phd_flow.log import logger

if TYPE_CHECKING:
    from phd_flow.config import Config

ENV_KEY = "PHD_FLOW_SIGNING_KEY"
LEDGER_DIR = Path(".phd_flow") / "produced"
_RESULT = b"phd_flow-result\0"
_STAGE = b"phd_flow-stage\0"


def signing_key(config: Config) -> bytes | None:
    """The lab's signing key: ``$PHD_FLOW_SIGNING_KEY``, else ``[security] signing_key``, else None."""
    secret = os.environ.get(ENV_KEY) or config.security.signing_key
    return secret.encode() if secret else None


def key_source(config: Config) -> str:
    """Where the signing key comes from, for messages (never the key itself)."""
    return f"${ENV_KEY}" if os.environ.get(ENV_KEY) else f"[security] signing_key in {config.source}"


def result_mac(secret: bytes, run_key: str, sha256: str) -> str:
    """HMAC-SHA256 over ``"phd_flow-result\\0" + run key + "\\0" + sha256 of the pickle``."""
    return hmac.new(secret, _RESULT + run_key.encode() + b"\0" + sha256.encode(), hashlib.sha256).hexdigest()


def stage_mac(secret: bytes, run_key: str, stage: str, digest: str) -> str:
    """HMAC-SHA256 over ``"phd_flow-stage\\0" + run key + "\\0" + stage + "\\0" + digest(files)``."""
    message = _STAGE + run_key.encode() + b"\0" + stage.encode() + b"\0" + digest.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def valid(expected: str, given: Any) -> bool:
    """Constant-time comparison of a computed MAC with one read from run.json."""
    return isinstance(given, str) and hmac.compare_digest(expected, given)


# --- the ledger of what this machine made -----------------------------------------------------------


def ledger_dirs(local_path: Path) -> list[Path]:
    """Where this machine's ledger lives: in local_path (outside every run) and per user."""
    folders = [local_path / LEDGER_DIR]
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec: a relative value is ignored
        try:
            state = str(Path.home() / ".local" / "state")
        except RuntimeError:  # no home directory (a container with an arbitrary uid)
            return folders
    return [*folders, Path(state) / "phd_flow" / "produced"]


def _entry_name(run_key: str) -> str:
    return urllib.parse.quote(run_key, safe="") + ".json"


def _read(local_path: Path, run_key: str) -> list[dict[str, Any]]:
    entries = []
    for folder in ledger_dirs(local_path):
        try:
            data = json.loads((folder / _entry_name(run_key)).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            entries.append(data)
    return entries


def _write(local_path: Path, run_key: str, section: str, name: str, value: str) -> None:
    for folder in ledger_dirs(local_path):
        path = folder / _entry_name(run_key)
        try:
            try:
                data = json.loads(path.read_bytes())
            except (FileNotFoundError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            data.setdefault(section, {})[name] = value
            # atomic, not fsynced: an entry lost to a power cut fails closed (the result is then
            # re-verified or recomputed), and the run's final record write is durable anyway
            atomic_write_json(path, data, durable=False)
        except OSError as exc:  # fail closed: the result then needs a signature or --trust-remote
            logger.warning(f"Could not record run {run_key} in the ledger {folder} ({exc}).")


def remember_result(local_path: Path, run_key: str, sha256: str) -> None:
    """Record that this machine made run ``run_key``'s result with this sha256."""
    _write(local_path, run_key, "result", "sha256", sha256)


def remember_stage(local_path: Path, run_key: str, stage: str, digest: str) -> None:
    """Record that this machine made (or verified and recorded) ``stage`` of run ``run_key``."""
    _write(local_path, run_key, "stages", stage, digest)


def _recorded(local_path: Path, run_key: str, section: str, name: str) -> list[Any]:
    sections = [entry.get(section) for entry in _read(local_path, run_key)]
    return [found.get(name) for found in sections if isinstance(found, dict)]


def made_here(local_path: Path, run_key: str, sha256: str) -> bool:
    """True when this machine's ledger records run ``run_key``'s result with this sha256."""
    return any(valid(sha256, value) for value in _recorded(local_path, run_key, "result", "sha256"))


def stage_made_here(local_path: Path, run_key: str, stage: str, digest: str) -> bool:
    """True when this machine's ledger records ``stage`` of run ``run_key`` with this digest."""
    return any(valid(digest, value) for value in _recorded(local_path, run_key, "stages", stage))
