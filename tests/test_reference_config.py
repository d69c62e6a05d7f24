"""config/default.toml is the reference configuration: it loads to the embedded defaults and
documents every key of the Config dataclasses (a new key without a line there fails here)."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from phd_flow import Config, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REFERENCE = Path(__file__).resolve().parent.parent / "config" / "default.toml"

# Config fields that are not keys of the file: the directory passed to load_config, and the file.
NOT_KEYS = {"project_root", "source"}
# The seed's flat keys: accepted at the top level, not fields of any dataclass.
FLAT_SEED_KEYS = {"b2_bucket", "b2_prefix", "b2_key_id", "b2_key"}
# A commented-out key (`# key = ...`) or table header (`# [section]`): the file's way to show a
# key whose default is unset, since TOML has no null.
_COMMENTED = re.compile(r"^#\s?(?=\[|[A-Za-z_][A-Za-z0-9_]*\s*=)")


def _config_keys(cls: type[Any], prefix: str = "") -> set[str]:
    """Dotted keys of a config dataclass; ``stages`` (a dict of rules) becomes ``stages.*``."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not prefix and field.name in NOT_KEYS:
            continue
        hint = hints[field.name]
        dotted = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hint):
            keys |= _config_keys(typing.cast(type, hint), f"{dotted}.")
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            keys |= _config_keys(typing.get_args(hint)[1], f"{dotted}.*.")
        else:
            keys.add(dotted)
    return keys


def _file_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        if prefix == "stages.":
            dotted = "stages.*"
        if isinstance(value, dict) and value:
            keys |= _file_keys(value, f"{dotted}.")
        else:
            keys.add(dotted)
    return keys


def _uncommented() -> str:
    return "\n".join(_COMMENTED.sub("", line) for line in REFERENCE.read_text().splitlines()) + "\n"


def test_reference_config_equals_the_embedded_defaults(tmp_path: Path) -> None:
    defaults = load_config(tmp_path)  # no config/default.toml there: the embedded defaults
    assert defaults.source is None
    loaded = load_config(tmp_path, REFERENCE)
    assert loaded.source == REFERENCE
    for field in dataclasses.fields(Config):
        if field.name == "source":
            continue
        assert getattr(loaded, field.name) == getattr(defaults, field.name), field.name
    assert dataclasses.replace(loaded, source=None) == defaults


def test_every_config_key_is_documented_in_the_reference() -> None:
    documented = _file_keys(tomllib.loads(_uncommented()))
    expected = _config_keys(Config) | FLAT_SEED_KEYS
    missing = expected - documented
    assert not missing, f"keys missing from {REFERENCE}: {sorted(missing)}"
    unknown = documented - expected
    assert not unknown, f"keys in {REFERENCE} that Config does not have: {sorted(unknown)}"


def test_every_commented_example_is_a_valid_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommenting every line of the reference gives a config phd_flow accepts."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "uncommented.toml"
    path.write_text(_uncommented())
    path.chmod(0o600)  # it holds (fake) keys: no "readable by others" warning
    config = load_config(tmp_path, path)
    assert config.storage.uri == "s3://my-bucket/my_project"
    assert config.stages["load_data"].load_from == "latest"
    assert config.executor.slurm.partition == "gpu"
