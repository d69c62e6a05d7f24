"""Byte-level progress bars for big single-file transfers (S3, B2): tqdm on the terminal only.

A bar is shown for a file of at least :data:`MIN_BYTES` when the process's own stderr
(``sys.__stderr__``, never a run's captured ``sys.stderr``, so a bar never reaches output.log)
is a terminal. ``PHD_FLOW_PROGRESS=always`` acts as if it were one (``never``: no bars at all).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

#: Files from this size up get a byte-level bar.
MIN_BYTES = 8 << 20
#: ``always`` (as if stderr were a terminal), ``never``, or unset / ``auto``.
ENV = "PHD_FLOW_PROGRESS"


def wanted(size: int) -> bool:
    """True when a transfer of ``size`` bytes gets a bar."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode == "never" or size < MIN_BYTES:
        return False
    stream = sys.__stderr__
    return mode == "always" or bool(stream is not None and stream.isatty())


class ByteProgress:
    """A tqdm bar counting the bytes of one file, fed from transfer threads; nothing at all
    unless :func:`wanted` says so for the total. ``progress(n)`` adds ``n`` bytes (boto3's
    ``Callback``); :meth:`set_total_bytes` / :meth:`bytes_completed` follow b2sdk's progress
    listener (totals so far, not deltas; the total may come only once the download starts).
    A context manager."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label = label if len(label) <= 40 else "…" + label[-39:]
        self._lock = threading.Lock()
        self.bar: Any = None
        if total is not None:
            self.set_total_bytes(total)

    def set_total_bytes(self, total_byte_count: int) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.reset(total=total_byte_count)  # b2sdk: a retried upload starts again
            elif wanted(total_byte_count):
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total_byte_count,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self.label,
                    leave=False,
                    file=sys.__stderr__,
                    dynamic_ncols=True,
                )

    def __call__(self, delta: int) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.update(delta)

    def bytes_completed(self, byte_count: int) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.update(byte_count - self.bar.n)

    def close(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.close()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
