"""Selecting runs on the command line: the shared filter options of ``ls`` and ``rm``, the runs
``compare`` and ``plot`` take, and which way a metric is better."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from phd_flow.errors import ArgsError
from phd_flow.run.record import STATUS_CHOICES

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.runs.query import Run, RunFilter, Runs


def add_filters(
    parser: argparse.ArgumentParser,
    prefix: bool = True,
    statuses: tuple[str, ...] = STATUS_CHOICES,
    remote_help: str = "include the runs in storage (other machines)",
) -> None:
    """The filter options; ``prefix=False`` for a command whose own ``KEY...`` takes every
    positional (``rm``), ``statuses`` the status flags that make sense for the command."""
    if prefix:
        parser.add_argument(
            "prefix",
            nargs="?",
            metavar="PREFIX",
            help="only keys starting with PREFIX (e.g. a node name)",
        )
    else:
        parser.set_defaults(prefix=None)
    group = parser.add_argument_group("filters (statuses combine with OR, the rest with AND)")
    for status in statuses:
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
        metavar="FIELD OP VALUE",
        help="a condition on an arg (seed=1, 'lr<0.1', optim.lr>=0.01), a metric ('metrics.acc>=0.9') "
        "or status/node/host/duration; OP: = != < <= > >= (repeatable; quote < and >)",
    )
    group.add_argument("--sweep", metavar="KEY", help="runs of the sweep KEY (its key, a prefix, or its suffix)")
    group.add_argument("--remote", action="store_true", help=remote_help)
    group.add_argument("--refresh", action="store_true", help="with --remote: re-read every run.json, no cache")


def _filter_from(args: argparse.Namespace) -> RunFilter:
    from phd_flow.runs.query import RunFilter, parse_duration, time_bound
    from phd_flow.runs.where import parse_where

    where = parse_where(args.where)  # a malformed condition fails before anything is read
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
        sweeps=bool(getattr(args, "sweeps", False)),
    )


def select(project: Project, args: argparse.Namespace) -> Runs:
    """The runs the filters select; a corrupt run.json is a warning and the listing goes on."""
    from phd_flow.runs.query import list_runs
    from phd_flow.runs.where import RUN_FIELDS, is_missing, known_fields, matches_all

    run_filter = _filter_from(args)
    where, run_filter.where = run_filter.where, ()
    runs = list_runs(project, run_filter, remote=args.remote, refresh=args.refresh, warn=warn)
    if not where:
        return runs
    selected = type(runs)(run for run in runs if matches_all(run, where))
    selected.project = runs.project
    if not selected and runs:
        from phd_flow.runs.where import field_value

        missing = [c.field for c in where if all(is_missing(field_value(run, c.field)) for run in runs)]
        if missing:
            known = known_fields(runs)
            args_ = [n for n in known if n not in RUN_FIELDS and not n.startswith("metrics.")]
            metrics = [n for n in known if n.startswith("metrics.")]
            warn(
                f"no listed run has the arg {', '.join(missing)}; args are: {', '.join(args_) or 'none'}"
                f" (metrics: {', '.join(metrics) or 'none'}; also {', '.join(RUN_FIELDS)})"
            )
    return selected


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def add_direction(parser: argparse.ArgumentParser) -> None:
    """``--minimize NAME`` / ``--maximize NAME``: which way a metric is better."""
    parser.add_argument(
        "--minimize", action="append", default=[], metavar="METRIC", help="lower METRIC is better (repeatable)"
    )
    parser.add_argument(
        "--maximize", action="append", default=[], metavar="METRIC", help="higher METRIC is better (repeatable)"
    )


def compared_runs(project: Project, keys: list[str], where: list[str], sweep: str | None) -> list[Run]:
    """The runs named by ``keys`` (prefixes) and/or selected by ``--sweep``/``--where``."""
    from phd_flow.runs.query import RunFilter, get_run, list_runs
    from phd_flow.runs.where import matches_all, parse_where

    conditions = parse_where(where)
    if keys:
        runs = [get_run(project, key) for key in keys]
        if sweep:
            from phd_flow.runs.query import sweep_matches

            runs = [run for run in runs if sweep_matches(str(run.data.get("sweep") or ""), sweep)]
        runs = [run for run in runs if matches_all(run, conditions)]
    elif sweep or conditions:
        runs = list(list_runs(project, RunFilter(where=conditions, sweep=sweep)))
    else:
        raise ArgsError("Name the runs: KEY... (keys or unique prefixes), or --sweep KEY, or --where FIELD OP VALUE.")
    if not runs:
        raise ArgsError("No run matches: nothing to compare (`ls` with the same filters shows what there is).")
    return runs
