"""The ``sweep`` command: a grid of runs of one node, locally or as a SLURM job array.

``python -m my_project sweep FitOLS --dataset d.csv --target y --grid seed=1,2,3``
"""

from __future__ import annotations

import argparse
import functools
import shlex
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
        "--executor",
        choices=("local", "process", "slurm"),
        default=None,
        help="where the points run: local (forked from a warm process), process (a new process per point) "
        "or slurm (default: [executor] kind)",
    )
    group.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help="points at a time: local processes or the SLURM array's parallelism",
    )
    group.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="slurm: any sbatch option (e.g. constraint=a100, gres=gpu:2); adds to [executor.slurm] extra",
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
    merged = argparse.Namespace(grid=[*args.grid, *later.grid], slurm_option=[*args.slurm_option, *later.slurm_option])
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
    from phd_flow.sweeps.executors import parse_slurm_option

    options = dict(parse_slurm_option(o) for o in opts.slurm_option)
    if opts.resume:
        if opts.grid or node_argv:
            raise ArgsError("--resume reruns a sweep as it was defined: drop --grid and node arguments.")
        return _resume(project, opts, options)
    kind = opts.executor or config.executor.kind
    max_parallel = _max_parallel(opts.max_parallel or config.executor.max_parallel)
    if options and kind != "slurm":
        raise ArgsError("--slurm-option is for SLURM sweeps: add --executor slurm (or [executor] kind = 'slurm').")
    if kind == "slurm":
        from phd_flow.sweeps.executors import check_slurm

        check_slurm(config)  # before anything is created or submitted
    sweep = _create(project, args.node, node_argv, opts.grid, kind, max_parallel, options)
    return _execute(project, sweep, sweep.points, kind, max_parallel, opts.wait)


def _max_parallel(value: int) -> int:
    if value < 1:
        raise ArgsError(f"--max-parallel {value}: give 1 or more.")
    return value


def _help(project: Project, args: argparse.Namespace, opts: argparse.Namespace) -> int:
    args.sweep_parser.print_help()
    if args.node is not None:
        from phd_flow.run.discovery import resolve_node

        print()
        resolve_node(project.package_name, args.node).argument_parser(prog=args.node).print_help()
    return 0 if opts.help_requested else 2


def _create(
    project: Project,
    node: str,
    node_argv: list[str],
    grid: list[str],
    kind: str,
    max_parallel: int,
    options: dict[str, Any],
) -> Sweep:
    from phd_flow.run.discovery import resolve_node
    from phd_flow.sweeps.grid import Sweep, parse_grid

    node_cls = resolve_node(project.package_name, node)
    axes = parse_grid(node_cls, node_argv, grid)  # raises before anything exists
    config = project.config
    executor: dict[str, Any] = {"kind": kind, "max_parallel": max_parallel}
    if kind == "slurm":
        from phd_flow.sweeps.executors import slurm_parameters

        executor["slurm"] = slurm_parameters(config.executor.slurm, max_parallel, f"{node_cls.__name__}-sweep", options)
        executor["max_requeues"] = config.executor.slurm.max_requeues
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


def _resume(project: Project, opts: argparse.Namespace, options: dict[str, Any]) -> int:
    """Run the points of a sweep that did not complete, on the executor the sweep recorded
    (with its SLURM parameters) unless ``--executor`` / ``--max-parallel`` / ``--slurm-option``
    say otherwise."""
    from phd_flow.run.record import COMPLETED, RUNNING
    from phd_flow.sweeps.executors import active_points, check_slurm
    from phd_flow.sweeps.grid import LOST, Sweep, point_status

    config = project.config
    sweep = Sweep.load(project, opts.resume)
    _refuse_downloaded(project, sweep.key)
    recorded = sweep.data.get("executor")
    recorded = recorded if isinstance(recorded, dict) else {}
    kind = opts.executor or recorded.get("kind") or config.executor.kind
    if kind not in ("local", "process", "slurm"):
        raise ArgsError(f"Sweep {sweep.key} records the executor {kind!r}: give --executor local, process or slurm.")
    saved_parallel = recorded.get("max_parallel")
    saved_parallel = saved_parallel if isinstance(saved_parallel, int) and not isinstance(saved_parallel, bool) else 0
    max_parallel = _max_parallel(opts.max_parallel or saved_parallel or config.executor.max_parallel)
    if options and kind != "slurm":
        raise ArgsError("--slurm-option is for SLURM sweeps: add --executor slurm.")
    params: dict[str, Any] | None = None
    if kind == "slurm":
        check_slurm(config)
        params = _resume_slurm_params(project, sweep, recorded, max_parallel, options)
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
            f"({done} completed, {len(live)} still running or queued) on {kind}.",
            flush=True,
        )
        if not todo:
            return 0 if done == len(sweep.points) else 1
        executor: dict[str, Any] = {**recorded, "kind": kind, "max_parallel": max_parallel}
        if params is not None:
            executor["slurm"] = params
        sweep.data["executor"] = executor
        sweep.save()
        return _execute_locked(project, sweep, todo, kind, max_parallel, opts.wait, params)


def _resume_slurm_params(
    project: Project, sweep: Sweep, recorded: dict[str, Any], max_parallel: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The SLURM parameters the sweep was submitted with (or, for a sweep that ran locally,
    ``[executor.slurm]``), with ``--slurm-option`` on top."""
    from phd_flow.sweeps.executors import apply_slurm_options, slurm_parameters

    saved = recorded.get("slurm")
    if isinstance(saved, dict) and saved:
        return apply_slurm_options({**saved, "slurm_array_parallelism": max_parallel}, options)
    return slurm_parameters(project.config.executor.slurm, max_parallel, f"{sweep.data['node']}-sweep", options)


def _execute(
    project: Project, sweep: Sweep, points: list[dict[str, Any]], kind: str, max_parallel: int, wait: bool
) -> int:
    with _driver_lock(sweep):
        return _execute_locked(project, sweep, points, kind, max_parallel, wait)


def _execute_locked(
    project: Project,
    sweep: Sweep,
    points: list[dict[str, Any]],
    kind: str,
    max_parallel: int,
    wait: bool,
    params: dict[str, Any] | None = None,
) -> int:
    from phd_flow.cli import main
    from phd_flow.errors import RunKilledError
    from phd_flow.run.record import COMPLETED
    from phd_flow.sweeps import executors
    from phd_flow.sweeps.grid import summary

    config = project.config
    if kind == "slurm":
        if params is None:
            saved = sweep.data.get("executor", {}).get("slurm")
            params = saved if isinstance(saved, dict) and saved else None
        ids = executors.submit_slurm(sweep, points, config=config, max_parallel=max_parallel, params=params)
        arrays = sorted({i.split("_")[0] for i in ids})
        print(
            f"Submitted sweep {sweep.key}: SLURM job array {', '.join(arrays)} ({len(ids)} tasks; "
            f"logs in {sweep.data['slurm_folder']}).",
            flush=True,
        )
        if not wait:
            print(f"Follow it with: python -m {project.package_name} sweep --status {sweep.key}")
            print(f"Run what did not complete with: {resume_command(project, sweep)}")
            return 0
        executors.start_feeder(config)  # ready when the first jobs' points end (they wait for it)
        counts = executors.wait_slurm(sweep, config)  # prints each end (with its error line)
    else:
        executors.start_feeder(config)  # imports mlflow while the points run, not after the first
        try:
            counts = executors.run_local(
                sweep,
                points,
                package=project.package_name,
                config=config,
                max_parallel=max_parallel,
                config_path=sweep.data.get("config_path"),
                entry=None if kind == "process" else functools.partial(main, project.package_name),
            )
        except (KeyboardInterrupt, RunKilledError):
            _print_end(project, sweep, summary(_counts(sweep)), interrupted=True)
            raise
        executors.wait_for_mlflow(config, [p["key"] for p in points])  # once per sweep, not per point
    executors.close_mlflow_sweep(config, sweep)
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
        print(f"Run the rest again with: {resume_command(project, sweep)}", file=sys.stderr, flush=True)


def resume_command(project: Project, sweep: Sweep) -> str:
    """The exact command that resumes ``sweep`` on the executor it recorded (``--resume`` alone
    does that too; the executor is spelled out so the line says where the points will run)."""
    executor = sweep.data.get("executor")
    kind = executor.get("kind") if isinstance(executor, dict) else None
    config = f" --config {shlex.quote(project.config_path)}" if project.config_path else ""
    command = f"python -m {project.package_name}{config} sweep --resume {sweep.key}"
    if kind == "slurm":
        command += " --executor slurm --wait"
    elif kind in ("local", "process"):
        command += f" --executor {kind}"
    return command


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
    from phd_flow.run.record import COMPLETED, FAILED, KILLED, RUNNING
    from phd_flow.sweeps.executors import point_error, slurm_queue
    from phd_flow.sweeps.grid import FINISHED, REQUEUED, STALE, SUBMITTED, Sweep, summary

    config = project.config
    sweep = Sweep.load(project, key)
    counts = sweep.refresh(config.local_path, config.runs.stale_after_seconds)
    queue = slurm_queue([p.get("slurm_job_id") or "" for p in sweep.points]) if sweep.data.get("slurm_job_ids") else {}
    queue = queue or {}
    shown: list[tuple[str, dict[str, Any]]] = []
    for point in sweep.points:
        status = point["status"]
        state = queue.get(point.get("slurm_job_id") or "")
        if status == KILLED and state is not None:  # SLURM requeued it: held or waiting to start again
            status = REQUEUED if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") else state.lower()
            counts[KILLED] -= 1
            counts[status] = counts.get(status, 0) + 1
        shown.append((status, point))
    overall = sweep.data["status"]
    if counts.get(REQUEUED):  # not over: SLURM starts the requeued tasks again
        overall = RUNNING if counts.get(RUNNING) else SUBMITTED
    print(f"{sweep.key}  {sweep.data['node']}  {overall}  ({summary(counts)})")
    errors: list[str] = []
    for status, point in shown:
        if status in (FAILED, KILLED):
            error = point_error(config.local_path / point["key"])
            if error:
                errors.append(f"  {point['key']}: {error}")
    for line in _points_table(config.local_path, shown):
        print(line)
    for line in errors:
        print(line)
    ended = all(status in FINISHED or status == STALE for status, _ in shown)
    if ended and any(status != COMPLETED for status, _ in shown):
        print(f"Run what did not complete with: {resume_command(project, sweep)}")
    return 0


def _points_table(local_path: Path, shown: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The points as a table: status, key, swept params, SLURM job, and the last value of each
    metric (from the point's run.json), the best value of each marked ``*`` (lower is better
    for loss-like names: :func:`phd_flow.runs.metrics.lower_is_better`), then a line per best."""
    from phd_flow.cli.render import clean, number_cells, table
    from phd_flow.errors import CorruptRunError
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.metrics import as_number, best_index, lower_is_better, recorded_summary

    summaries = []
    for _, point in shown:
        try:
            summaries.append(
                recorded_summary(RunRecord.load(local_path / point["key"]).data, local_path / point["key"])
            )
        except CorruptRunError:
            summaries.append({})
    names = sorted({name for summary in summaries for name in summary})
    params = list(dict.fromkeys(name for _, point in shown for name in point.get("params") or {}))
    jobs = any(point.get("slurm_job_id") for _, point in shown)
    headers = ["STATUS", "KEY", *params, *(["JOB"] if jobs else []), *(f"{name}  " for name in names)]
    columns, bests, notes = [], [], []
    for name in names:
        values = [as_number((summary.get(name) or {}).get("last")) for summary in summaries]
        lower = lower_is_better(name)
        best = best_index(values, lower) if len(shown) > 1 else None
        columns.append([c + (" *" if i == best else "  ") for i, c in enumerate(number_cells(values))])
        bests.append(best)
        if best is not None:
            point = shown[best][1]
            text = " ".join(f"{k}={v}" for k, v in (point.get("params") or {}).items())
            notes.append(f"best {name} ({'lowest' if lower else 'highest'}): {point['key']}  {text}")
    rows = []
    for index, (status, point) in enumerate(shown):
        point_params = point.get("params") or {}
        rows.append(
            [
                status,
                str(point["key"]),
                *(str(point_params.get(name, "-")) for name in params),
                *([str(point.get("slurm_job_id") or "-")] if jobs else []),
                *(column[index] for column in columns),
            ]
        )
    first = len(headers) - len(names)
    lines = ["  " + line for line in table(headers, rows, right=range(first, len(headers))).splitlines()]
    return lines + [clean(note) for note in notes]
