"""``gc``: remove old, failed or unwanted local runs; a dry run unless ``--yes``.

``python -m my_project gc --older-than 30d --status failed --node Train``

Criteria combine with AND (several ``--status`` with OR). A run that a kept run depends on is
never deleted, and the listing says which run holds it and how: a stage loaded from it
(``stages.<name>.loaded_from`` in the holder's run.json) or a child result reused through
``require()`` (``children[].reused``). Holding is transitive: what a held run holds is kept too.
Sweep records and runs that are still running are never collected. Deleting goes like ``rm``
(MLflow runs first, then the run directory); ``--purge`` deletes the MLflow runs for good.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from phd_flow.errors import ArgsError
from phd_flow.run.record import STATUS_CHOICES

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.runs.query import Run


def register_gc(commands: Any) -> None:
    """Add the ``gc`` command (see :data:`phd_flow.cli.COMMANDS`)."""
    parser = commands.add_parser(
        "gc",
        help="remove local runs by age, status and node (dry run unless --yes)",
        description="Remove local runs matching all the criteria (--status may repeat: any of them). "
        "Nothing is deleted without --yes: the default lists what would go. Runs that a kept run "
        "loaded a stage from or reused through require() are kept, with the run that holds them. "
        "Sweep records and running runs are never collected. Exit 0.",
    )
    parser.add_argument("--older-than", metavar="DURATION", help="started more than DURATION ago: 30m, 3h, 30d, 2w")
    parser.add_argument("--status", action="append", default=[], choices=STATUS_CHOICES, help="runs with this status")
    parser.add_argument("--node", action="append", default=[], metavar="NAME", help="runs of this node (class name)")
    parser.add_argument("--yes", action="store_true", help="really delete (default: only list)")
    parser.add_argument("--purge", action="store_true", help="delete the MLflow runs for good (see rm --purge)")
    parser.set_defaults(func=collect)


def collect(project: Project, args: argparse.Namespace) -> int:
    """The ``gc`` command."""
    from phd_flow.cli import rm

    if not (args.older_than or args.status or args.node):
        raise ArgsError("gc needs at least one of --older-than, --status, --node; it never removes everything.")
    candidates, kept = _partition(project, args)
    holders = holds(kept.values())
    held: dict[str, list[str]] = {}
    changed = True
    while changed:  # what a kept run holds is kept, and so on
        changed = False
        for key in list(candidates):
            why = holders.get(key)
            if why:
                held[key] = why
                run = candidates.pop(key)
                kept[key] = run
                for target, reasons in holds([run]).items():
                    holders.setdefault(target, []).extend(reasons)
                changed = True
    for key in sorted(held):
        print(f"kept  {key}: {'; '.join(held[key])}")
    if not candidates:
        print("No run to remove." if not held else "No run to remove: every match is held by a kept run.")
        return 0
    plans = [rm.plan_removal(run) for run in candidates.values()]
    total = sum(p.local_bytes for p in plans)
    from phd_flow.cli.render import size_text

    verb = "Removing" if args.yes else "Would remove"
    print(f"{verb} {len(plans)} run(s), {size_text(total)}:")
    for plan in plans:
        print(plan.describe(None, False))
    if not args.yes:
        print("Dry run: nothing deleted. Add --yes to delete them.")
        return 0
    failed = sum(not rm.delete_run(project, plan, None, purge=args.purge) for plan in plans)
    print(f"Deleted {len(plans) - failed} run(s)." + (f" {failed} could not be deleted fully." if failed else ""))
    return 1 if failed else 0


def _partition(project: Project, args: argparse.Namespace) -> tuple[dict[str, Run], dict[str, Run]]:
    """(runs matching the criteria, every other local run), by key."""
    from phd_flow.run.record import is_live
    from phd_flow.runs.query import list_runs, parse_duration

    cutoff = None
    if args.older_than:
        try:
            cutoff = datetime.now(timezone.utc) - parse_duration(args.older_than)
        except ArgsError as exc:
            raise ArgsError(f"--older-than {exc}") from None
    stale_after = project.config.runs.stale_after_seconds
    candidates: dict[str, Run] = {}
    kept: dict[str, Run] = {}
    for run in list_runs(project):
        if run.where == "remote":
            continue
        match = run.data.get("kind") != "sweep" and not is_live(run.run_dir, run.data, stale_after)
        match = match and (not args.status or run.state in args.status)
        match = match and (not args.node or run.node in args.node)
        if cutoff is not None:
            started = run.started_at
            match = match and started is not None and started < cutoff
        (candidates if match else kept)[run.key] = run
    return candidates, kept


def holds(runs: Iterable[Run]) -> dict[str, list[str]]:
    """``{held run key: ["<holder> loaded its stage 'x' from it", ...]}`` for ``runs``: the runs
    their stages were loaded from and the child runs they reused through ``require()``."""
    from phd_flow.run.record import RUN_FILE, RunRecord

    found: dict[str, list[str]] = {}
    for run in runs:
        records = [run.data]
        for child in sorted(run.run_dir.rglob(RUN_FILE)):  # a pipeline's children live inside it
            if child.parent != run.run_dir:
                try:
                    records.append(RunRecord.load(child.parent).data)
                except Exception:
                    continue
        for data in records:
            for stage, info in (data.get("stages") or {}).items():
                source = str(info.get("loaded_from") or "") if isinstance(info, dict) else ""
                target = source.split("/", 1)[0]
                if target and target != run.key:
                    found.setdefault(target, []).append(f"{run.key} loaded its stage {stage!r} from it")
            for child in data.get("children") or []:
                path = str(child.get("path") or "") if isinstance(child, dict) else ""
                target = path.replace("\\", "/").split("/", 1)[0]
                if child.get("reused") and target and target != run.key:
                    found.setdefault(target, []).append(f"{run.key} reused its {child.get('node')} result")
    return found
