"""Storage: the local run directories plus an optional remote (shared directory, S3, B2, MLflow).

It moves bytes and names, never runs: what to leave out of a run's upload is passed in by the
caller. ``registry`` maps backend names to classes, ``engine`` syncs trees with manifests,
``facade.Storage`` is what a node sees as ``self.storage``.
"""

from __future__ import annotations

from phd_flow.storage.base import Remote, RemoteFile
from phd_flow.storage.engine import SyncReport
from phd_flow.storage.facade import Storage, make_storage
from phd_flow.storage.registry import (
    backend_class,
    make_remote,
    register_backend,
    registered_backends,
    scheme_of,
)

__all__ = [
    "Remote",
    "RemoteFile",
    "Storage",
    "SyncReport",
    "backend_class",
    "make_remote",
    "make_storage",
    "register_backend",
    "registered_backends",
    "scheme_of",
]
