"""Text rendering for the run commands: tables, times, sizes, and the ``show`` page.

Plain aligned text (no dependency, nothing slow to import); on a terminal the header is bold
and statuses are coloured, unless ``$NO_COLOR`` is set.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from phd_flow.errors import CorruptRunError, InvalidKeyError
from phd_flow.keys import run_name
from phd_flow.run.record import ATTEMPTS_FIELD, RUN_FILE, RunRecord
from phd_flow.runs.query import Run, parse_time
from phd_flow.runs.where import text as arg_text

_COLORS = {"completed": "32", "failed": "31", "killed": "35", "stale": "33", "running": "36"}
MAX_FILES = 40
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: C0 controls (ESC among them), DEL, C1 controls (CSI 0x9b ...), and the Unicode format
#: characters that reorder or hide text (bidi overrides, isolates, line/paragraph separators).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    r"""``text`` as a string safe to print on a terminal: control and escape characters from run
    data are shown escaped (``\x1b``, ``\n``, ``\u202e``) instead of acting on the terminal."""
    return _UNSAFE.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def use_color(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color and code else text


def status_text(status: str, color: bool, width: int = 0) -> str:
    return paint(status.ljust(width), _COLORS.get(status, ""), color)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], color: bool = False, right: Collection[int] = ()
) -> str:
    """Left-aligned columns (the indexes in ``right`` right-aligned: numbers) separated by two
    spaces; a ``STATUS`` column is coloured. Every cell goes through :func:`clean` (run data is
    shown escaped)."""
    headers = [clean(h) for h in headers]
    rows = [[clean(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    status_col = headers.index("STATUS") if "STATUS" in headers else -1
    head = [h.rjust(w) if i in right else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))]
    lines = [paint("  ".join(head).rstrip(), "1", color)]
    for row in rows:
        cells = [
            status_text(c, color, w) if i == status_col else c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def number_cells(values: Sequence[float | None]) -> list[str]:
    """One column of numbers with one precision: integers as integers; else as many decimals as
    give the smallest value 5 significant digits (at least 1, at most 6), or scientific notation
    when the values are huge or tiny; ``-`` where there is none. Right-align them (``table(right=...)``)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and all(v == int(v) and abs(v) < 1e15 for v in finite):
        spec = ".0f"
    else:
        nonzero = [abs(v) for v in finite if v != 0]
        if nonzero and (max(nonzero) >= 1e7 or min(nonzero) < 1e-4):
            spec = ".3e"
        else:
            smallest = min(nonzero, default=1.0)
            spec = f".{max(1, min(6, 4 - math.floor(math.log10(smallest))))}f"
    return ["-" if v is None else format(v, spec) if math.isfinite(v) else str(v) for v in values]


def local_time(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def duration_text(value: timedelta | None) -> str:
    """``4.2s``, ``3m05s``, ``2h03m``, ``3d04h``."""
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover - loop always returns


def args_summary(runs: Sequence[Run], limit: int = 4, width: int = 60) -> list[str]:
    """A few ``name=value`` per run: the args that differ between the listed runs first."""
    from phd_flow.runs.where import flat_args

    flat = [flat_args(run) for run in runs]
    names = list(dict.fromkeys(name for args in flat for name in args))
    varying = [n for n in names if len({arg_text(a.get(n)) for a in flat}) > 1]
    shown = (varying or names)[:limit]
    lines = []
    for args in flat:
        text = " ".join(f"{n}={arg_text(args[n])}" for n in shown if n in args)
        lines.append(text if len(text) <= width else text[: width - 1] + "…")
    return lines


def synced_text(run: Run) -> str:
    """``-`` for a running run, and where there is nowhere to sync to (no remote configured,
    MLflow up to date or off); ``pending`` while the MLflow feeder has not finished the run;
    else ``yes`` or ``no``."""
    if run.status == "running" or (run.synced and not run.has_remote):
        return "-"
    if (run.data.get("mlflow") or {}).get("state") == "pending":
        return "pending"  # the MLflow feeder has not finished it yet
    return "yes" if run.synced else "no"


# --- show ---------------------------------------------------------------------------------------


def render_show(
    run: Run, files: list[tuple[str, int]], package: str, color: bool, log_tail: list[str]
) -> Iterator[str]:
    """The lines of ``show KEY``; each goes through :func:`clean` (run data is shown escaped)."""
    yield paint(clean(run.key), "1", color) + ("   (only in storage)" if run.where == "remote" else "")
    for line in _show_body(run, files, package, log_tail):
        yield clean(line)


def _show_body(run: Run, files: list[tuple[str, int]], package: str, log_tail: list[str]) -> Iterator[str]:
    data = run.data
    yield from _fields(_overview(run))
    yield from _section("args", _args_lines(run.args))
    yield from _section("stages", _stage_lines(data.get("stages") or {}))
    if data.get("kind") == "sweep":
        yield from _section("sweep points", _sweep_lines(run))
    yield from _section("children", list(_children_tree(run.run_dir, data, "  ")))
    yield from _section(f"files ({len(files)}, {size_text(sum(s for _, s in files))})", _file_lines(files))
    if log_tail:
        yield from _section(f"last {len(log_tail)} lines of output.log", [f"  {line}" for line in log_tail])
    hint = _ui_hint(run, package)
    if hint:
        yield ""
        yield hint


def _overview(run: Run) -> list[tuple[str, str]]:
    data = run.data
    rows = [("node", f"{run.node}  ({data.get('node_class', '?')})"), ("status", run.state)]
    rows.append(("started", local_time(run.started_at)))
    if run.ended_at:
        rows.append(("ended", f"{local_time(run.ended_at)}  (took {duration_text(run.duration)})"))
    elif run.status == "running":
        beat = parse_time(data.get("heartbeat_at"))
        rows.append(
            (
                "heartbeat",
                local_time(beat) + ("  (stale: the process is gone)" if run.stale else ""),
            )
        )
    if data.get("kind") == "sweep":  # a sweep record: no process of its own, its points have them
        points = data.get("points")
        count = len(points) if isinstance(points, list) else 0
        rows.append(("sweep", f"{count} points; `sweep --status {run.key}` shows them"))
    elif data.get("host") or data.get("pid"):
        rows.append(("host", f"{data.get('host', '?')}  pid {data.get('pid', '?')}"))
    slurm = data.get("slurm") or {}
    if slurm:
        rows.append(("slurm", _slurm_text(slurm)))
    attempts = [a for a in data.get(ATTEMPTS_FIELD) or [] if isinstance(a, dict)]
    if len(attempts) > 1:  # requeued or resumed: MLflow shows the newest attempt of each step
        earlier = ", ".join(
            f"{a.get('status') or '?'} {local_time(parse_time(a.get('started_at')))}" for a in attempts[:-1]
        )
        rows.append(("attempts", f"{len(attempts)}  (earlier: {earlier})"))
    git = data.get("git") or {}
    if git.get("commit"):
        dirty = ", dirty" if git.get("dirty") else ""
        rows.append(("git", f"{str(git['commit'])[:12]} on {git.get('branch') or '?'}{dirty}"))
    rows.append(("sync", _sync_text(data.get("sync") or {})))
    rows.append(("mlflow", _mlflow_text(data.get("mlflow") or {})))
    result = data.get("result") or {}
    if result:
        rows.append(
            (
                "result",
                f"{result.get('file')} ({result.get('type', '?')}, sha256 {str(result.get('sha256'))[:12]})",
            )
        )
    if data.get("sweep"):
        rows.append(("sweep", str(data["sweep"])))
    if data.get("error"):
        rows.append(("error", str(data["error"])))
    return rows


def _slurm_text(slurm: dict[str, Any]) -> str:
    text = f"job {slurm.get('job_id', '?')}"
    if slurm.get("array_job_id"):
        text += f" (array {slurm['array_job_id']}_{slurm.get('array_task_id', '?')})"
    if slurm.get("node"):
        text += f" on {slurm['node']}"
    if slurm.get("restart_count"):
        text += f", restarted {slurm['restart_count']}x"
    return text


def _sync_text(sync: dict[str, Any]) -> str:
    state = sync.get("state", "?")
    if state == "synced":
        return f"synced to {sync.get('remote', '?')}"
    if state == "local":
        return "local only (no remote storage configured)"
    if state == "not_synced":
        return f"NOT synced: {sync.get('error', '?')}  (run `sync`)"
    return str(state)


def _mlflow_text(section: dict[str, Any]) -> str:
    if not section.get("run_id"):
        return str(section.get("state", "not recorded"))
    return (
        f"run {section['run_id']} in experiment {section.get('experiment', '?')} "
        f"({section.get('experiment_id', '?')}), {section.get('state', '?')}, "
        f"{section.get('tracking_uri', '?')}"
    )


def _ui_hint(run: Run, package: str) -> str | None:
    from phd_flow.tracking import ui_url

    section = run.data.get("mlflow") or {}
    run_id, experiment_id = section.get("run_id"), section.get("experiment_id")
    if not run_id:
        return None
    url = ui_url(str(section.get("tracking_uri", "")), str(experiment_id), str(run_id))
    if url:
        return f"MLflow UI: {url}"
    return (
        f"MLflow UI: `python -m {package} ui`, then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    )


def _fields(rows: list[tuple[str, str]]) -> Iterator[str]:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        yield f"  {name.ljust(width)}  {value}"


def _section(title: str, lines: list[str]) -> Iterator[str]:
    if lines:
        yield title
        yield from lines


def _args_lines(args: dict[str, Any]) -> list[str]:
    from phd_flow.tracking import flatten

    flat = flatten(args)
    width = max((len(n) for n in flat), default=0)
    return [f"  {name.ljust(width)}  {arg_text(value)}" for name, value in flat.items()]


def _stage_lines(stages: dict[str, Any]) -> list[str]:
    lines = []
    for name, info in stages.items():
        info = info if isinstance(info, dict) else {}
        if info.get("loaded") or info.get("loaded_from"):
            what = f"loaded from {info.get('loaded_from')}"
        elif info.get("skip_log"):
            what = "computed, kept local (skip_log)"
        else:
            what = "computed"
        digest = f"  sha256 {str(info['sha256'])[:12]}" if info.get("sha256") else ""
        lines.append(f"  {name}  {what}{digest}")
    return lines


def _sweep_lines(run: Run) -> list[str]:

    rows = []
    for point in run.data.get("points") or []:
        if not isinstance(point, dict):
            continue
        key = str(point.get("key") or "-")
        status = str(point.get("status") or "?")
        try:
            local = run.run_dir.parent / run_name(point.get("key"))  # data: a run key, never a path
        except InvalidKeyError:
            rows.append((arg_text(key), "invalid key", ""))
            continue
        if (local / RUN_FILE).is_file():
            try:
                status = RunRecord.load(local).status
            except CorruptRunError:
                status = "corrupt"
        params = " ".join(f"{k}={arg_text(v)}" for k, v in (point.get("params") or {}).items())
        rows.append((key, status, params))
    grid = run.data.get("grid")
    lines = [f"  grid: {arg_text(grid)}"] if grid else []
    if rows:
        lines += ["  " + line for line in table(["KEY", "STATUS", "PARAMS"], rows).splitlines()]
    return lines


def _children_tree(run_dir: Path, data: dict[str, Any], indent: str) -> Iterator[str]:
    """Child runs (sub-directories with a run.json) as a tree, and reused runs by path."""
    children = [p for p in sorted(run_dir.iterdir()) if (p / RUN_FILE).is_file()] if run_dir.is_dir() else []
    reused = [c for c in data.get("children") or [] if isinstance(c, dict) and c.get("reused")]
    items: list[tuple[str, Path | None]] = [(c.name, c) for c in children]
    items += [(f"{c.get('path')} (reused)", None) for c in reused]
    for number, (label, path) in enumerate(items):
        last = number == len(items) - 1
        child: dict[str, Any] = {}
        if path is not None:
            try:
                child = RunRecord.load(path).data
            except CorruptRunError:
                child = {"status": "corrupt run.json"}
        status = f"  {child.get('status')}" if child else ""
        yield f"{indent}{'└─' if last else '├─'} {label}{status}"
        if path is not None:
            yield from _children_tree(path, child, indent + ("   " if last else "│  "))


def _file_lines(files: list[tuple[str, int]]) -> list[str]:
    shown = files[:MAX_FILES]
    width = max((len(name) for name, _ in shown), default=0)
    lines = [f"  {name.ljust(width)}  {size_text(size):>9}" for name, size in shown]
    if len(files) > MAX_FILES:
        lines.append(f"  ... and {len(files) - MAX_FILES} more")
    return lines


def run_files(run_dir: Path) -> list[tuple[str, int]]:
    """``(relative path, size)`` of the run's files, child runs' directories and phd_flow's own
    files (locks, manifests, temp files) left out."""
    from phd_flow._io import PRIVATE_PREFIX

    found = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (base / d / RUN_FILE).exists())
        for name in sorted(filenames):
            if name.startswith(PRIVATE_PREFIX):
                continue
            path = base / name
            try:
                found.append((path.relative_to(run_dir).as_posix(), path.stat().st_size))
            except OSError:
                continue
    return found


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a text file (read from its end)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]
