"""``run`` (one node run from the command line) and ``nodes`` (what a package defines)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from phd_flow.cli import EXIT_NOT_SYNCED, EXIT_OK

if TYPE_CHECKING:
    from phd_flow.project import Project


OPTIONS_TITLE = "phd_flow run options"
OPTIONS_NOTE = (
    "accepted before the node name (`run --key K NodeName ...`) always, and after it too "
    "unless one of the node's fields has the same name"
)


def register_run(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run a node: run [RUN OPTIONS] NodeName [--field value ...]",
        description="Run a node. `run NodeName --help` lists the node's arguments.",
        usage="%(prog)s [RUN OPTIONS] NodeName [--field value ...]",
        add_help=False,
    )
    parser.add_argument("node", nargs="?", help="node class name or dotted path")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, help="the node's arguments")
    parser.add_argument("-h", "--help", action="store_true", dest="help_requested")
    _add_run_options(parser, set(), with_args_file=True)
    parser.set_defaults(func=_cmd_run, run_parser=parser)


def _cmd_run(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.run.discovery import list_nodes, node_view, resolve_node

    if args.node is None or args.node.startswith("-"):
        if args.help_requested or args.node in ("-h", "--help"):
            args.run_parser.print_help()
            _print_node_list(list_nodes(project.package_name))
            return EXIT_OK
        args.run_parser.error("which node? usage: run NodeName [args]; see the `nodes` command")
    argv = list(args.node_args) + (["--help"] if args.help_requested else [])
    if "-h" in argv or "--help" in argv:
        # the help from the node's source: its module (and what it imports) is not loaded
        view = node_view(project.package_name, args.node)
        if view is not None:
            _parse_node_args(project, view, args, argv)  # exits with the help, or with a usage error
    node_cls = resolve_node(project.package_name, args.node)
    parsed = _parse_node_args(project, node_cls, args, argv)
    options = _run_options(args, parsed)
    _check_rerun(project, options.rerun)
    node = node_cls(parsed.args, config=project, options=options)
    node.run()
    if node.kill_signal is not None:
        # The signal came after the run completed (during the final sync, which was finished):
        # the run stays `completed`, but whoever sent it (scancel, a sweep's Ctrl-C) learns it.
        return 128 + int(node.kill_signal)
    sync_state = node.record.data.get("sync", {}).get("state")
    return EXIT_NOT_SYNCED if sync_state == "not_synced" else EXIT_OK


def _parse_node_args(project: Project, node_cls: Any, args: argparse.Namespace, argv: list[str]) -> Any:
    """The node's fields and the run options after the node name, parsed (exits 2 on bad input,
    0 after printing ``--help``: the node's fields first, phd_flow's run options after)."""
    from phd_flow.run.args import option_strings, polish_help

    parser = node_cls.argument_parser(prog=f"python -m {project.package_name} run {node_cls.__name__}")
    _add_run_options(parser, option_strings(parser), with_args_file=False)
    polish_help(parser)
    return node_cls.parse_with(parser, argv, args.pf_args_file)


def _add_run_options(parser: Any, taken: set[str], with_args_file: bool) -> None:
    """phd_flow's own options of `run`, each left out where a node field already has its name
    (``taken``: the node's option strings; empty before the node name)."""
    from phd_flow.run.args import same_option

    options: list[tuple[str, dict[str, Any]]] = [
        (
            "--load",
            dict(
                dest="pf_load",
                action="append",
                default=[],
                metavar="STAGE=KEY",
                help="load STAGE from run KEY (a key, key prefix, MLflow run id or 'latest')",
            ),
        ),
        (
            "--skip-log",
            dict(
                dest="pf_skip_log",
                action="append",
                default=[],
                metavar="STAGE",
                help="keep STAGE local: not synced, not logged to MLflow",
            ),
        ),
        (
            "--cache",
            dict(
                dest="pf_cache",
                action="store_const",
                const=True,
                default=None,
                help="reuse stages whose fingerprint matches an earlier run",
            ),
        ),
        ("--no-cache", dict(dest="pf_cache", action="store_const", const=False, help="recompute every stage")),
        (
            "--rerun",
            dict(
                dest="pf_rerun",
                action="append",
                default=[],
                metavar="NODE",
                help="run NODE again even where require() could reuse an earlier run",
            ),
        ),
        ("--key", dict(dest="pf_key", default=None, metavar="KEY", help="use this run key (resume)")),
        (
            "--wait-mlflow",
            dict(
                dest="pf_wait_mlflow",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="return once MLflow shows the whole run (default: [mlflow] wait; else fed in the background)",
            ),
        ),
        (
            "--sweep",
            dict(
                dest="pf_sweep",
                default=None,
                metavar="SWEEP",
                help="record this run as a point of sweep SWEEP (set by the sweep command)",
            ),
        ),
    ]
    if with_args_file:
        options.append(
            (
                "--args-file",
                dict(
                    dest="pf_args_file",
                    default=None,
                    metavar="FILE",
                    help="the node's arguments from FILE (.json, .toml, .yaml); options on the command line win",
                ),
            )
        )
    shadowed = [flag for flag, _ in options if same_option(flag, taken)]
    note = OPTIONS_NOTE
    if shadowed:
        note += f"; here {', '.join(shadowed)} are this node's fields: give phd_flow's before the node name"
    group = parser.add_argument_group(OPTIONS_TITLE, f"{note}.")
    for flag, kwargs in options:
        if flag not in shadowed:
            group.add_argument(flag, **kwargs)


def _run_options(before: argparse.Namespace, after: argparse.Namespace) -> Any:
    """RunOptions from the options given before the node name and after it (after wins)."""
    from phd_flow.errors import ArgsError
    from phd_flow.keys import check_run_key
    from phd_flow.run.node import RunOptions

    def merged(name: str) -> Any:
        later = getattr(after, name, None)
        earlier = getattr(before, name, None)
        if isinstance(earlier, list):
            return [*earlier, *(later or [])]
        return later if later is not None else earlier

    key = merged("pf_key")
    if key is not None:
        check_run_key(key, "--key")
    load = {}
    for item in merged("pf_load"):
        stage, sep, source = item.partition("=")
        if not sep or not stage or not source:
            raise ArgsError(f"--load {item!r}: write it as STAGE=KEY, e.g. --load load_data=latest.")
        load[stage] = source
    sweep = merged("pf_sweep")
    return RunOptions(
        key=key,
        load=load,
        skip_log=list(merged("pf_skip_log")),
        cache=merged("pf_cache"),
        rerun=list(merged("pf_rerun")),
        sweep=sweep,
        tags={"phd_flow.sweep": sweep} if sweep else {},
        wait_mlflow=merged("pf_wait_mlflow"),
    )


def _check_rerun(project: Project, names: list[str]) -> None:
    """``--rerun NAME`` must name a node of the package: a typo would silently rerun nothing."""
    from phd_flow.errors import ArgsError, closest
    from phd_flow.run.discovery import node_names

    if not names:
        return
    known = node_names(project.package_name)
    for name in names:
        if name not in known:
            raise ArgsError(
                f"--rerun {name}: no node {name!r} in {project.package_name}.{closest(name, known)} "
                f"Its nodes: {', '.join(known) or 'none'}."
            )


def register_nodes(commands: Any) -> None:
    parser = commands.add_parser("nodes", help="list the nodes of this package")
    parser.set_defaults(func=_cmd_nodes)


def _cmd_nodes(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.run.discovery import list_nodes

    nodes = list_nodes(project.package_name)
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
