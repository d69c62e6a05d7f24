"""CLI verbs for past runs: ``ls``, ``show``, ``compare``, ``result``, ``ui`` (``rm``, ``plot``: own modules).

Keys may be given by unique prefix everywhere. None of these commands imports mlflow unless it
has to touch an MLflow run (``rm`` of a tracked run, ``ls --stale --fix``, ``ui``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from phd_flow.cli.selection import add_direction, add_filters, compared_runs, select
from phd_flow.errors import ArgsError, UserError
from phd_flow.run.record import METRICS_FILE, OUTPUT_LOG

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.runs.query import Run, Runs


def register_ls(commands: Any) -> None:
    parser = commands.add_parser(
        "ls",
        help="list runs (filters: status, time, args, sweep; --remote)",
        description="List runs, oldest first: key, status, start, duration, synced, a few args.",
    )
    add_filters(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--fix", action="store_true", help="with --stale: mark the stale runs killed")
    parser.add_argument(
        "--children",
        action="store_true",
        help="also list the child runs of pipelines (as <parent key>/<child key>) below their parent",
    )
    shown = parser.add_argument_group("columns and order")
    shown.add_argument(
        "--metrics",
        metavar="NAMES",
        help="metric columns (last value): comma-separated names, or 'all' for every metric of the listed runs",
    )
    shown.add_argument(
        "--sort",
        metavar="FIELD",
        help="order by a field: an arg (lr), a metric (mse or metrics.mse), status, started, duration ...; "
        "write --sort=-FIELD for descending (runs without the field come last)",
    )
    shown.add_argument(
        "-n", type=int, metavar="N", help="only N runs: the newest N, or with --sort the first N in that order"
    )
    shown.add_argument("--sweeps", action="store_true", help="list the sweeps (not their points) with their progress")
    parser.set_defaults(func=_cmd_ls)


def register_show(commands: Any) -> None:
    parser = commands.add_parser(
        "show",
        help="details of one run",
        description="Show one run: args, status, timings, host/SLURM, stages, files, children, MLflow, log tail.",
    )
    parser.add_argument("key", metavar="KEY", help="run key or unique prefix")
    parser.add_argument("--lines", type=int, default=20, help="log lines shown for failed/killed runs")
    parser.set_defaults(func=_cmd_show)


def register_compare(commands: Any) -> None:
    parser = commands.add_parser(
        "compare",
        help="args that differ and final metrics, side by side, best marked",
        description="Compare runs: the args that differ, each metric's last value (the best run marked *, "
        "lower is better for names with loss/err/mse/mae/nll/time/cost..., else higher; --minimize/--maximize "
        "override) and its change against the first run. Runs: KEYs, or --sweep/--where, or both (KEYs filtered).",
    )
    parser.add_argument("keys", nargs="*", metavar="KEY", help="run keys or unique prefixes")
    parser.add_argument(
        "--where", action="append", default=[], metavar="FIELD OP VALUE", help="only runs where this holds (as in ls)"
    )
    parser.add_argument("--sweep", metavar="KEY", help="the points of the sweep KEY (key, prefix or suffix)")
    add_direction(parser)
    parser.add_argument("--plot", metavar="PNG", help="also draw every metric's curves, one line per run, into PNG")
    parser.set_defaults(func=_cmd_compare)


def register_result(commands: Any) -> None:
    parser = commands.add_parser("result", help="print a run's result (verified, unpickled)")
    parser.add_argument("key", metavar="KEY", help="run key or unique prefix")
    parser.add_argument(
        "--trust-remote",
        action="store_true",
        help="unpickle a result made elsewhere although no signing key is configured "
        "(only if you trust everyone who can write to the storage)",
    )
    parser.set_defaults(func=_cmd_result)


def register_ui(commands: Any) -> None:
    parser = commands.add_parser("ui", help="start the MLflow UI on the configured tracking store")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    parser.set_defaults(func=_cmd_ui)


# --- ls -----------------------------------------------------------------------------------------


def _cmd_ls(project: Project, args: argparse.Namespace) -> int:
    if args.fix and args.statuses != ["stale"]:
        raise ArgsError("--fix marks stale runs killed: use it as `ls --stale --fix`.")
    runs = select(project, args)
    if getattr(args, "children", False):
        runs = _with_children(project, runs)
    if args.fix:
        from phd_flow.cli.render import clean
        from phd_flow.runs.query import mark_killed

        failure: UserError | None = None
        for run in runs:
            try:
                print(clean(mark_killed(project, run)))
            except UserError as exc:  # a full disk: the others are still tried, the first error is shown
                print(clean(f"{run.key}: not marked killed (see the error below)."))
                failure = failure or exc
        if not runs:
            print("No stale runs.")
        if failure is not None:
            raise failure
        return 0
    runs = _order(runs, args)
    if args.json:
        # one run per line: readable, and the C encoder (indent= would use the slow Python one)
        metrics = bool(args.metrics)
        lines = ",\n".join("  " + json.dumps(run.to_dict(metrics), default=str) for run in runs)
        print(f"[\n{lines}\n]" if runs else "[]")
        return 0
    if args.sweeps:
        _print_sweeps(project, runs)
        return 0
    _print_table(runs, with_where=args.remote, metrics=_metric_names(runs, args.metrics))
    return 0


def _order(runs: Runs, args: argparse.Namespace) -> Runs:
    """``--sort`` then ``-n``."""
    from phd_flow.runs.where import sort_runs

    if args.n is not None and args.n < 0:
        raise ArgsError(f"-n {args.n}: give 0 or more.")
    ordered = type(runs)(sort_runs(list(runs), args.sort)) if args.sort else runs
    if args.n is not None:
        ordered = type(runs)(ordered[: args.n] if args.sort else ordered[len(ordered) - args.n :] if args.n else [])
    ordered.project = runs.project
    return ordered


def _metric_names(runs: Runs, wanted: str | None) -> list[str]:
    """The metric columns ``--metrics`` asks for (``all``: every metric of the listed runs)."""
    if not wanted:
        return []
    if wanted.strip() == "all":
        return sorted({name for run in runs for name in run.metrics})
    names = [name.strip().removeprefix("metrics.") for name in wanted.split(",") if name.strip()]
    known = {name for run in runs for name in run.metrics}
    unknown = [name for name in names if name not in known]
    if unknown and runs:
        from phd_flow.cli.selection import warn

        warn(f"no listed run logged {', '.join(unknown)}; metrics are: {', '.join(sorted(known)) or 'none'}")
    return names


def _with_children(project: Project, runs: Runs) -> Runs:
    """``runs`` with each local run's child runs (``<parent>/<child>``, addressable by that path
    or the child's key) right after it."""
    from phd_flow.errors import CorruptRunError
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.listing import child_run_paths, read_remote_record, remote_child_paths
    from phd_flow.runs.query import Run, Runs

    local_path = project.config.local_path
    listed = Runs()
    for run in runs:
        listed.append(run)
        if run.where == "remote":  # only in storage: its children are found through its run.json
            remote = project.require_remote()
            for path in sorted(remote_child_paths(project.config, remote, [run.key]).values()):
                with contextlib.suppress(CorruptRunError):
                    found = read_remote_record(project.config, remote, path)
                    if found is not None:
                        data = {**found.data, "key": path}
                        listed.append(Run(found.run_dir, data, "remote", False, run.has_remote, path))
            continue
        for path in child_run_paths(local_path, run.key):
            try:
                record = RunRecord.load(local_path / path)
            except CorruptRunError:
                continue
            listed.append(Run(record.run_dir, {**record.data, "key": path}, "local", False, run.has_remote))
    return listed


def _print_table(runs: Runs, with_where: bool, metrics: Sequence[str] = ()) -> None:
    from phd_flow.cli import render as view
    from phd_flow.runs.metrics import as_number

    if not runs:
        print("No runs match.", file=sys.stderr)
        return
    headers = [
        "KEY",
        "STATUS",
        "STARTED",
        "DURATION",
        "SYNCED",
        *(["WHERE"] if with_where else []),
        *metrics,
        "ARGS",
    ]
    summaries = [run.metrics for run in runs] if metrics else []
    columns = [view.number_cells([as_number((s.get(name) or {}).get("last")) for s in summaries]) for name in metrics]
    first = headers.index("SYNCED") + 1 + with_where
    rows = [
        [
            run.key,
            run.state,
            view.local_time(run.started_at),
            view.duration_text(run.duration),
            view.synced_text(run),
            *([run.where] if with_where else []),
            *(column[i] for column in columns),
            summary,
        ]
        for i, (run, summary) in enumerate(zip(runs, view.args_summary(runs), strict=True))
    ]
    right = range(first, first + len(metrics))
    print(view.table(headers, rows, color=view.use_color(), right=right))


def _print_sweeps(project: Project, sweeps: Runs) -> None:
    """``ls --sweeps``: one row per sweep with its points' statuses (read from their run.json)."""
    from phd_flow.cli import render as view
    from phd_flow.run.record import parse_time
    from phd_flow.sweeps.grid import point_status, summary

    if not sweeps:
        print("No sweeps match.", file=sys.stderr)
        return
    config = project.config
    rows = []
    for sweep in sweeps:
        counts: dict[str, int] = {}
        points = [p for p in sweep.data.get("points") or [] if isinstance(p, dict)]
        for point in points:
            status = str(point.get("status") or "?")
            if sweep.where != "remote" and _is_key(point.get("key")):
                status = point_status(config.local_path / str(point["key"]), status, config.runs.stale_after_seconds)
            counts[status] = counts.get(status, 0) + 1
        grid = sweep.data.get("grid")
        grid_text = " ".join(
            f"{name}={','.join(map(str, values))}" for name, values in (grid.items() if isinstance(grid, dict) else [])
        )
        created = parse_time(sweep.data.get("created_at"))
        rows.append([sweep.key, str(sweep.data.get("node")), view.local_time(created), summary(counts), grid_text])
    print(view.table(["KEY", "NODE", "CREATED", "POINTS", "GRID"], rows, color=view.use_color()))


def _is_key(value: Any) -> bool:
    from phd_flow.errors import InvalidKeyError
    from phd_flow.keys import run_name

    try:
        run_name(value)
    except InvalidKeyError:
        return False
    return True


# --- show, compare, result ----------------------------------------------------------------------


def _cmd_show(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.cli import render as view
    from phd_flow.runs.query import get_run

    run = get_run(project, args.key)
    if run.where == "local":
        files = view.run_files(run.run_dir)
    else:
        remote = project.require_remote()
        from phd_flow.storage.engine import MANIFEST

        listed = [(f.key[len(run.location) + 1 :], f.size) for f in remote.list(run.location)]
        files = [(name, size) for name, size in listed if not name.endswith(MANIFEST)]
    log: list[str] = []
    if run.state in ("failed", "killed", "stale") and args.lines > 0:
        log = view.tail(run.run_dir / OUTPUT_LOG, args.lines) if run.where == "local" else []
    for line in view.render_show(run, files, project.package_name, view.use_color(), log):
        print(line)
    return 0


def _cmd_compare(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.cli import render as view
    from phd_flow.runs.metrics import best_index, last_values, lower_is_better
    from phd_flow.runs.where import text as arg_text
    from phd_flow.tracking import flatten

    runs = compared_runs(project, args.keys, args.where, args.sweep)
    for number, run in enumerate(runs, 1):
        print(f"[{number}] {view.clean(run.key)}  {view.status_text(view.clean(run.state), view.use_color())}")
    flat = [flatten(run.args) for run in runs]
    names = list(dict.fromkeys(name for args_ in flat for name in args_))
    differ = [n for n in names if len({arg_text(a.get(n, "-")) for a in flat}) > 1]
    same = [n for n in names if n not in differ]
    columns = ["", *(f"[{i}]" for i in range(1, len(runs) + 1))]
    rows = [[n, *(arg_text(a[n]) if n in a else "-" for a in flat)] for n in differ]
    metrics = [last_values(metric_summary(project, run)) for run in runs]
    metric_names = sorted({name for m in metrics for name in m})
    print()
    print("args that differ" if differ else "args: all the same")
    if differ:
        print(_indent(view.table(columns, rows)))
    if same:
        print(view.clean("same in all: " + ", ".join(f"{n}={arg_text(flat[0][n])}" for n in same)))
    print()
    if not metric_names:
        print("metrics: none logged")
    else:
        value_rows, delta_rows, bests = [], [], []
        for name in metric_names:
            values = [m.get(name) for m in metrics]
            lower = lower_is_better(name, args.minimize, args.maximize)
            best = best_index(values, lower) if len(runs) > 1 else None
            cells = view.number_cells(values)
            value_rows.append([name, *(c + (" *" if i == best else "  ") for i, c in enumerate(cells))])
            bests.append(f"{name}: {'lower' if lower else 'higher'}")
            base = values[0]
            deltas: list[float | None] = [None if v is None or base is None else v - base for v in values[1:]]
            delta_cells = view.number_cells(deltas)
            delta_rows.append([name, *(_signed(c, d, base) for c, d in zip(delta_cells, deltas, strict=True))])
        right = range(1, len(columns))
        print(f"final metrics (last value; * best, {', '.join(bests)} is better)")
        marked = ["", *(f"{c}  " for c in columns[1:])]
        print(_indent(view.table(marked, value_rows, right=right)))
        if len(runs) > 1:
            print()
            print("change against [1]")
            print(_indent(view.table(["", *columns[2:]], delta_rows, right=range(1, len(columns) - 1))))
    if args.plot:
        from phd_flow.cli.plot import compare_figure, save

        save(compare_figure(project, runs, metric_names), args.plot)
    return 0


def _signed(cell: str, delta: float | None, base: float | None) -> str:
    """``+1.25 (+3.1%)`` / ``-277 (-8.7%)``; ``-`` when there is nothing to compare."""
    if delta is None:
        return "-"
    sign = "+" if delta > 0 else ""
    percent = f" ({delta / abs(base):+.1%})" if base else ""
    return f"{sign}{cell}{percent}"


def metric_summary(project: Project, run: Run) -> dict[str, dict[str, Any]]:
    """The run's metric summary: from run.json, else from its metrics.jsonl (local or remote)."""
    if run.metrics or run.where != "remote":
        return run.metrics
    from phd_flow.runs.metrics import parse_points, summarize
    from phd_flow.runs.query import read_run_file

    return summarize(parse_points(read_run_file(project, run, METRICS_FILE) or b""))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _cmd_result(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.runs.query import load_result

    print(repr(load_result(args.key, project, trust_remote=args.trust_remote)))
    return 0


# --- ui -----------------------------------------------------------------------------------------


def _cmd_ui(project: Project, args: argparse.Namespace) -> int:
    import os
    import signal
    import socket
    import subprocess

    if not 0 < args.port < 65536:
        raise ArgsError(f"--port {args.port}: give a port from 1 to 65535.")
    uri = project.config.tracking_uri()
    if uri.startswith(("http://", "https://")):
        from phd_flow.log import redact_url
        from phd_flow.tracking import CLASSIC_VIEW

        server = redact_url(uri).rstrip("/")
        print(f"The tracking store is an MLflow server already: open {server}/#/experiments{CLASSIC_VIEW}")
        return 0
    with socket.socket() as probe:
        if probe.connect_ex((args.host, args.port)) == 0:
            raise ArgsError(f"Port {args.port} on {args.host} is in use: choose another with --port.")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    from phd_flow.tracking import CLASSIC_VIEW

    page = f"http://{args.host}:{args.port}/#/experiments{CLASSIC_VIEW}"
    print(f"MLflow UI for {uri} at {page} (Ctrl-C stops it)", flush=True)
    process = subprocess.Popen(command, env=env)

    def stop(signum: int, _frame: Any) -> None:
        process.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
