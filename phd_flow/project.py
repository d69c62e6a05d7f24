"""The project handle: a package, its config, one lazily built Storage and one MLflow client.

Every command and API function takes a :class:`Project` (DVC's ``Repo`` and Metaflow's flow
datastore are the models) instead of rebuilding what it needs from a bare ``Config``: one
Storage (so one remote connection) per project, built on first use, never for local-only work.

>>> project = Project("my_project")            # doctest: +SKIP
>>> project.config.local_path                  # doctest: +SKIP
>>> project.storage.remote                     # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.config import ENV_CONFIG, Config, load_config

if TYPE_CHECKING:
    from phd_flow.storage.base import Remote
    from phd_flow.storage.facade import Storage

ConfigLike = Config | str | os.PathLike[str] | None


CONFIG_FILE = Path("config") / "default.toml"


@dataclass(frozen=True)
class ConfigChoice:
    """Where a project's config comes from: PROJECT_ROOT, the file (None: the embedded
    defaults) and why, in words for the log."""

    root: Path
    file: Path | None
    reason: str


def package_dir(package: str | None) -> Path | None:
    """The directory holding ``package`` (``.../root/pkg/__init__.py`` or ``.../root/mod.py`` -> root)."""
    if not package:
        return None
    module = sys.modules.get(package)
    if module is None:
        module = importlib.import_module(package)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    return path.parent.parent if path.name == "__init__.py" else path.parent


def _nearest(start: Path) -> Path | None:
    """The first of ``start`` and its parents holding ``config/default.toml``."""
    return next((p for p in (start, *start.parents) if (p / CONFIG_FILE).is_file()), None)


def discover_config(package: str | None, explicit: str | os.PathLike[str] | None = None) -> ConfigChoice:
    """The one config discovery, used by nodes, ``find_runs``, ``load_result`` and the CLI.

    PROJECT_ROOT is the nearest directory holding ``config/default.toml``: first from the
    package's directory upwards (a ``src/`` layout finds the project above it), then from the
    current directory upwards (a notebook in ``project/notebooks/`` finds ``project/``); when
    neither has one, the package's directory (or the cwd). The file read is ``explicit``
    (``--config``, ``config=``), else ``$PHD_FLOW_CONFIG`` (both are deliberate choices, so they
    win over a discovered file), else ``PROJECT_ROOT/config/default.toml``, else none: the
    embedded defaults.
    """
    home = package_dir(package)
    root, reason = None, ""
    if home is not None:
        root = _nearest(home)
        reason = f"the nearest {CONFIG_FILE.as_posix()} above package {package} ({home})"
    if root is None:
        cwd = Path.cwd()
        root = _nearest(cwd)
        reason = f"the nearest {CONFIG_FILE.as_posix()} above the current directory ({cwd})"
    if explicit is not None:
        return ConfigChoice(root or home or Path.cwd(), Path(explicit), "given with --config / config=")
    env = os.environ.get(ENV_CONFIG)
    if env:
        return ConfigChoice(root or home or Path.cwd(), Path(env), f"${ENV_CONFIG}")
    if root is None:
        where = f"above package {package} ({home}) or " if home is not None else ""
        base = home or Path.cwd()
        return ConfigChoice(base, None, f"no {CONFIG_FILE.as_posix()} {where}above the current directory")
    return ConfigChoice(root, root / CONFIG_FILE, reason)


def project_root(package: str | None) -> Path:
    """PROJECT_ROOT for ``package`` (see :func:`discover_config`)."""
    return discover_config(package).root


def discover_root(package: str | None = None) -> Path:
    """PROJECT_ROOT for ``package``, or from the cwd upwards without one (see :func:`discover_config`)."""
    return discover_config(package).root


class Project:
    """A package and its config, with the Storage and MLflow client built once, on first use.

    ``config`` is a :class:`Config`, a path to a TOML file, or None for
    ``PROJECT_ROOT/config/default.toml`` (or ``$PHD_FLOW_CONFIG``, or the embedded defaults).
    PROJECT_ROOT and the file are found by :func:`discover_config` (the package's directory
    upwards, then the cwd upwards, ``--config`` and ``$PHD_FLOW_CONFIG`` winning).
    ``remote`` replaces the configured remote (a simulator in tests, an already open client).
    """

    def __init__(self, package: str | None = None, config: ConfigLike = None, *, remote: Remote | None = None) -> None:
        self.package = package
        self._config = config if isinstance(config, Config) else None
        self._config_path = None if isinstance(config, Config) else config
        self._remote = remote  # a remote to use instead of the configured one (tests, simulators)
        self._storage: Storage | None = None
        self._mlflow_client: Any = None

    @classmethod
    def of(cls, config: ConfigLike | Project = None, package: str | None = None) -> Project:
        """A Project from what a public API function was given (a Project passes through)."""
        return config if isinstance(config, Project) else cls(package, config)

    @property
    def package_name(self) -> str:
        """The package of ``python -m <package>`` (commands always have one)."""
        if not self.package:
            from phd_flow.errors import PhdFlowError

            raise PhdFlowError("This needs a package: run it as `python -m <package> ...`.")
        return self.package

    @property
    def root(self) -> Path:
        """PROJECT_ROOT: where ``config/default.toml`` is looked for."""
        if self._config is not None:
            return self._config.project_root
        return discover_config(self.package, self._config_path).root

    @property
    def config(self) -> Config:
        """The validated config (loaded on first access; the log says which file and why)."""
        if self._config is None:
            choice = discover_config(self.package, self._config_path)
            self._config = load_config(choice.root, self._config_path, reason=choice.reason)
        return self._config

    @property
    def config_path(self) -> str | None:
        """The config file given explicitly (``--config`` or a path), if any."""
        return os.fspath(self._config_path) if self._config_path is not None else None

    @property
    def storage(self) -> Storage:
        """``local_path`` plus the configured remote; the remote is built on first use."""
        if self._storage is None:
            from phd_flow.stages.sources import recorded_stage_file
            from phd_flow.storage.facade import Storage

            self._storage = Storage(self.config, self._remote)
            self._storage.shareable = functools.partial(recorded_stage_file, self.config.local_path)
        return self._storage

    @property
    def remote(self) -> Remote | None:
        """The configured remote, or None when runs stay in ``local_path`` only."""
        return self.storage.remote

    def require_remote(self) -> Remote:
        """The configured remote; :class:`StorageNotFoundError` saying how to configure one."""
        remote = self.remote
        if remote is None:
            from phd_flow.errors import StorageNotFoundError

            raise StorageNotFoundError(
                "No remote storage is configured, so there are no runs in storage to list or fetch. "
                "Configure [storage] (see docs/storage.md)."
            )
        return remote

    def mlflow_client(self) -> Any:
        """An ``MlflowClient`` on the configured tracking store (imports mlflow on first call)."""
        if self._mlflow_client is None:
            from phd_flow.tracking import allow_telemetry, import_mlflow

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm on stderr
            allow_telemetry(self.config.mlflow.telemetry)
            import_mlflow()
            from mlflow.tracking import MlflowClient

            self._mlflow_client = MlflowClient(self.config.tracking_uri())
        return self._mlflow_client

    def __repr__(self) -> str:
        return f"Project({self.package!r}, root={str(self.root)!r})"
