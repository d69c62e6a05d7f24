"""reproducible.json's package list: what ``importlib.metadata`` says, read fast."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from phd_flow.run import repro


def test_packages_are_every_distribution_with_the_version_importlib_metadata_gives() -> None:
    expected: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        expected.setdefault(re.sub(r"[-_.]+", "-", name).lower(), (name, metadata.version(name)))
    assert repro._scan_packages() == dict(sorted(expected.values(), key=lambda item: item[0].lower()))


def _dist(site: Path, folder: str, filename: str, text: str) -> None:
    (site / folder).mkdir(parents=True)
    (site / folder / filename).write_text(text)


def test_packages_read_only_the_headers_and_the_first_of_a_name_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    # a description (after the empty line) that looks like headers must not count
    _dist(
        first,
        "demo_pkg-2.0.dist-info",
        "METADATA",
        "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 2.0\n\nVersion: 9\n",
    )
    _dist(second, "demo_pkg-1.0.dist-info", "METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
    _dist(second, "old_egg.egg-info", "PKG-INFO", "Metadata-Version: 1.0\nName: old-egg\nVersion: 0.3\n")
    # the same distribution as pip sees it (Pillow <= 10 wrote "Pillow", later ones "pillow"),
    # CRLF line ends and lower-case field names, as the email parser accepts them
    _dist(first, "pillow-11.0.dist-info", "METADATA", "metadata-version: 2.1\r\nname: pillow\r\nversion: 11.0\r\n")
    _dist(second, "Pillow-10.0.dist-info", "METADATA", "Metadata-Version: 2.1\nName: Pillow\nVersion: 10.0\n")
    monkeypatch.setattr(sys, "path", [str(first), str(second)])
    repro._PACKAGES.clear()
    # the ones that import win
    assert repro.packages() == {"demo-pkg": "2.0", "old-egg": "0.3", "pillow": "11.0"}
    assert metadata.version("demo-pkg") == "2.0" and metadata.version("Pillow") == "11.0"
    repro._PACKAGES.clear()
