"""The command line: ``python -m my_project COMMAND ...`` via :func:`run_main`.

Only argparse and phd_flow's light modules are imported on the way to a command, so
``--help``, ``nodes`` and argument errors never pay for mlflow, boto3 or b2sdk.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

from phd_flow.errors import PhdFlowError, RunFailedError, RunKilledError, UserError

# command -> "module:register" ; each register(subparsers) adds its parser(s) with set_defaults(func=...)
COMMANDS: dict[str, str] = {
    "run": "phd_flow.cli.run:register_run",
    "nodes": "phd_flow.cli.run:register_nodes",
    "sync": "phd_flow.cli.storage:register_sync",
    "download": "phd_flow.cli.storage:register_download",
    "ls": "phd_flow.cli.runs:register_ls",
    "show": "phd_flow.cli.runs:register_show",
    "compare": "phd_flow.cli.runs:register_compare",
    "rm": "phd_flow.cli.rm:register_rm",
    "gc": "phd_flow.cli.gc:register_gc",
    "result": "phd_flow.cli.runs:register_result",
    "ui": "phd_flow.cli.runs:register_ui",
    "logs": "phd_flow.cli.logs:register_logs",
    "sweep": "phd_flow.cli.sweep:register_sweep",
    "optimize": "phd_flow.cli.optimize:register_optimize",
}

EXIT_OK, EXIT_FAILED, EXIT_NOT_SYNCED = 0, 1, 3


def build_parser(package: str) -> argparse.ArgumentParser:
    """The root parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {package}",
        description=f"Run and manage the phd_flow nodes of {package}.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $PHD_FLOW_CONFIG, else PROJECT_ROOT/config/default.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show DEBUG log lines on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for target in COMMANDS.values():
        module_name, func = target.split(":")
        getattr(importlib.import_module(module_name), func)(commands)
    return parser


def run_main(package: str, argv: Sequence[str] | None = None) -> None:
    """Entry point for ``my_project/__main__.py``: ``phd_flow.run_main("my_project")``.

    Exits with 0 (success), 1 (the run failed), 2 (bad input: one paragraph, no traceback),
    3 (the run completed but is not synced to the remote), 130/143 (interrupted).
    """
    code = main(package, argv)
    import gc

    gc.freeze()  # skip the final garbage collection of MLflow's objects: 0.8 s -> 0.07 s at exit
    sys.exit(code)


def main(package: str, argv: Sequence[str] | None = None) -> int:
    """Like :func:`run_main` but returns the exit code."""
    args = build_parser(package).parse_args(argv)
    from phd_flow.log import configure_cli_stderr

    configure_cli_stderr("DEBUG" if args.verbose else "INFO")
    from phd_flow.project import Project

    project = Project(package, args.config)
    func: Callable[[Project, argparse.Namespace], int] = args.func
    try:
        return func(project, args)
    except UserError as exc:
        _print_paragraph(f"error: {exc}")
        return exc.exit_code
    except RunFailedError as exc:
        _print_paragraph(f"error: {exc}")
        return EXIT_FAILED
    except (KeyboardInterrupt, RunKilledError) as exc:
        _print_paragraph(f"interrupted ({exc or 'SIGINT'}); the run is recorded as killed.")
        return 143 if isinstance(exc, RunKilledError) else 130
    except PhdFlowError as exc:  # e.g. storage still failing after its retries
        if args.verbose:
            traceback.print_exc()
        _print_paragraph(f"error: {exc} (`-v` shows the traceback)")
        return EXIT_FAILED


def _print_paragraph(text: str) -> None:
    from phd_flow.log import redact_url

    sys.stderr.flush()
    print(redact_url(text), file=sys.stderr)
