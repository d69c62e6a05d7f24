"""Selecting runs on the command line: the shared filter options of ``ls`` and ``rm``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from phd_flow.errors import ArgsError
from phd_flow.run.record import STATUS_CHOICES

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.runs.query import RunFilter, Runs


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prefix",
        nargs="?",
        metavar="PREFIX",
        help="only keys starting with PREFIX (e.g. a node name)",
    )
    group = parser.add_argument_group("filters (statuses combine with OR, the rest with AND)")
    for status in STATUS_CHOICES:
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


def _filter_from(args: argparse.Namespace) -> RunFilter:
    from phd_flow.runs.query import RunFilter, parse_duration, time_bound

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


def select(project: Project, args: argparse.Namespace) -> Runs:
    """The runs the filters select; a corrupt run.json is a warning and the listing goes on."""
    from phd_flow.runs.query import list_runs, matches_where

    run_filter = _filter_from(args)
    where, run_filter.where = run_filter.where, {}
    runs = list_runs(project, run_filter, remote=args.remote, refresh=args.refresh, warn=warn)
    if not where:
        return runs
    selected = type(runs)(run for run in runs if matches_where(run.args, where))
    if not selected and runs:
        from phd_flow.tracking import flatten

        known = sorted({name for run in runs for name in flatten(run.args)})
        missing = [name for name in where if name not in known]
        if missing:
            warn(f"no listed run has the arg {', '.join(missing)}; args are: {', '.join(known)}")
    return selected


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
