"""CLI verbs for past runs: ``ls``, ``show``, ``compare``, ``result``, ``ui`` (``rm`` is in cli.rm).

Keys may be given by unique prefix everywhere. None of these commands imports mlflow unless it
has to touch an MLflow run (``rm`` of a tracked run, ``ls --stale --fix``, ``ui``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from phd_flow.cli.selection import add_filters, select
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
    parser = commands.add_parser("compare", help="args that differ and final metrics, side by side")
    parser.add_argument("keys", nargs="+", metavar="KEY", help="run keys or unique prefixes")
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
    if args.json:
        # one run per line: readable, and the C encoder (indent= would use the slow Python one)
        lines = ",\n".join("  " + json.dumps(run.to_dict(), default=str) for run in runs)
        print(f"[\n{lines}\n]" if runs else "[]")
        return 0
    _print_table(runs, with_where=args.remote)
    return 0


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


def _print_table(runs: Runs, with_where: bool) -> None:
    from phd_flow.cli import render as view

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
        "ARGS",
    ]
    rows = [
        [
            run.key,
            run.state,
            view.local_time(run.started_at),
            view.duration_text(run.duration),
            view.synced_text(run),
            *([run.where] if with_where else []),
            summary,
        ]
        for run, summary in zip(runs, view.args_summary(runs), strict=True)
    ]
    print(view.table(headers, rows, color=view.use_color()))


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
    from phd_flow.runs.query import arg_text, get_run
    from phd_flow.tracking import flatten

    runs = [get_run(project, key) for key in args.keys]
    for number, run in enumerate(runs, 1):
        print(f"[{number}] {view.clean(run.key)}  {view.status_text(view.clean(run.state), view.use_color())}")
    flat = [flatten(run.args) for run in runs]
    names = list(dict.fromkeys(name for args_ in flat for name in args_))
    differ = [n for n in names if len({arg_text(a.get(n, "-")) for a in flat}) > 1]
    same = [n for n in names if n not in differ]
    columns = ["", *(f"[{i}]" for i in range(1, len(runs) + 1))]
    rows = [[n, *(arg_text(a[n]) if n in a else "-" for a in flat)] for n in differ]
    metrics = [_final_metrics(project, run) for run in runs]
    metric_names = sorted({name for m in metrics for name in m})
    print()
    print("args that differ" if differ else "args: all the same")
    if differ:
        print(_indent(view.table(columns, rows)))
    if same:
        print(view.clean("same in all: " + ", ".join(f"{n}={arg_text(flat[0][n])}" for n in same)))
    print()
    print("final metrics" if metric_names else "metrics: none logged")
    if metric_names:
        metric_rows = [[n, *(f"{m[n]:.6g}" if n in m else "-" for m in metrics)] for n in metric_names]
        print(_indent(view.table(columns, metric_rows)))
    return 0


def _final_metrics(project: Project, run: Run) -> dict[str, float]:
    """The last logged value of each metric, from the run's metrics.jsonl."""
    from phd_flow.runs.query import read_run_file

    raw = read_run_file(project, run, METRICS_FILE) or b""
    last: dict[str, float] = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            point = json.loads(line)
            last[str(point["name"])] = float(point["value"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn line from a crash
    return last


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

        print(f"The tracking store is an MLflow server already: open {redact_url(uri)}")
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
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
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
