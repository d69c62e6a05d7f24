"""TOML configuration: loading, ``${PROJECT_ROOT}`` / ``${ENV}`` interpolation, validation.

The documented form uses tables (``[storage]``, ``[mlflow]``, ``[stages.NAME]``,
``[executor]``, ``[runs]``); the seed's flat keys (``local_path``, ``b2_key_id``, ``b2_key``,
``b2_bucket``, ``b2_prefix``) keep working. Every problem raises :class:`ConfigError` naming the
file, the key (and its line when it can be found) and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phd_flow.errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_CONFIG = "PHD_FLOW_CONFIG"
_VAR = re.compile(r"\$\{([^}]*)\}")


@dataclass
class StorageConfig:
    """``[storage]``: where run directories are mirrored."""

    backend: str = "local"  # a registered backend name: local | s3 | b2 | mlflow
    uri: str | None = None  # alternative to backend+bucket+prefix: "s3://bucket/prefix"
    remote: str | None = None  # local backend: the shared directory to mirror into
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None  # S3-compatible stores (MinIO, Ceph, B2's S3 endpoint)
    region: str | None = None
    workers: int = 8  # parallel transfers
    retries: int = 4  # attempts per file before the run is marked "not synced"
    # Credentials from the seed's flat keys. Never printed, logged or written anywhere.
    key_id: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    @property
    def has_remote(self) -> bool:
        """True when runs are mirrored somewhere besides ``local_path``.

        Naming a backend other than ``local`` asks for a remote, even if its settings are
        incomplete: the backend then reports what is missing instead of syncing nowhere.
        """
        return bool(self.uri or self.remote or self.bucket or self.backend != "local")


@dataclass
class MlflowConfig:
    """``[mlflow]``: the tracking store."""

    enabled: bool = True
    tracking_uri: str | None = None  # default: sqlite:///<local_path>/mlflow.db
    experiment: str | None = None  # default: $MLFLOW_EXPERIMENT_NAME, else the package name
    autolog: bool = False  # call mlflow.autolog() before _run
    wait: bool = False  # a run returns once MLflow has it (default: fed in the background)
    telemetry: bool = False  # let MLflow's usage telemetry run (phd_flow turns it off otherwise)


@dataclass
class StageRule:
    """``[stages.NAME]``: load a stage from an earlier run, or keep it out of sync/MLflow."""

    load_from: str | None = None  # a run key, an MLflow run id, or "latest"
    skip_log: bool = False
    cache: bool = False


@dataclass
class SlurmConfig:
    """``[executor.slurm]``: passed to submitit's AutoExecutor."""

    partition: str | None = None
    timeout_min: int = 60
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: int | None = None
    account: str | None = None
    qos: str | None = None
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int = 90
    folder: str | None = None  # submitit logs; default <local_path>/.slurm
    #: any other sbatch option, e.g. ``{constraint = "a100", gres = "gpu:2"}`` (checked against
    #: submitit's parameters and ``sbatch --help`` before anything is submitted)
    extra: dict[str, Any] = field(default_factory=dict)
    #: how often submitit requeues a task that hit its time limit (its default is 3; preemptions
    #: are requeued without a cap)
    max_requeues: int = 3


@dataclass
class ExecutorConfig:
    """``[executor]``: how sweeps run."""

    kind: str = "local"  # local (warm, forked points) | process (a process per point) | slurm
    max_parallel: int = 4
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class RunsConfig:
    """``[runs]``: run bookkeeping."""

    heartbeat_seconds: float = 30.0
    stale_after_seconds: float = 180.0


@dataclass
class SecurityConfig:
    """``[security]``: the lab's signing key (``$PHD_FLOW_SIGNING_KEY`` wins). Results and stages
    made with it are signed; from a remote, only validly signed ones are loaded. Never printed,
    logged or written anywhere."""

    signing_key: str | None = field(default=None, repr=False)


@dataclass
class Config:
    """The whole configuration of one project on one machine."""

    local_path: Path
    project_root: Path
    storage: StorageConfig = field(default_factory=StorageConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    stages: dict[str, StageRule] = field(default_factory=dict)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    source: Path | None = None  # the file it came from, None for defaults

    def where(self, key: str) -> str:
        """Describe where ``key`` is set, e.g. ``config/default.toml:12 [stages.x] load_from``."""
        return _locate(self.source, key)

    def tracking_uri(self) -> str:
        """The MLflow tracking URI: config, then $MLFLOW_TRACKING_URI, then sqlite in local_path."""
        return (
            self.mlflow.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.local_path / 'mlflow.db'}"
        )

    def experiment_name(self, package: str | None) -> str:
        """The MLflow experiment: config, then $MLFLOW_EXPERIMENT_NAME, then the package name."""
        return self.mlflow.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or package or "phd_flow"


_FLAT_SEED_KEYS = {"b2_key_id", "b2_key", "b2_bucket", "b2_prefix"}
#: Config keys whose values are secrets (any table): never logged, redacted from git diffs.
SECRET_KEYS = frozenset({"b2_key", "b2_key_id", "key", "key_id", "signing_key"})


def default_config(project_root: Path) -> Config:
    """The embedded defaults: local storage in ``<project_root>/data_storage``, sqlite MLflow."""
    return Config(local_path=project_root / "data_storage", project_root=project_root)


def config_path(project_root: Path, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to read: ``explicit``, else $PHD_FLOW_CONFIG, else config/default.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    return project_root / "config" / "default.toml"


def load_config(
    project_root: str | os.PathLike[str], path: str | os.PathLike[str] | None = None, *, reason: str | None = None
) -> Config:
    """Load and validate the config for a project.

    ``path`` (or $PHD_FLOW_CONFIG) must exist when given; the default
    ``<project_root>/config/default.toml`` may be missing, and then the embedded defaults apply.
    Raises :class:`ConfigError` on syntax errors, unknown keys, wrong types, unset env vars.
    """
    root = Path(project_root).resolve()
    explicit = path is not None or bool(os.environ.get(ENV_CONFIG))
    file = config_path(root, path)
    try:
        exists = file.is_file()
    except OSError as exc:  # e.g. a file name longer than the filesystem allows
        raise ConfigError(f"Config file {str(file)[:200]!r} cannot be read: {exc.strerror or exc}.") from None
    if not exists:
        if explicit:
            origin = "--config" if path is not None else f"${ENV_CONFIG}"
            raise ConfigError(f"Config file {file} (from {origin}) does not exist.")
        config = default_config(root)
        why = f" ({reason})" if reason else ""
        _say(f"No config file at {file}{why}; using the defaults (local_path={config.local_path}).")
        return config
    _say(f"Loading config from file: {file}" + (f" ({reason})" if reason else ""), "DEBUG")
    return parse_config(file.read_bytes(), root, file)


def _say(message: str, level: str = "INFO") -> None:
    from phd_flow.log import logger

    logger.log(level, message)


def parse_config(raw: bytes | str, project_root: Path, source: Path | None = None) -> Config:
    """Parse TOML text into a validated :class:`Config` (see :func:`load_config`)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    name = str(source) if source else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}. Fix the syntax at that line.") from None
    data = _interpolate(data, project_root, source, "")
    config = _from_dict(data, project_root, source)
    _warn_readable_secrets(data, source)
    return config


def _from_dict(data: dict[str, Any], project_root: Path, source: Path | None) -> Config:
    data = dict(data)
    flat = {k: data.pop(k) for k in list(data) if k in _FLAT_SEED_KEYS}
    local_path = data.pop("local_path", None)
    _check_type("local_path", local_path, str | None, source)
    allowed = {"storage", "mlflow", "stages", "executor", "runs", "security"}
    _reject_unknown(data, allowed | {"local_path"} | _FLAT_SEED_KEYS, "", source)
    config = Config(
        local_path=_as_path(local_path, project_root) if local_path else project_root / "data_storage",
        project_root=project_root,
        storage=_build(StorageConfig, data.get("storage", {}), "storage", source),
        mlflow=_build(MlflowConfig, data.get("mlflow", {}), "mlflow", source),
        executor=_build(ExecutorConfig, data.get("executor", {}), "executor", source),
        runs=_build(RunsConfig, data.get("runs", {}), "runs", source),
        security=_build(SecurityConfig, data.get("security", {}), "security", source),
        source=source,
    )
    stages = data.get("stages", {})
    _check_type("stages", stages, dict[str, Any], source)
    for stage, rule in stages.items():
        config.stages[stage] = _build(StageRule, rule, f"stages.{stage}", source)
    _apply_flat_seed_keys(config, flat, source)
    _validate_storage(config, source)
    _validate_ranges(config, source)
    _validate_local_path(config, source)
    return config


#: The longest file name (one path component) common filesystems allow, in bytes.
NAME_MAX = 255


def _validate_local_path(config: Config, source: Path | None) -> None:
    for part in config.local_path.parts:
        if len(part.encode()) > NAME_MAX:
            raise ConfigError(
                f"{_locate(source, 'local_path')}: local_path has a component of {len(part.encode())} bytes "
                f"({part[:40]!r}...); filesystems allow at most {NAME_MAX}."
            )


def _validate_ranges(config: Config, source: Path | None) -> None:
    """Values of the right type but out of range (a zero heartbeat spins a core, an empty
    ``load_from`` would be ignored): :class:`ConfigError` naming the file, line and key."""
    runs, executor, storage = config.runs, config.executor, config.storage
    limits: list[tuple[str, bool, str]] = [
        (
            "runs.heartbeat_seconds",
            0 < runs.heartbeat_seconds < math.inf,
            "a number of seconds above 0, e.g. 30",
        ),
        (
            "runs.stale_after_seconds",
            runs.stale_after_seconds > runs.heartbeat_seconds,
            f"longer than heartbeat_seconds ({runs.heartbeat_seconds:g}), e.g. 6 heartbeats",
        ),
        ("storage.workers", storage.workers >= 1, "at least 1"),
        ("storage.retries", storage.retries >= 1, "at least 1 (attempts per file)"),
        ("executor.max_parallel", executor.max_parallel >= 1, "at least 1"),
        ("executor.slurm.timeout_min", executor.slurm.timeout_min >= 1, "at least 1 (minutes)"),
        ("executor.slurm.cpus_per_task", executor.slurm.cpus_per_task >= 1, "at least 1"),
        ("executor.slurm.gpus_per_node", executor.slurm.gpus_per_node >= 0, "0 or more"),
        ("executor.slurm.mem_gb", executor.slurm.mem_gb is None or executor.slurm.mem_gb >= 1, "at least 1 (GB)"),
        ("executor.slurm.signal_delay_s", executor.slurm.signal_delay_s >= 0, "0 or more (seconds)"),
        ("executor.slurm.max_requeues", executor.slurm.max_requeues >= 0, "0 or more"),
    ]
    for name, rule in config.stages.items():
        fine = rule.load_from is None or bool(rule.load_from.strip())
        limits.append((f"stages.{name}.load_from", fine, "a run key, an MLflow run id or 'latest' (or no load_from)"))
    for dotted, fine, expected in limits:
        if fine:
            continue
        *section, leaf = dotted.split(".")
        value = _lookup(config, dotted)
        raise ConfigError(
            f"{_locate(source, dotted)}: [{'.'.join(section)}] {leaf} = {value!r}: it must be {expected}."
        )


def _lookup(config: Config, dotted: str) -> Any:
    *path, leaf = dotted.split(".")
    if path[0] == "stages":
        return getattr(config.stages[".".join(path[1:])], leaf)
    node: Any = config
    for part in path:
        node = getattr(node, part)
    return getattr(node, leaf)


def _apply_flat_seed_keys(config: Config, flat: dict[str, Any], source: Path | None) -> None:
    for key, value in flat.items():
        _check_type(key, value, str, source)
    if not flat.get("b2_bucket"):
        if flat:
            raise ConfigError(
                f"{_locate(source, next(iter(flat)))}: the seed's B2 keys need b2_bucket too "
                "(or use the [storage] table, see docs/storage.md)."
            )
        return
    storage = config.storage
    storage.backend = "b2"
    storage.bucket = flat["b2_bucket"]
    storage.prefix = flat.get("b2_prefix", storage.prefix)
    storage.key_id = flat.get("b2_key_id")
    storage.key = flat.get("b2_key")


def _validate_storage(config: Config, source: Path | None) -> None:
    from phd_flow.storage.registry import registered_backends, scheme_of

    storage = config.storage
    known = registered_backends()
    if storage.uri:
        scheme = scheme_of(storage.uri)
        if scheme not in known:
            raise ConfigError(
                f"{_locate(source, 'storage.uri')}: unknown storage scheme {scheme!r} in "
                f"{storage.uri!r}. Known: {', '.join(known)}.{closest(scheme, known)}"
            )
    elif storage.backend not in known:
        raise ConfigError(
            f"{_locate(source, 'storage.backend')}: unknown storage backend "
            f"{storage.backend!r}. Known: {', '.join(known)}.{closest(storage.backend, known)}"
        )
    kind = config.executor.kind
    if kind not in {"local", "process", "slurm"}:
        raise ConfigError(
            f"{_locate(source, 'executor.kind')}: unknown executor {kind!r}; use 'local', 'process' or 'slurm'."
        )


def _build(cls: type[Any], data: Any, section: str, source: Path | None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{_locate(source, section)}: [{section}] must be a table, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(data, fields, section, source)
    values: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(typing.cast(type, hint), value, f"{section}.{name}", source)
            continue
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        _check_type(f"{section}.{name}", value, hint, source)
        values[name] = value
    return cls(**values)


def _reject_unknown(data: dict[str, Any], allowed: set[str], section: str, source: Path | None) -> None:
    for key in data:
        if key not in allowed:
            dotted = f"{section}.{key}" if section else key
            where = f"in [{section}]" if section else "at the top level"
            raise ConfigError(
                f"{_locate(source, dotted)}: unknown key {key!r} {where}.{closest(key, allowed)}"
                f" Valid keys: {', '.join(sorted(allowed))}."
            )


def _check_type(key: str, value: Any, hint: Any, source: Path | None) -> None:
    if not _matches(value, hint):
        raise ConfigError(
            f"{_locate(source, key)}: {key} must be {_describe(hint)}, got {type(value).__name__} {value!r}."
        )


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, hint) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a table"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _interpolate(value: Any, root: Path, source: Path | None, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, root, source, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, root, source, key) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "PROJECT_ROOT":
            return str(root)
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(
            f"{_locate(source, key)}: {key} refers to ${{{name}}}, but the environment variable "
            f"{name} is not set. Export it, or write the value directly."
        )

    return _VAR.sub(substitute, value)


def _as_path(value: str, root: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path)


def _locate(source: Path | None, dotted: str) -> str:
    """``file:line`` of ``dotted`` (``section.key``) in the TOML file, best effort."""
    if source is None:
        return "config"
    try:
        lines = source.read_text().splitlines()
    except OSError:
        return str(source)
    *sections, leaf = dotted.split(".")
    section = ".".join(sections)
    current = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1).replace('"', "")
            if not leaf or (current == dotted):
                return f"{source}:{number}"
            continue
        if current == section and re.match(rf"^\"?{re.escape(leaf)}\"?\s*=", stripped):
            return f"{source}:{number}"
    return str(source)


def _warn_readable_secrets(data: dict[str, Any], source: Path | None) -> None:
    if source is None:
        return
    storage, security = data.get("storage", {}), data.get("security", {})
    has_secret = (
        "b2_key" in data
        or (isinstance(storage, dict) and "key" in storage)
        or (isinstance(security, dict) and "signing_key" in security)
    )
    if not has_secret:
        return
    mode = source.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        from phd_flow.log import logger

        logger.warning(
            f"{source} holds a secret (a storage key or the signing key) and is readable by other "
            f"users (mode {stat.filemode(mode)}). Run `chmod 600 {source}`, or better, move the "
            "key to the environment (B2_APPLICATION_KEY, PHD_FLOW_SIGNING_KEY)."
        )
