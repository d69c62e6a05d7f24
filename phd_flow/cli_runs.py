"""CLI verbs for past runs: ``ls``, ``show``, ``compare``, ``rm``, ``result``, ``ui``.

Keys may be given by unique prefix everywhere. None of these commands imports mlflow unless it
has to touch an MLflow run (``rm`` of a tracked run, ``ls --stale --fix``, ``ui``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from phd_flow.errors import ArgsError

if TYPE_CHECKING:
    from phd_flow.cli import Context
    from phd_flow.query import Run, RunFilter, Runs

STATUS_FLAGS = ("completed", "failed", "running", "killed", "stale")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prefix",
        nargs="?",
        metavar="PREFIX",
        help="only keys starting with PREFIX (e.g. a node name)",
    )
    group = parser.add_argument_group("filters (statuses combine with OR, the rest with AND)")
    for status in STATUS_FLAGS:
        group.add_argument(
            f"--{status}",
            dest="statuses",
            action="append_const",
            const=status,
            help=f"{status} runs" + (" (running, but the heartbeat stopped)" if status == "stale" else ""),
        )
    group.add_argument("--last", metavar="DURATION", help="started in the last DURATION: 30m, 3h, 2d, 1w")
    group.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="arg FIELD (dotted for nested args) equals VALUE (repeatable)",
    )
    group.add_argument("--sweep", metavar="KEY", help="runs of the sweep KEY")
    group.add_argument("--remote", action="store_true", help="include the runs in storage (other machines)")
    group.add_argument("--refresh", action="store_true", help="with --remote: re-read every run.json, no cache")


def register_ls(commands: Any) -> None:
    parser = commands.add_parser(
        "ls",
        help="list runs (filters: status, time, args, sweep; --remote)",
        description="List runs, oldest first: key, status, start, duration, synced, a few args.",
    )
    _add_filters(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--fix", action="store_true", help="with --stale: mark the stale runs killed")
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


def register_rm(commands: Any) -> None:
    parser = commands.add_parser(
        "rm",
        help="delete runs (local dir, MLflow run; --remote: storage too)",
        description="Delete runs by key or filter. Shows what will be deleted and asks (y/N) "
        "unless --force. Exit 0 when done or when a filter matches nothing, 1 when you answer "
        "no, 2 for a key that matches no run.",
    )
    parser.add_argument("keys", nargs="*", metavar="KEY", help="run keys or unique prefixes")
    _add_filters(parser)
    parser.add_argument("-f", "--force", action="store_true", help="do not ask")
    parser.set_defaults(func=_cmd_rm)


def register_result(commands: Any) -> None:
    parser = commands.add_parser("result", help="print a run's result (verified, unpickled)")
    parser.add_argument("key", metavar="KEY", help="run key or unique prefix")
    parser.set_defaults(func=_cmd_result)


def register_ui(commands: Any) -> None:
    parser = commands.add_parser("ui", help="start the MLflow UI on the configured tracking store")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    parser.set_defaults(func=_cmd_ui)


# --- ls -----------------------------------------------------------------------------------------


def _filter_from(args: argparse.Namespace) -> RunFilter:
    from phd_flow.query import RunFilter, parse_duration, time_bound

    where = {}
    for item in args.where:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ArgsError(f"--where {item!r}: write it as FIELD=VALUE, e.g. --where seed=0.")
        where[name.strip()] = value
    after = None
    if args.last:
        try:
            after = time_bound(parse_duration(args.last))
        except ArgsError as exc:
            raise ArgsError(f"--last {exc}") from None
    return RunFilter(
        prefix=args.prefix,
        statuses=frozenset(args.statuses or ()),
        after=after,
        where=where,
        sweep=args.sweep,
    )


def _select(context: Context, args: argparse.Namespace) -> Runs:
    """The runs the filters select; a corrupt run.json is a warning and the listing goes on."""
    from phd_flow.query import list_runs, matches_where

    run_filter = _filter_from(args)
    where, run_filter.where = run_filter.where, {}
    runs = list_runs(context.config, run_filter, remote=args.remote, refresh=args.refresh, warn=_warn)
    if not where:
        return runs
    selected = type(runs)(run for run in runs if matches_where(run.args, where))
    if not selected and runs:
        from phd_flow.tracking import flatten

        known = sorted({name for run in runs for name in flatten(run.args)})
        missing = [name for name in where if name not in known]
        if missing:
            _warn(f"no listed run has the arg {', '.join(missing)}; args are: {', '.join(known)}")
    return selected


def _cmd_ls(context: Context, args: argparse.Namespace) -> int:
    if args.fix and args.statuses != ["stale"]:
        raise ArgsError("--fix marks stale runs killed: use it as `ls --stale --fix`.")
    runs = _select(context, args)
    if args.fix:
        from phd_flow.query import mark_killed

        for run in runs:
            print(mark_killed(context.config, run))
        if not runs:
            print("No stale runs.")
        return 0
    if args.json:
        # one run per line: readable, and the C encoder (indent= would use the slow Python one)
        lines = ",\n".join("  " + json.dumps(run.to_dict(), default=str) for run in runs)
        print(f"[\n{lines}\n]" if runs else "[]")
        return 0
    _print_table(runs, with_where=args.remote)
    return 0


def _print_table(runs: Runs, with_where: bool) -> None:
    from phd_flow import _runs_view as view

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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --- show, compare, result ----------------------------------------------------------------------


def _cmd_show(context: Context, args: argparse.Namespace) -> int:
    from phd_flow import _runs_view as view
    from phd_flow.query import get_run

    config = context.config
    run = get_run(config, args.key)
    if run.where == "local":
        files = view.run_files(run.run_dir)
    else:
        from phd_flow.query import require_remote

        remote = require_remote(config)
        from phd_flow.storage.sync import MANIFEST

        listed = [(f.key.split("/", 1)[1], f.size) for f in remote.list(run.key)]
        files = [(name, size) for name, size in listed if not name.endswith(MANIFEST)]
    log: list[str] = []
    if run.state in ("failed", "killed", "stale") and args.lines > 0:
        log = view.tail(run.run_dir / "output.log", args.lines) if run.where == "local" else []
    for line in view.render_show(run, files, context.package, view.use_color(), log):
        print(line)
    return 0


def _cmd_compare(context: Context, args: argparse.Namespace) -> int:
    from phd_flow import _runs_view as view
    from phd_flow.query import arg_text, get_run
    from phd_flow.tracking import flatten

    config = context.config
    runs = [get_run(config, key) for key in args.keys]
    for number, run in enumerate(runs, 1):
        print(f"[{number}] {run.key}  {view.status_text(run.state, view.use_color())}")
    flat = [flatten(run.args) for run in runs]
    names = list(dict.fromkeys(name for args_ in flat for name in args_))
    differ = [n for n in names if len({arg_text(a.get(n, "-")) for a in flat}) > 1]
    same = [n for n in names if n not in differ]
    columns = ["", *(f"[{i}]" for i in range(1, len(runs) + 1))]
    rows = [[n, *(arg_text(a[n]) if n in a else "-" for a in flat)] for n in differ]
    metrics = [_final_metrics(config, run) for run in runs]
    metric_names = sorted({name for m in metrics for name in m})
    print()
    print("args that differ" if differ else "args: all the same")
    if differ:
        print(_indent(view.table(columns, rows)))
    if same:
        print("same in all: " + ", ".join(f"{n}={arg_text(flat[0][n])}" for n in same))
    print()
    print("final metrics" if metric_names else "metrics: none logged")
    if metric_names:
        metric_rows = [[n, *(f"{m[n]:.6g}" if n in m else "-" for m in metrics)] for n in metric_names]
        print(_indent(view.table(columns, metric_rows)))
    return 0


def _final_metrics(context_config: Any, run: Run) -> dict[str, float]:
    """The last logged value of each metric, from the run's metrics.jsonl."""
    from phd_flow.query import read_run_file

    raw = read_run_file(context_config, run, "metrics.jsonl") or b""
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


def _cmd_result(context: Context, args: argparse.Namespace) -> int:
    from phd_flow.query import load_result

    print(repr(load_result(args.key, context.config)))
    return 0


# --- rm -----------------------------------------------------------------------------------------


def _cmd_rm(context: Context, args: argparse.Namespace) -> int:
    from phd_flow import cli_rm

    return cli_rm.remove(context, args)


# --- ui -----------------------------------------------------------------------------------------


def _cmd_ui(context: Context, args: argparse.Namespace) -> int:
    import os
    import signal
    import socket
    import subprocess

    uri = context.config.tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"The tracking store is an MLflow server already: open {uri}")
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
