"""The one list of storage backends: name / URI scheme -> "module:Class" + install hint.

Config validation and the CLI read it; a backend module is imported only when it is used. A leaf:
it imports nothing of phd_flow but errors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from phd_flow.errors import StorageConfigError, closest

if TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.storage.base import Remote

# name or URI scheme -> ("module:Class", pip package that provides the SDK)
_BACKENDS: dict[str, tuple[str, str | None]] = {
    "local": ("phd_flow.storage.local:LocalRemote", None),
    "file": ("phd_flow.storage.local:LocalRemote", None),
    "s3": ("phd_flow.storage.s3:S3Remote", "boto3"),
    "b2": ("phd_flow.storage.b2:B2Remote", "b2sdk"),
    "mlflow": ("phd_flow.storage.mlflow_artifacts:MlflowRemote", "mlflow"),
}


def registered_backends() -> list[str]:
    """Names (and URI schemes) of every known backend."""
    return list(_BACKENDS)


def register_backend(name: str, target: str, package: str | None = None) -> None:
    """Register a third-party backend: ``register_backend("gcs", "my_pkg.gcs:GcsRemote")``."""
    _BACKENDS[name] = (target, package)


def scheme_of(uri: str) -> str:
    """``"s3://bucket/p"`` -> ``"s3"``; a plain path -> ``"local"``."""
    return uri.split("://", 1)[0] if "://" in uri else "local"


def backend_class(name: str) -> type[Remote]:
    """Import and return the backend class registered under ``name``."""
    if name not in _BACKENDS:
        known = ", ".join(_BACKENDS)
        raise StorageConfigError(
            f"Unknown storage backend {name!r} ([storage] backend). Known: {known}.{closest(name, _BACKENDS)}"
        )
    target, package = _BACKENDS[name]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" Install it with `pip install {package}`." if package else ""
        raise StorageConfigError(f"The {name!r} storage backend cannot be imported ({exc}).{hint}") from exc
    cls: type[Remote] = getattr(module, class_name)
    return cls


def make_remote(config: Config) -> Remote | None:
    """The configured remote, or None when runs stay in ``local_path`` only."""
    storage = config.storage
    if not storage.has_remote:
        return None
    name = scheme_of(storage.uri) if storage.uri else storage.backend
    return backend_class(name).from_config(config)
