"""The reproducibility snapshot of a run (``reproducible.json``).

Records git commit, branch, dirty flag and diff, installed packages, Python, platform, CPU/GPU
and hostname. It records no environment variables at all, so no secret can leak through it.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

MAX_DIFF_BYTES = 2_000_000


def git_info(cwd: Path) -> dict[str, Any]:
    """Commit, branch, dirty flag and diff of the git repository at ``cwd`` (empty if none)."""
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return {}
    status = _git(cwd, "status", "--porcelain") or ""
    diff = _git(cwd, "diff", "HEAD") or ""
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
    """Installed distributions and their versions."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name", None)  # type: ignore[attr-defined]
        if name:
            found[name] = dist.version
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


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


def snapshot(project_root: Path, git: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything above, as one JSON-serialisable dict."""
    return {
        "git": git if git is not None else git_info(project_root),
        "python": {"version": sys.version, "executable": sys.executable, "argv": sys.argv},
        "cwd": os.getcwd(),
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "hostname": socket.gethostname(),
        "hardware": hardware(),
        "packages": packages(),
    }
