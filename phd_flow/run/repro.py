"""The reproducibility snapshot of a run (``reproducible.json``).

Records git commit, branch, dirty flag and diff, installed packages, Python, platform, CPU/GPU
and hostname. It records no environment variables, and the git diff (and argv) is scrubbed: every
value of a secret config key or credential environment variable is replaced by ``***``, and so is
the value of every ``key = ...`` line of a secret key name in a ``.toml`` file's hunks (an
uncommitted config with B2 keys in it). Hunks are redacted, never dropped.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.config import SECRET_KEYS

if TYPE_CHECKING:
    from phd_flow.config import Config

MAX_DIFF_BYTES = 2_000_000
REDACTED = "***"
#: Environment variables that hold credentials: their values never reach reproducible.json.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "B2_APPLICATION_KEY",
    "B2_APPLICATION_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PHD_FLOW_SIGNING_KEY",
)
_MIN_SECRET = 4  # shorter values would redact ordinary text; no real credential is this short
_TOML_ASSIGNMENT = re.compile(
    r"^(?P<head>[-+ ]\s*[\"']?(?P<name>[A-Za-z0-9_.\-]+)[\"']?\s*=\s*)(?P<value>.*?)(?P<end>\r?\n?)$"
)


def secret_values(config: Config) -> list[str]:
    """The secrets this process knows (config keys, credential env vars), longest first."""
    values = [config.storage.key_id, config.storage.key, config.security.signing_key]
    values += [os.environ.get(name) for name in SECRET_ENV_VARS]
    return sorted({v for v in values if v and len(v) >= _MIN_SECRET}, key=len, reverse=True)


def _secret_name(name: str) -> bool:
    name = name.lower().rsplit(".", 1)[-1]
    return name in SECRET_KEYS or any(word in name for word in ("password", "token", "secret"))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every value in ``secrets`` replaced by ``***``."""
    for value in secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_diff(diff: str, secrets: Sequence[str]) -> str:
    """A ``git diff`` with secret values replaced by ``***``, and with the value of every
    ``name = ...`` line of a secret key name (``key``, ``b2_key``, ``signing_key`` ...) in a
    ``.toml`` file's hunks replaced too (the value may be one this process does not know)."""
    lines = []
    in_toml = False
    for line in redact(diff, secrets).splitlines(keepends=True):
        if line.startswith("diff --git "):
            in_toml = line.rstrip().endswith(".toml")
        elif in_toml and not line.startswith(("+++ ", "--- ")):
            match = _TOML_ASSIGNMENT.match(line)
            if match and _secret_name(match.group("name")):
                line = f'{match.group("head")}"{REDACTED}"{match.group("end")}'
        lines.append(line)
    return "".join(lines)


def git_info(cwd: Path, secrets: Sequence[str] = ()) -> dict[str, Any]:
    """Commit, branch, dirty flag and diff (secrets redacted, see :func:`redact_diff`) of the git
    repository at ``cwd`` (empty if none)."""
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return {}
    status = _git(cwd, "status", "--porcelain") or ""
    diff = redact_diff(_git(cwd, "diff", "HEAD") or "", secrets)
    if len(diff) > MAX_DIFF_BYTES:
        diff = diff[:MAX_DIFF_BYTES] + "\n[diff truncated by phd_flow]\n"
    return {
        "commit": commit,
        "branch": _git(cwd, "rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(status.strip()),
        "status": status,
        "diff": diff,
    }


def _git(cwd: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def packages() -> dict[str, str]:
    """Installed distributions and their versions (scanned once per state of ``sys.path``; a
    sweep's warm driver asks for every point)."""
    state = tuple((entry, _mtime(entry)) for entry in sys.path)
    if _PACKAGES.get("state") != state:
        _PACKAGES.update(state=state, found=_scan_packages())
    return dict(_PACKAGES["found"])


#: The last scan of :func:`packages` and the ``sys.path`` state (entries and mtimes) it saw.
_PACKAGES: dict[str, Any] = {}


def _mtime(entry: str) -> int:
    """A ``sys.path`` directory's mtime: installing or removing a distribution changes it."""
    try:
        return os.stat(entry or ".").st_mtime_ns
    except OSError:
        return 0


def _scan_packages() -> dict[str, str]:
    """Name and version of every distribution on ``sys.path``; where two have the same name
    (compared as pip compares them: case, ``-``, ``_`` and ``.`` aside), the one that imports
    (the first on ``sys.path``). Only the metadata's header lines are read:
    ``Distribution.metadata`` parses each whole file with the email parser, twice with
    ``.version``, which took 0.1-0.4 s of every run for ~300 distributions (measured)."""
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name, version = _name_and_version(dist)
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), (name, version))
    return dict(sorted(found.values(), key=lambda item: item[0].lower()))


def _name_and_version(dist: metadata.Distribution) -> tuple[str, str]:
    """The ``Name`` and ``Version`` headers (field names in any case, as the email parser reads
    them), from the file ``Distribution.metadata`` reads."""
    try:
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or dist.read_text("") or ""
    except (OSError, UnicodeDecodeError):
        return "", ""
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:  # the headers end at the first empty line
            break
        field, colon, value = line.partition(":")
        if colon and field.lower() in ("name", "version"):
            fields.setdefault(field.lower(), value.strip())
    return fields.get("name", ""), fields.get("version", "")


def hardware() -> dict[str, Any]:
    """CPU count, memory and GPUs (via nvidia-smi when present)."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            info["gpus"] = []
    return info


def snapshot(project_root: Path, git: dict[str, Any] | None = None, secrets: Sequence[str] = ()) -> dict[str, Any]:
    """Everything above, as one JSON-serialisable dict (``secrets`` redacted from git and argv)."""
    argv = [redact(arg, secrets) for arg in sys.argv]
    return {
        "git": git if git is not None else git_info(project_root, secrets),
        "python": {"version": sys.version, "executable": sys.executable, "argv": argv},
        "cwd": os.getcwd(),
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "hostname": socket.gethostname(),
        "hardware": hardware(),
        "packages": packages(),
    }
