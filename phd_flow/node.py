"""The seed's import path for writing nodes: ``from phd_flow import node`` then ``node.Node``,
``node.Args`` (the same objects as ``phd_flow.Node`` / ``phd_flow.Args``)."""

from __future__ import annotations

from phd_flow.run.node import Args, Node, RunOptions

__all__ = ["Args", "Node", "RunOptions"]
