"""Issue 13 row 2 with a signing key: results and stages signed on one machine are loaded on
another with the same key, and refused with a different one. Two "machines" share a directory
remote; each has its own local_path and its own per-user ledger ($XDG_STATE_HOME)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import phd_flow
from phd_flow.cli.render import clean
from phd_flow.errors import StageError, UntrustedResultError
from phd_flow.log import redact_url
from phd_flow.run.options import RunOptions
from phd_flow.run.repro import redact_diff
from tests.conftest import EXAMPLES, write_config
from tests.nodes import Add, AddArgs
from tests.stage_nodes import Prepare

DATASET = str(EXAMPLES / "data" / "diabetes.csv")


def machine(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, key: str | None, extra: str = ""
) -> phd_flow.Config:
    """Switch to machine ``name``: its project, its ledger, its signing key (or none)."""
    root = tmp_path / name
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state"))
    if key is None:
        monkeypatch.delenv("PHD_FLOW_SIGNING_KEY", raising=False)
    else:
        monkeypatch.setenv("PHD_FLOW_SIGNING_KEY", key)
    shared = tmp_path / "shared"
    write_config(
        root,
        f'local_path = "{root / "data"}"\n[mlflow]\nenabled = false\n'
        f'[storage]\nbackend = "local"\nremote = "{shared}"\n' + extra,
    )
    return phd_flow.load_config(root)


def test_a_signed_result_loads_elsewhere_only_with_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = Add(AddArgs(a=1), config=machine(tmp_path, "a", monkeypatch, "lab-secret"))
    made.run()
    key = str(made.key)
    assert json.loads((made.output_dir / "run.json").read_text())["result"]["hmac"]
    assert "lab-secret" not in "".join(p.read_text(errors="replace") for p in made.output_dir.rglob("*") if p.is_file())

    assert phd_flow.load_result(key, config=machine(tmp_path, "b", monkeypatch, "lab-secret")).total == 3
    with pytest.raises(UntrustedResultError, match="signature that does not match"):
        phd_flow.load_result(key, config=machine(tmp_path, "c", monkeypatch, "other-secret"))
    with pytest.raises(UntrustedResultError, match="--trust-remote"):
        phd_flow.load_result(key, config=machine(tmp_path, "d", monkeypatch, None))
    assert phd_flow.load_result(key, config=machine(tmp_path, "d", monkeypatch, None), trust_remote=True).total == 3


def test_a_result_made_here_loads_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = machine(tmp_path, "a", monkeypatch, None)
    made = Add(AddArgs(a=1), config=config)
    made.run()
    assert "hmac" not in json.loads((made.output_dir / "run.json").read_text())["result"]
    assert phd_flow.load_result(str(made.key), config=config).total == 3


def test_a_signed_stage_loads_elsewhere_only_with_the_same_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = Prepare({"dataset": DATASET}, config=machine(tmp_path, "a", monkeypatch, "lab-secret"))
    made.run()
    assert json.loads((made.output_dir / "run.json").read_text())["stages"]["load_data"]["hmac"]
    load = RunOptions(load={"load_data": str(made.key)})

    loaded = Prepare({"dataset": DATASET}, config=machine(tmp_path, "b", monkeypatch, "lab-secret"), options=load)
    loaded.run()
    assert json.loads((loaded.output_dir / "run.json").read_text())["stages"]["load_data"]["loaded_from"] == made.key
    with pytest.raises(StageError, match=f"{made.key}.*signature that does not match"):
        Prepare({"dataset": DATASET}, config=machine(tmp_path, "c", monkeypatch, "other-secret"), options=load).run()


def test_latest_with_a_key_skips_an_unsigned_newer_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signed = Prepare({"dataset": DATASET}, config=machine(tmp_path, "a", monkeypatch, "lab-secret"))
    signed.run()
    unsigned = Prepare({"dataset": DATASET}, config=machine(tmp_path, "x", monkeypatch, None))
    unsigned.run()
    latest = '[stages.load_data]\nload_from = "latest"\n'
    loaded = Prepare({"dataset": DATASET}, config=machine(tmp_path, "b", monkeypatch, "lab-secret", latest))
    loaded.run()
    assert json.loads((loaded.output_dir / "run.json").read_text())["stages"]["load_data"]["loaded_from"] == signed.key


def test_redaction_helpers() -> None:
    assert (
        redact_url("MLflow at http://user:pa@ss@host:5000/x failed") == "MLflow at http://user:***@host:5000/x failed"
    )
    assert redact_url("http://host/a@b and http://user@host") == "http://host/a@b and http://user@host"
    assert clean("\x1b]0;t\x07\x9b31m\u202e\x7fok\n") == "\\x1b]0;t\\x07\\x9b31m\\u202e\\x7fok\\n"
    diff = (
        "diff --git a/config/default.toml b/config/default.toml\n--- a/config/default.toml\n"
        '+++ b/config/default.toml\n-b2_key = "OLDVALUE"\n+b2_key = "NEWVALUE"\n+bucket = "b"\n'
        "diff --git a/x.py b/x.py\n+token = 'KNOWNSECRET'\n"
    )
    redacted = redact_diff(diff, ["KNOWNSECRET"])
    assert "OLDVALUE" not in redacted and "NEWVALUE" not in redacted and "KNOWNSECRET" not in redacted
    assert '+b2_key = "***"' in redacted and '+bucket = "b"' in redacted
