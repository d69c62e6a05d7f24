"""The ``sweep`` command: a grid of runs of one node, locally or as a SLURM job array.

``python -m my_project sweep FitOLS --dataset d.csv --target y --grid seed=1,2,3``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.errors import ArgsError, UserError

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.sweeps.grid import Sweep

DESCRIPTION = """\
Run NODE once per point of the cartesian product of the --grid values. Each point is a normal
run (own key, directory, MLflow run tagged phd_flow.sweep=<SWEEP KEY>); the sweep itself is a
record <local_path>/Sweep_.../run.json with every point's key and status. Grid values are
parsed with the node's argument types, so a bad value fails before anything runs.

examples:
  sweep FitOLS --dataset data/diabetes.csv --target target --grid seed=1,2,3
  sweep FitOLS --dataset d.csv --target y --grid seed=1,2,3 --executor slurm --wait
  sweep --status Sweep_2026      (progress; keys may be abbreviated)
  sweep --resume Sweep_2026      (run the points that did not complete, with the same keys)
"""


def register_sweep(commands: Any) -> None:
    """Add the ``sweep`` command (see :data:`phd_flow.cli.COMMANDS`)."""
    parser = commands.add_parser(
        "sweep",
        help="run a node over a grid of arguments (local processes or a SLURM array)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("node", nargs="?", help="node class name or dotted path")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, help="the node's fixed arguments")
    _add_options(parser)
    parser.set_defaults(func=_cmd_sweep, sweep_parser=parser)


def _add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sweep options")
    group.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2,...",
        help="values of one argument; several --grid make a cartesian product",
    )
    group.add_argument(
        "--executor", choices=("local", "slurm"), default=None, help="where the points run (default: [executor] kind)"
    )
    group.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help="points at a time: local processes or the SLURM array's parallelism",
    )
    group.add_argument("--wait", action="store_true", help="slurm: follow the sweep until every point ended")
    group.add_argument("--resume", metavar="SWEEP", help="run the points of SWEEP that did not complete")
    group.add_argument("--status", metavar="SWEEP", help="show the points of SWEEP and their status")
    group.add_argument("-h", "--help", action="store_true", dest="help_requested", help="show this help")


def _options(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Sweep options given after NODE (argparse's REMAINDER swallowed them) merged with those
    given before it; the rest are the node's own arguments."""
    inner = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_options(inner)
    later, node_argv = inner.parse_known_args(list(args.node_args))
    merged = argparse.Namespace(grid=[*args.grid, *later.grid])
    for name in ("executor", "max_parallel", "resume", "status"):
        setattr(merged, name, getattr(later, name) if getattr(later, name) is not None else getattr(args, name))
    merged.wait = args.wait or later.wait
    merged.help_requested = args.help_requested or later.help_requested
    return merged, node_argv


def _cmd_sweep(project: Project, args: argparse.Namespace) -> int:
    opts, node_argv = _options(args)
    if opts.help_requested or (args.node is None and not (opts.resume or opts.status)):
        return _help(project, args, opts)
    if args.node is not None and (opts.resume or opts.status):
        raise ArgsError("--resume and --status take a sweep key only: drop the node and its arguments.")
    config = project.config
    if opts.status:
        return _show(project, opts.status)
    kind = opts.executor or config.executor.kind
    max_parallel = opts.max_parallel or config.executor.max_parallel
    if max_parallel < 1:
        raise ArgsError(f"--max-parallel {max_parallel}: give 1 or more.")
    if kind == "slurm":
        from phd_flow.sweeps.executors import check_slurm

        check_slurm(config)  # before anything is created or submitted
    if opts.resume:
        if opts.grid or node_argv:
            raise ArgsError("--resume reruns a sweep as it was defined: drop --grid and node arguments.")
        return _resume(project, opts.resume, kind, max_parallel, opts.wait)
    sweep = _create(project, args.node, node_argv, opts.grid, kind, max_parallel)
    return _execute(project, sweep, sweep.points, kind, max_parallel, opts.wait)


def _help(project: Project, args: argparse.Namespace, opts: argparse.Namespace) -> int:
    args.sweep_parser.print_help()
    if args.node is not None:
        from phd_flow.run.discovery import resolve_node

        print()
        resolve_node(project.package_name, args.node).argument_parser(prog=args.node).print_help()
    return 0 if opts.help_requested else 2


def _create(project: Project, node: str, node_argv: list[str], grid: list[str], kind: str, max_parallel: int) -> Sweep:
    from phd_flow.run.discovery import resolve_node
    from phd_flow.sweeps.grid import Sweep, parse_grid

    node_cls = resolve_node(project.package_name, node)
    axes = parse_grid(node_cls, node_argv, grid)  # raises before anything exists
    config = project.config
    executor: dict[str, Any] = {"kind": kind, "max_parallel": max_parallel}
    if kind == "slurm":
        from phd_flow.sweeps.executors import slurm_parameters

        executor["slurm"] = slurm_parameters(config.executor.slurm, max_parallel, node_cls.__name__)
    config_path = str(Path(project.config_path).resolve()) if project.config_path else None
    sweep = Sweep.create(config, node_cls, node_argv, axes, executor, config_path)
    print(
        f"Sweep {sweep.key}: {len(sweep.points)} runs of {node_cls.__name__} "
        f"({kind}, at most {max_parallel} at a time) in {sweep.run_dir}",
        flush=True,
    )
    return sweep


def _refuse_downloaded(project: Project, key: str) -> None:
    """A sweep that came from the bucket is data: its points' arguments are not run here."""
    from phd_flow.storage.facade import DOWNLOADED

    mark = project.config.local_path / DOWNLOADED / key
    if mark.exists():
        raise UserError(
            f"Sweep {key} was downloaded from the remote storage, so its points (their arguments) "
            "are data from the bucket, not instructions to run here. Resume it on the machine that "
            f"created it; if you trust whoever can write to the bucket, delete {mark} and resume again."
        )


def _resume(project: Project, key: str, kind: str, max_parallel: int, wait: bool) -> int:
    from phd_flow.run.record import COMPLETED, RUNNING
    from phd_flow.sweeps.executors import active_points
    from phd_flow.sweeps.grid import LOST, Sweep, point_status

    config = project.config
    sweep = Sweep.load(project, key)
    _refuse_downloaded(project, sweep.key)
    with _driver_lock(sweep):
        sweep.refresh(config.local_path, config.runs.stale_after_seconds)
        live = active_points(sweep) if sweep.data.get("slurm_job_ids") else set()
        live |= {
            p["key"]
            for p in sweep.points
            if point_status(config.local_path / p["key"], LOST, config.runs.stale_after_seconds) == RUNNING
        }
        todo = [p for p in sweep.points if p["status"] != COMPLETED and p["key"] not in live]
        done = sum(p["status"] == COMPLETED for p in sweep.points)
        print(
            f"Resuming sweep {sweep.key}: {len(todo)} of {len(sweep.points)} runs to run "
            f"({done} completed, {len(live)} still running or queued).",
            flush=True,
        )
        if not todo:
            return 0 if done == len(sweep.points) else 1
        return _execute_locked(project, sweep, todo, kind, max_parallel, wait)


def _execute(
    project: Project, sweep: Sweep, points: list[dict[str, Any]], kind: str, max_parallel: int, wait: bool
) -> int:
    with _driver_lock(sweep):
        return _execute_locked(project, sweep, points, kind, max_parallel, wait)


def _execute_locked(
    project: Project, sweep: Sweep, points: list[dict[str, Any]], kind: str, max_parallel: int, wait: bool
) -> int:
    from phd_flow.errors import RunKilledError
    from phd_flow.run.record import COMPLETED
    from phd_flow.sweeps import executors
    from phd_flow.sweeps.grid import summary

    config = project.config
    if kind == "slurm":
        ids = executors.submit_slurm(sweep, points, config=config, max_parallel=max_parallel)
        arrays = sorted({i.split("_")[0] for i in ids})
        print(
            f"Submitted sweep {sweep.key}: SLURM job array {', '.join(arrays)} ({len(ids)} tasks; "
            f"logs in {sweep.data['slurm_folder']}).",
            flush=True,
        )
        if not wait:
            print(f"Follow it with: python -m {project.package_name} sweep --status {sweep.key}")
            return 0
        counts = executors.wait_slurm(sweep, config)
    else:
        try:
            counts = executors.run_local(
                sweep,
                points,
                package=project.package_name,
                config=config,
                max_parallel=max_parallel,
                config_path=sweep.data.get("config_path"),
            )
        except (KeyboardInterrupt, RunKilledError):
            _print_end(project, sweep, summary(_counts(sweep)), interrupted=True)
            raise
    _print_end(project, sweep, summary(counts))
    return 0 if set(counts) == {COMPLETED} else 1


def _counts(sweep: Sweep) -> dict[str, int]:
    counts: dict[str, int] = {}
    for point in sweep.points:
        counts[point["status"]] = counts.get(point["status"], 0) + 1
    return counts


def _print_end(project: Project, sweep: Sweep, text: str, interrupted: bool = False) -> None:
    from phd_flow.run.record import COMPLETED

    word = "interrupted" if interrupted else "finished"
    print(f"Sweep {sweep.key} {word}: {text}.", flush=True)
    if any(p["status"] != COMPLETED for p in sweep.points):
        print(
            f"Run the rest again with: python -m {project.package_name} sweep --resume {sweep.key}",
            file=sys.stderr,
            flush=True,
        )


@contextmanager
def _driver_lock(sweep: Sweep) -> Iterator[None]:
    """One driving process per sweep, so that no point is started twice at the same time."""
    import filelock

    lock = filelock.FileLock(str(sweep.run_dir / ".driver.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(
            f"Sweep {sweep.key} is being run by another `sweep` process right now; wait for it "
            "to end (or stop it) before resuming."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _show(project: Project, key: str) -> int:
    from phd_flow.sweeps.grid import Sweep, describe_point, summary

    config = project.config
    sweep = Sweep.load(project, key)
    counts = sweep.refresh(config.local_path, config.runs.stale_after_seconds)
    print(f"{sweep.key}  {sweep.data['node']}  {sweep.data['status']}  ({summary(counts)})")
    for point in sweep.points:
        job = f"  job {point['slurm_job_id']}" if point.get("slurm_job_id") else ""
        print(f"  {point['status']:<9} {point['key']}  {describe_point(point)}{job}")
    return 0
