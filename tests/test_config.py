"""Config loading: interpolation, the seed's flat keys, and errors that name file, line and fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phd_flow.config import load_config, parse_config
from phd_flow.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config" / "default.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_project_root_and_env_vars_are_interpolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    write(tmp_path, 'local_path = "${SCRATCH}/runs"\n[mlflow]\ntracking_uri = "sqlite:///${PROJECT_ROOT}/m.db"\n')
    config = load_config(tmp_path)
    assert config.local_path == Path("/scratch/me/runs")
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path.resolve()}/m.db"
    assert config.source == tmp_path / "config" / "default.toml"


def test_relative_local_path_is_relative_to_project_root(tmp_path: Path) -> None:
    write(tmp_path, 'local_path = "runs"\n')
    assert load_config(tmp_path).local_path == tmp_path.resolve() / "runs"


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    assert config.local_path == tmp_path.resolve() / "data_storage"
    assert config.storage.backend == "local" and not config.storage.has_remote
    assert config.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'data_storage' / 'mlflow.db'}"
    assert config.experiment_name("my_project") == "my_project"


def test_tracking_uri_and_experiment_fall_back_to_mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    config = load_config(tmp_path)
    assert config.tracking_uri() == "http://tracking:5000"
    assert config.experiment_name("pkg") == "from-env"


def test_seed_flat_keys_select_b2_and_keep_the_secret_out_of_repr(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'local_path="${PROJECT_ROOT}/d"\nb2_key_id="KEYID123"\nb2_key="SECRETKEY"\nb2_bucket="my-b2-bucket"\nb2_prefix="my_project"\n',
    )
    os.chmod(path, 0o600)
    config = load_config(tmp_path)
    assert (config.storage.backend, config.storage.bucket, config.storage.prefix) == (
        "b2",
        "my-b2-bucket",
        "my_project",
    )
    assert config.storage.key == "SECRETKEY"
    assert "SECRETKEY" not in repr(config)


def test_secret_in_a_world_readable_config_warns(tmp_path: Path) -> None:
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        path = write(tmp_path, 'b2_key_id="id"\nb2_key="SECRETKEY"\nb2_bucket="bucket"\n')
        os.chmod(path, 0o644)
        load_config(tmp_path)
    finally:
        logger.remove(sink)
    assert any("chmod 600" in m and "SECRETKEY" not in m for m in messages)


def test_stage_rules_are_read(tmp_path: Path) -> None:
    write(tmp_path, '[stages.load_data]\nload_from = "latest"\nskip_log = true\n')
    rule = load_config(tmp_path).stages["load_data"]
    assert rule.load_from == "latest" and rule.skip_log and not rule.cache


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('local_path = "x"\nlocal_path = "y"\n', r"default\.toml: invalid TOML: .*line 2"),
        (
            '[mlflow]\nenabled = true\nexperimnt = "a"\n',
            r"default\.toml:3: unknown key 'experimnt' in \[mlflow\]\. Did you mean 'experiment'\?",
        ),
        (
            'locl_path = "x"\n',
            r"default\.toml:1: unknown key 'locl_path' at the top level\. Did you mean 'local_path'\?",
        ),
        ('[storage]\nworkers = "eight"\n', r"default\.toml:2: storage\.workers must be an integer, got str 'eight'"),
        ('[mlflow]\nenabled = "yes"\n', r"mlflow\.enabled must be true or false"),
        (
            '[storage]\nbackend = "s4"\n',
            r"unknown storage backend 's4'\. Known: local, file, s3, b2, mlflow\. Did you mean 's3'\?",
        ),
        (
            'local_path = "${NOPE_NOT_SET}/x"\n',
            r"refers to \$\{NOPE_NOT_SET\}, but the environment variable NOPE_NOT_SET is not set",
        ),
        (
            '[stages.prep]\nload_form = "latest"\n',
            r"default\.toml:2: unknown key 'load_form' in \[stages\.prep\]\. Did you mean 'load_from'\?",
        ),
        ('[executor]\nkind = "k8s"\n', r"unknown executor 'k8s'"),
        ('b2_key_id = "x"\n', r"need b2_bucket"),
        ("storage = 3\n", r"\[storage\] must be a table"),
    ],
)
def test_bad_config_names_file_line_key_and_fix(tmp_path: Path, text: str, expected: str) -> None:
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path)


def test_explicit_missing_config_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path, tmp_path / "nope.toml")
    monkeypatch.setenv("PHD_FLOW_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"PHD_FLOW_CONFIG"):
        load_config(tmp_path)


def test_ints_are_accepted_for_float_settings(tmp_path: Path) -> None:
    config = parse_config("[runs]\nheartbeat_seconds = 5\n", tmp_path)
    assert config.runs.heartbeat_seconds == 5.0
