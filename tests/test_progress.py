"""Byte-level progress bars for big single-file transfers (issue 16): S3 (moto server) and B2
(b2sdk's RawSimulator). A bar is drawn only on a terminal — forced here with
``PHD_FLOW_PROGRESS=always`` — and only for files of ``progress.MIN_BYTES`` or more; it counts
every byte of the file. The bars are real tqdm bars, observed through a recording subclass."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tqdm
from b2sdk.v2 import RawSimulator

from phd_flow.storage import progress
from phd_flow.storage.s3 import S3Remote
from tests.s3_fixtures import S3Server, make_bucket, moto_server  # noqa: F401
from tests.test_storage_b2 import Simulated


class Recording(tqdm.tqdm):  # type: ignore[type-arg,misc]
    """tqdm that remembers every bar made and the bytes each one counted."""

    made: list[Recording] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted = 0
        Recording.made.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        self.counted += int(n or 0)
        return super().update(n)  # type: ignore[no-any-return]

    def reset(self, total: float | None = None) -> None:
        self.counted = 0
        super().reset(total)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Recording]]:
    monkeypatch.setattr(tqdm, "tqdm", Recording)
    Recording.made = []
    yield Recording.made


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


BIG = progress.MIN_BYTES + 123_457  # above the bar's threshold, below S3's multipart threshold
SMALL = progress.MIN_BYTES - 1


class MiBPartSimulator(RawSimulator):
    """The simulator with 1 MiB parts: BIG is 9 parts up and down. Its own 200 B parts made it
    6,666, a thread task each (~10 s of the two B2 tests); real B2's smallest part is 5 MB."""

    MIN_PART_SIZE = 1 << 20


@pytest.fixture(params=["s3", "b2"])
def remote(request: pytest.FixtureRequest) -> Any:
    """An S3 remote on the session's moto server, or a B2 remote on b2sdk's RawSimulator."""
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("moto_server")
        return S3Remote(make_bucket(server), "p", endpoint_url=server.endpoint_url)
    return Simulated(MiBPartSimulator).remote()


@pytest.mark.slow
def test_a_big_file_counts_every_byte_on_a_terminal(
    remote: Any, bars: list[Recording], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(progress.ENV, "always")
    run_stderr = io.StringIO()  # what a run's sys.stderr (teed into output.log) would receive
    monkeypatch.setattr(sys, "stderr", run_stderr)
    big = _file(tmp_path / "big.bin", BIG)
    remote.put(big, "run/big.bin")
    assert [(bar.total, bar.counted) for bar in bars] == [(BIG, BIG)], "upload"
    remote.get("run/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert [(bar.total, bar.counted) for bar in bars[1:]] == [(BIG, BIG)], "download"

    remote.put(_file(tmp_path / "small.bin", SMALL), "run/small.bin")  # below the threshold
    remote.get("run/small.bin", tmp_path / "small-back.bin")
    assert len(bars) == 2
    assert run_stderr.getvalue() == ""  # the bars go to the terminal only, never into output.log


@pytest.mark.slow
def test_no_bar_when_stderr_is_not_a_terminal_or_bars_are_off(
    remote: Any, bars: list[Recording], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _file(tmp_path / "big.bin", BIG)
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not (sys.__stderr__ and sys.__stderr__.isatty())
    remote.put(big, "run/big.bin")  # pytest's stderr is no terminal: no bar
    monkeypatch.setenv(progress.ENV, "never")
    remote.get("run/big.bin", tmp_path / "back.bin")
    assert bars == [] and (tmp_path / "back.bin").read_bytes() == big.read_bytes()
