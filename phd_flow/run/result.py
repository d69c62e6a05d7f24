"""A run's result: pickled with its sha256 recorded in run.json, and the one verified loader."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from phd_flow._io import atomic_write_bytes, sha256_file
from phd_flow.errors import CorruptRunError, PhdFlowError, UserError
from phd_flow.log import logger
from phd_flow.run.record import COMPLETED, FAILED, RESULT_FILE, RUN_FILE, RunRecord


def save_result(record: RunRecord, result: Any, node_name: str) -> tuple[str, Any]:
    """Pickle ``result`` into the run directory and record its sha256; (status, error)."""
    try:
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        logger.error(
            f"The result of {node_name} ({type(result).__name__}) cannot be pickled: "
            f"{type(exc).__name__}: {exc}. Return plain data (dataclasses, dicts, arrays)."
        )
        return FAILED, PhdFlowError(f"result cannot be pickled ({type(exc).__name__}: {exc})")
    path = record.run_dir / RESULT_FILE
    atomic_write_bytes(path, data)
    record.update(result={"file": RESULT_FILE, "sha256": sha256_file(path), "type": type(result).__name__})
    return COMPLETED, None


def result_path(run_dir: Path, info: dict[str, Any]) -> Path:
    """Where the result of a run with run.json ``result`` section ``info`` lives."""
    return run_dir / Path(str(info.get("file") or RESULT_FILE)).name


def load_verified(run_dir: Path, info: dict[str, Any], key: str) -> Any:
    """Unpickle the result in ``run_dir`` after checking the sha256 its run.json recorded.

    Raises :class:`CorruptRunError` when the bytes do not match, :class:`UserError` when the
    result's class cannot be imported here.
    """
    path = result_path(run_dir, info)
    expected = info.get("sha256")
    if not expected:
        logger.warning(f"{RUN_FILE} of {key} records no sha256: {path} is loaded unverified.")
    elif sha256_file(path) != expected:
        raise CorruptRunError(
            f"{path} does not match the sha256 in run.json of {key}; not unpickling it. "
            f"Delete the file and load again to download it anew."
        )
    with open(path, "rb") as handle:
        try:
            return pickle.load(handle)
        except (ImportError, AttributeError) as exc:
            raise UserError(
                f"The result of {key} ({info.get('type', '?')}) cannot be unpickled here: "
                f"{exc}. Its class must be importable: run this from the project's root, or "
                "install the project's package."
            ) from None
