"""Test helpers for projects and third-party storage backends (needs pytest).

>>> from phd_flow.testing import RemoteContract  # doctest: +SKIP
"""

from __future__ import annotations

from phd_flow.testing.contract import RemoteContract, storage_for, write_tree

__all__ = ["RemoteContract", "storage_for", "write_tree"]
