"""``run`` (one node run from the command line) and ``nodes`` (what a package defines)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from phd_flow.cli import EXIT_NOT_SYNCED, EXIT_OK

if TYPE_CHECKING:
    from phd_flow.project import Project


def register_run(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run a node: run NodeName [--field value ...]",
        description="Run a node. `run NodeName --help` lists the node's arguments.",
        add_help=False,
    )
    parser.add_argument("node", nargs="?", help="node class name or dotted path")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, help="the node's arguments")
    parser.add_argument("-h", "--help", action="store_true", dest="help_requested")
    parser.set_defaults(func=_cmd_run, run_parser=parser)


def _cmd_run(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.run.discovery import find_nodes, resolve_node

    if args.node is None or args.node.startswith("-"):
        if args.help_requested or args.node in ("-h", "--help"):
            args.run_parser.print_help()
            _print_node_list(find_nodes(project.package_name))
            return EXIT_OK
        args.run_parser.error("which node? usage: run NodeName [args]; see the `nodes` command")
    node_cls = resolve_node(project.package_name, args.node)
    argv = list(args.node_args) + (["--help"] if args.help_requested else [])
    parser = node_cls.argument_parser(prog=f"python -m {project.package_name} run {node_cls.__name__}")
    _add_run_options(parser)
    parsed = parser.parse_args(argv)
    node = node_cls(parsed.args, config=project, options=_run_options(parsed))
    node.run()
    if node.kill_signal is not None:
        # The signal came after the run completed (during the final sync, which was finished):
        # the run stays `completed`, but whoever sent it (scancel, a sweep's Ctrl-C) learns it.
        return 128 + int(node.kill_signal)
    sync_state = node.record.data.get("sync", {}).get("state")
    return EXIT_NOT_SYNCED if sync_state == "not_synced" else EXIT_OK


def _add_run_options(parser: Any) -> None:
    group = parser.add_argument_group("phd_flow run options")
    group.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="STAGE=KEY",
        help="load STAGE from run KEY (a key, key prefix, MLflow run id or 'latest')",
    )
    group.add_argument(
        "--skip-log",
        action="append",
        default=[],
        metavar="STAGE",
        help="keep STAGE local: not synced, not logged to MLflow",
    )
    cache = group.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache",
        dest="cache",
        action="store_const",
        const=True,
        default=None,
        help="reuse stages whose fingerprint matches an earlier run",
    )
    cache.add_argument("--no-cache", dest="cache", action="store_const", const=False, help="recompute every stage")
    group.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="NODE",
        help="run NODE again even where require() could reuse an earlier run",
    )
    group.add_argument("--key", dest="run_key", default=None, metavar="KEY", help="use this run key (resume)")
    group.add_argument(
        "--sweep",
        dest="sweep_key",
        default=None,
        metavar="SWEEP",
        help="record this run as a point of sweep SWEEP (set by the sweep command)",
    )


def _run_options(parsed: argparse.Namespace) -> Any:
    from phd_flow.errors import ArgsError
    from phd_flow.keys import check_run_key
    from phd_flow.run.node import RunOptions

    if parsed.run_key is not None:
        check_run_key(parsed.run_key, "--key")
    load = {}
    for item in parsed.load:
        stage, sep, source = item.partition("=")
        if not sep or not stage or not source:
            raise ArgsError(f"--load {item!r}: write it as STAGE=KEY, e.g. --load load_data=latest.")
        load[stage] = source
    return RunOptions(
        key=parsed.run_key,
        load=load,
        skip_log=list(parsed.skip_log),
        cache=parsed.cache,
        rerun=list(parsed.rerun),
        sweep=parsed.sweep_key,
        tags={"phd_flow.sweep": parsed.sweep_key} if parsed.sweep_key else {},
    )


def register_nodes(commands: Any) -> None:
    parser = commands.add_parser("nodes", help="list the nodes of this package")
    parser.set_defaults(func=_cmd_nodes)


def _cmd_nodes(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.run.discovery import find_nodes

    nodes = find_nodes(project.package_name)
    if not nodes:
        print(f"No nodes in {project.package_name}: define a subclass of phd_flow.Node.")
        return EXIT_OK
    _print_node_list(nodes, file=sys.stdout)
    return EXIT_OK


def _print_node_list(nodes: dict[str, Any], file: Any = None) -> None:
    width = max((len(cls.__name__) for cls in nodes.values()), default=0)
    for dotted, cls in nodes.items():
        summary = (cls.description().splitlines() or [""])[0]
        print(f"  {cls.__name__:<{width}}  {summary}  ({dotted})".rstrip(), file=file or sys.stdout)
