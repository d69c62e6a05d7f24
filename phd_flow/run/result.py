"""A run's result: pickled with its sha256 (and, with a signing key, its HMAC) recorded in run.json,
and the one verified loader.

Unpickling runs code, so a result is unpickled only when it is authentic (:mod:`phd_flow.run.signing`):
made on this machine (the ledger records its sha256), else signed with the configured signing
key, else (no key configured) when the caller passed ``trust_remote``. The sha256 is checked in
every case; a result without one is never unpickled.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow._io import atomic_write_bytes
from phd_flow.errors import CorruptRunError, PhdFlowError, UntrustedResultError, UserError
from phd_flow.log import logger
from phd_flow.run import signing
from phd_flow.run.record import COMPLETED, FAILED, RESULT_FILE, RUN_FILE, RunRecord

if TYPE_CHECKING:
    from phd_flow.config import Config


def save_result(record: RunRecord, result: Any, node_name: str, config: Config) -> tuple[str, Any]:
    """Pickle ``result`` into the run directory, record its sha256 (and HMAC) and remember it in
    this machine's ledger; (status, error)."""
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
    sha256 = hashlib.sha256(data).hexdigest()
    info: dict[str, Any] = {"file": RESULT_FILE, "sha256": sha256, "type": type(result).__name__}
    secret = signing.signing_key(config)
    if secret is not None:
        info["hmac"] = signing.result_mac(secret, record.key, sha256)
    signing.remember_result(config.local_path, record.key, sha256)
    record.update(result=info)
    return COMPLETED, None


def result_path(run_dir: Path, info: dict[str, Any]) -> Path:
    """Where the result of a run with run.json ``result`` section ``info`` lives."""
    return run_dir / Path(str(info.get("file") or RESULT_FILE)).name


def check_authentic(
    config: Config, info: dict[str, Any], key: str, trust_remote: bool = False, local: bool = True
) -> str:
    """The recorded sha256 of run ``key``'s result, once the record is known to be authentic.

    ``local``: the run's record is in ``local_path``; only then does the ledger count (a result
    that exists only remotely needs a signature or ``trust_remote``, whoever made it).

    Raises :class:`CorruptRunError` when run.json records no sha256 and
    :class:`UntrustedResultError` (exit 2) when the result was not made here, is not validly
    signed (a key is configured), or is not trusted (no key configured, no ``trust_remote``).
    Reads no file but the ledger, so it can run before a download.
    """
    expected = info.get("sha256")
    if not isinstance(expected, str) or not expected:
        raise CorruptRunError(
            f"{RUN_FILE} of run {key} records no sha256 for its result: not unpickling it (an "
            "unverifiable pickle can run any code). Run the node again to get a verifiable result."
        )
    if local and signing.made_here(config.local_path, key, expected):
        return expected
    secret = signing.signing_key(config)
    if secret is not None:
        if signing.valid(signing.result_mac(secret, key, expected), info.get("hmac")):
            return expected
        state = "has a signature that does not match" if info.get("hmac") else "is not signed"
        raise UntrustedResultError(
            f"The result of run {key} {_origin(local)} and {state} the signing key "
            f"configured here ({signing.key_source(config)}): not unpickling it, a forged pickle "
            "can run code. The machine that made the run must use the same key (set "
            f"{signing.ENV_KEY} to the lab's secret on both machines); a run made before the key "
            "was set can only be loaded with the key unset and --trust-remote."
        )
    if trust_remote:
        return expected
    raise UntrustedResultError(
        f"The result of run {key} {_origin(local)} and no signing key is configured, "
        "so nothing proves who wrote it: not unpickling it (a pickle from the bucket can run any "
        f"code). Set {signing.ENV_KEY} to the lab's secret on both machines (runs made with it "
        "are signed), or pass --trust-remote (trust_remote=True) if you trust everyone who can "
        "write to the storage."
    )


def _origin(local: bool) -> str:
    return "was not made on this machine" if local else "exists only in the remote storage"


def load_verified(
    config: Config, run_dir: Path, info: dict[str, Any], key: str, trust_remote: bool = False, local: bool = True
) -> Any:
    """Unpickle the result in ``run_dir`` once it is authentic (:func:`check_authentic`) and its
    bytes match the recorded sha256.

    Raises :class:`CorruptRunError` when the bytes do not match, :class:`UserError` when the
    result's class cannot be imported here.
    """
    expected = check_authentic(config, info, key, trust_remote, local)
    path = result_path(run_dir, info)
    data = path.read_bytes()  # hashed and unpickled from the same bytes: no swap in between
    if hashlib.sha256(data).hexdigest() != expected:
        raise CorruptRunError(
            f"{path} does not match the sha256 in run.json of {key}; not unpickling it. "
            f"Delete the file and load again to download it anew."
        )
    try:
        return pickle.loads(data)
    except (ImportError, AttributeError) as exc:
        raise UserError(
            f"The result of {key} ({info.get('type', '?')}) cannot be unpickled here: "
            f"{exc}. Its class must be importable: run this from the project's root, or "
            "install the project's package."
        ) from None
