"""``rm``: delete runs by key or filter, after showing what goes and asking.

What is deleted per run: the local run directory, its MLflow run (and its child runs' MLflow
runs; soft-deleted as MLflow does, restorable until ``mlflow gc``, or for good with ``--purge``),
with ``--remote`` its files in storage, and with ``--with-data`` the data it wrote through
``self.storage`` outside its run directory (every path below ``local_path`` named after its key,
such as ``datasets/<key>``; in storage too with ``--remote``). MLflow goes first and the local
directory last, so a failure never leaves a run whose MLflow id is lost. A run that another
run's stage was loaded from is named in a loud warning before the question (locally the
loader's files are its own: links or copies). ``--remote`` refuses (exit 2, nothing deleted) to
delete the storage copy of a run whose files a kept run's loaded stage stores by reference
(run.json ``stages.<name>.stored_in``), naming them: the bytes exist once, in the run that made
them.

Exit codes: 0 done (or a filter matched nothing), 1 answered no, 2 a key matching no run or a
run still running (refused even with ``--force``; nothing is deleted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.cli.selection import add_filters
from phd_flow.errors import ArgsError, UserError
from phd_flow.keys import is_run_key
from phd_flow.run.record import RUN_FILE, RUNNING, STATUS_CHOICES

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.runs.query import Run


@dataclass
class Removal:
    """What deleting one run means."""

    run: Run
    local_files: int = 0
    local_bytes: int = 0
    remote_keys: list[str] = field(default_factory=list)
    mlflow_run_ids: list[str] = field(default_factory=list)
    #: The run key each MLflow run must carry in its ``phd_flow.key`` tag to be deleted.
    #: MLflow run id -> (the phd_flow key its tag must carry, the parent key a child's tag must carry)
    mlflow_keys: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    #: Its data outside the run directory: local relative path -> (files, bytes)
    data_local: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: ... and the relative paths of that data in storage (only looked up with --remote --with-data)
    data_remote: list[str] = field(default_factory=list)
    #: True when ``data_local``/``data_remote`` go too (``--with-data``)
    with_data: bool = False

    def describe(self, remote: str | None, delete_remote: bool) -> str:
        from phd_flow.cli.render import size_text

        parts = []
        if self.run.where != "remote":
            parts.append(f"local dir ({self.local_files} files, {size_text(self.local_bytes)})")
        if delete_remote and self.remote_keys:
            parts.append(f"{len(self.remote_keys)} files in {remote}")
        elif not delete_remote and self.run.data.get("sync", {}).get("state") == "synced":
            parts.append("(its copy in storage is kept: add --remote to delete it too)")
        if self.mlflow_run_ids:
            parts.append(f"MLflow run {', '.join(self.mlflow_run_ids)}")
        data = sorted({*self.data_local, *self.data_remote})
        if data and self.with_data:
            for rel in data:
                files, size = self.data_local.get(rel, (0, 0))
                here = f"{files} file{'s' if files != 1 else ''}, {size_text(size)}" if rel in self.data_local else ""
                there = f"in {remote}" if rel in self.data_remote else ""
                parts.append(f"data {rel} ({', '.join(filter(None, (here, there)))})")
        elif data:
            parts.append(f"(its data {', '.join(data)} is kept: add --with-data to delete it)")
        return f"  {self.run.key}  {self.run.state}: " + "; ".join(parts)


def remove(project: Project, args: argparse.Namespace) -> int:
    """The ``rm`` command."""
    runs = _targets(project, args)
    if not runs:
        print("No run matches: nothing deleted.")
        return 0
    _refuse_live(project, runs)
    if args.remote:
        _refuse_referenced(project, runs)
    storage_remote = project.require_remote() if args.remote else None
    plans = [plan_removal(run, storage_remote) for run in runs]
    _plan_data(project, plans, storage_remote if args.with_data else None, args.with_data)
    where = storage_remote.describe() if storage_remote is not None else None
    print(f"This deletes {len(plans)} run(s):")
    for plan in plans:
        print(plan.describe(where, args.remote))
    if any(plan.mlflow_run_ids for plan in plans):
        print(_mlflow_note(project, plans, args.purge))
    _warn_dependents(project, [r.key for r in runs])
    if not args.force and not _confirm(f"Delete {len(plans)} run(s)? [y/N] "):
        print("Nothing deleted.")
        return 1
    failed = sum(not delete_run(project, plan, storage_remote, purge=args.purge) for plan in plans)
    print(f"Deleted {len(plans) - failed} run(s)." + (f" {failed} could not be deleted fully." if failed else ""))
    return 1 if failed else 0


def _targets(project: Project, args: argparse.Namespace) -> list[Run]:
    from phd_flow.cli.selection import select
    from phd_flow.runs.query import get_run, refuse_child_runs

    has_filter = bool(args.statuses or args.last or args.where or args.sweep or args.prefix)
    if not args.keys and not has_filter:
        raise ArgsError("rm needs run keys or a filter (e.g. `rm --failed`); it never deletes everything.")
    # what goes is chosen by the runs' own run.json, never by an index (a listing cache: stale
    # after a resume elsewhere, or planted by anyone who can write to the bucket)
    args.refresh = args.refresh or args.remote
    if not args.keys:
        return list(select(project, args))
    runs = {run.key: run for run in (get_run(project, key) for key in args.keys)}
    refuse_child_runs(runs.values())
    only_remote = [key for key, run in runs.items() if run.where == "remote" and not args.remote]
    if only_remote:
        raise ArgsError(f"{', '.join(only_remote)} is only in storage: add --remote to delete it there.")
    if not has_filter:
        return list(runs.values())
    selected = {run.key for run in select(project, args)}
    return [run for key, run in runs.items() if key in selected]


def _refuse_live(project: Project, runs: list[Run]) -> None:
    """A live run is never deleted, not even with --force: its process would crash and its
    heartbeat would write into a deleted directory."""
    from phd_flow.run.record import describe_process, is_live

    stale_after = project.config.runs.stale_after_seconds
    live = [run for run in runs if run.where != "remote" and is_live(run.run_dir, run.data, stale_after)]
    if live:
        names = "; ".join(f"{run.key} ({describe_process(run.data, run.run_dir)})" for run in live)
        raise UserError(
            f"Not deleting a running run: {names}. Stop it first (Ctrl-C, `kill PID`, `scancel`), "
            "then rm it; nothing was deleted."
        )


def remote_holders(project: Project, keys: set[str]) -> dict[str, list[str]]:
    """``{run in keys: ["x/a.csv, x/b.csv of run <key>", ...]}``: the runs (local or remote, child runs
    included, ``keys`` left out) whose loaded stages store files by reference to the remote copy
    of a run in ``keys``."""
    from phd_flow.run.record import RUN_FILE, RunRecord
    from phd_flow.runs.query import list_runs

    found: dict[str, list[str]] = {}
    for run in list_runs(project, remote=True, refresh=True):
        if run.key in keys:
            continue
        records = [(run.key, run.data)]
        if run.where != "remote":
            for child in sorted(run.run_dir.rglob(RUN_FILE)):
                if child.parent != run.run_dir:
                    try:
                        records.append(
                            (child.parent.relative_to(run.run_dir.parent).as_posix(), RunRecord.load(child.parent).data)
                        )
                    except Exception:
                        continue
        else:  # child runs of a run only in the remote: the references files their pushes wrote
            records += _remote_child_refs(project, run.key)
        for name, data in records:
            for stage, info in (data.get("stages") or {}).items():
                stored = info.get("stored_in") if isinstance(info, dict) else None
                held: dict[str, list[str]] = {}
                for rel, holder in (stored or {}).items() if isinstance(stored, dict) else ():
                    top = str(holder).split("/", 1)[0]
                    if top in keys:
                        held.setdefault(top, []).append(f"{stage}/{rel}")
                for top, files in held.items():
                    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
                    found.setdefault(top, []).append(f"{', '.join(files[:3])}{more} of run {name}")
    return found


def _remote_child_refs(project: Project, key: str) -> list[tuple[str, dict[str, Any]]]:
    """``[(child run path, {"stages": {stage: {"stored_in": {file: holder}}}})]`` from the
    references files (:data:`~phd_flow.storage.facade.REFS`) of the runs inside remote run ``key``."""
    from phd_flow.storage.facade import REFS, parse_refs

    remote = project.require_remote()
    out: list[tuple[str, dict[str, Any]]] = []
    for item in remote.list(key):
        folder, _, name = item.key.rpartition("/")
        if name != REFS or folder == key:
            continue
        stages: dict[str, Any] = {}
        for rel, ref in parse_refs(remote.read_small(item.key), f"{remote.describe()}/{item.key}").items():
            stage, _, path = rel.partition("/")
            stages.setdefault(stage, {"stored_in": {}})["stored_in"][path] = ref.key
        out.append((folder, {"stages": stages}))
    return out


def _refuse_referenced(project: Project, runs: list[Run]) -> None:
    """``rm --remote`` never deletes bytes a kept run stores by reference (they exist once)."""
    held = remote_holders(project, {run.key for run in runs})
    if held:
        lines = "; ".join(f"{key} holds the bytes of {'; '.join(why)}" for key, why in sorted(held.items()))
        keep = " ".join(sorted(held))
        raise UserError(
            f"Not deleting the storage copy of {keep}: other runs loaded stages from it and store "
            f"those files once, by reference to it, so they would lose them ({lines}). Delete those "
            f"runs too (`rm --remote {keep} <their keys>`), or delete only the local copy (`rm "
            f"{keep}` without --remote); nothing was deleted."
        )


def plan_removal(run: Run, storage_remote: Any = None) -> Removal:
    """What deleting ``run`` deletes (its files, its and its children's MLflow runs)."""
    plan = Removal(run)
    if run.where != "remote":
        for path in run.run_dir.rglob("*"):
            if path.is_file():
                plan.local_files += 1
                plan.local_bytes += path.stat().st_size
        plan.mlflow_keys = _mlflow_ids(run.run_dir, run.data)
    elif (run.data.get("mlflow") or {}).get("run_id"):
        plan.mlflow_keys = {str(run.data["mlflow"]["run_id"]): (run.key, None)}
    plan.mlflow_run_ids = list(plan.mlflow_keys)
    if storage_remote is not None:
        # the run's own prefix: its name comes from where the record was found, never from it
        plan.remote_keys = [f.key for f in storage_remote.list(run.run_dir.name)]
    return plan


#: Below ``local_path``: MLflow's artifact stores, never a node's data.
_MLFLOW_DIRS = frozenset({"mlartifacts", "mlruns"})


def data_paths(local_path: Path, run_keys: set[str]) -> dict[str, list[str]]:
    """``{key: [relative path, ...]}``: what runs wrote through ``self.storage`` outside their run
    directories, found in one walk of ``local_path``: every directory or file named after a key
    in ``run_keys`` (``datasets/<key>``, ``models/<key>.pt``). Run directories, hidden folders
    (phd_flow's own) and MLflow's artifact stores are not searched, nor other runs' data folders."""
    found: dict[str, list[str]] = {}

    def owner(name: str) -> str | None:
        if name in run_keys:
            return name
        stem = name.split(".", 1)[0]
        return stem if stem in run_keys and name != stem else None

    if not local_path.is_dir():
        return found
    for top in sorted(local_path.iterdir()):
        name = top.name
        if name.startswith(".") or name in _MLFLOW_DIRS or name in run_keys:
            continue
        if not top.is_dir() or top.is_symlink():
            if (key := owner(name)) is not None:
                found.setdefault(key, []).append(name)
            continue
        if (top / RUN_FILE).exists() or is_run_key(name):
            continue  # a run directory, its children included
        for folder, dirs, files in os.walk(top):
            rel = Path(folder).relative_to(local_path).as_posix()
            for sub in sorted(dirs):
                if sub in run_keys:
                    found.setdefault(sub, []).append(f"{rel}/{sub}")
                if sub in run_keys or is_run_key(sub):
                    dirs.remove(sub)  # its data, or another run's: not searched further
            for file in sorted(files):
                if (key := owner(file)) is not None:
                    found.setdefault(key, []).append(f"{rel}/{file}")
    return found


def _remote_data_paths(remote: Any, key: str, local: list[str]) -> list[str]:
    """The paths of ``key``'s data in storage: those found locally that are there, and any
    ``<folder>/<key>`` below a top-level folder of the remote that is not a run."""
    candidates = set(local)
    for top in remote.list_dirs(""):
        if not (top.startswith(".") or top in _MLFLOW_DIRS or top == key or is_run_key(top)):
            candidates.add(f"{top}/{key}")
    return sorted(rel for rel in candidates if remote.stat(rel) is not None or any(True for _ in remote.list(rel)))


def _plan_data(project: Project, plans: list[Removal], storage_remote: Any, with_data: bool) -> None:
    """Fill in each plan's data outside its run directory (looked up in storage only when it
    goes too: ``storage_remote`` given)."""
    local_path = project.config.local_path
    found = data_paths(local_path, {plan.run.key for plan in plans})
    for plan in plans:
        plan.with_data = with_data
        for rel in found.get(plan.run.key, []):
            path = local_path / rel
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() and not path.is_symlink() else [path]
            sizes = [file.stat().st_size for file in files]
            plan.data_local[rel] = (len(sizes), sum(sizes))
        if storage_remote is not None:
            plan.data_remote = _remote_data_paths(storage_remote, plan.run.key, list(plan.data_local))


def _mlflow_note(project: Project, plans: list[Removal], purge: bool) -> str:
    from phd_flow.log import redact_url

    if purge:
        return "The MLflow runs are deleted for good (--purge): their artifacts and their rows in the store."
    uri = redact_url(project.config.tracking_uri())
    return (
        "The MLflow runs are soft-deleted, as MLflow does: restore them in MLflow's UI (or with "
        "`mlflow runs restore --run-id ID`) until `mlflow gc` purges them "
        f"(`mlflow gc --backend-store-uri {uri}`); --purge deletes them for good now."
    )


def _mlflow_ids(run_dir: Path, data: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """``{MLflow run id: (run key, parent key)}`` of the run and of the child runs inside its
    directory. A child's MLflow run is deleted only if its tags name it and its parent (below)."""
    from phd_flow.errors import CorruptRunError
    from phd_flow.run.record import RunRecord

    own = (data.get("mlflow") or {}).get("run_id")
    ids: dict[str, tuple[str, str | None]] = {str(own): (run_dir.name, None)} if own else {}
    for child in sorted(run_dir.rglob(RUN_FILE)):
        if child.parent == run_dir:
            continue
        try:
            run_id = (RunRecord.load(child.parent).data.get("mlflow") or {}).get("run_id")
        except (CorruptRunError, AttributeError):
            continue
        if run_id:
            ids[str(run_id)] = (child.parent.name, child.parent.parent.name)
    return ids


def _warn_dependents(project: Project, keys: list[str]) -> None:
    from phd_flow.runs.query import dependents

    for run, stage, source in dependents(project, keys):
        if not stage:  # reused through require(): its result came from the deleted run
            print(
                f"WARNING: run {run} reused {source} through require(), which this deletes: {run} "
                "stays, but the run it reused will be gone (a rerun recomputes it).",
                file=sys.stderr,
            )
            continue
        print(
            f"WARNING: run {run} loaded its stage {stage!r} from {source}, which this deletes: "
            f"{run} stays, but its stage provenance will point to a deleted run.",
            file=sys.stderr,
        )


def _confirm(question: str) -> bool:
    print(question, end="", flush=True)
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        print()
    return answer.strip().lower() in ("y", "yes")


def delete_run(project: Project, plan: Removal, storage_remote: Any, purge: bool = False) -> bool:
    """Delete MLflow runs (for good with ``purge``), then remote files, then the local dir;
    True when all went."""
    ok = True
    if plan.mlflow_run_ids:
        ok = _delete_mlflow(project, plan, purge)
    if storage_remote is not None and plan.remote_keys:
        try:
            storage_remote.delete(plan.remote_keys)
        except Exception as exc:
            print(
                f"error: {plan.run.key}: storage delete failed ({exc}); local files kept.",
                file=sys.stderr,
            )
            return False
    if plan.with_data and ok:
        for rel in sorted({*plan.data_local, *plan.data_remote}):
            try:  # the facade also drops the files from storage manifests above them
                project.storage.remove(rel, local=True, remote=rel in plan.data_remote)
            except Exception as exc:
                print(f"error: {plan.run.key}: its data {rel} was not deleted ({exc}); run dir kept.", file=sys.stderr)
                return False
    if plan.run.where != "remote" and ok:
        shutil.rmtree(plan.run.run_dir)
    return ok


def _delete_mlflow(project: Project, plan: Removal, purge: bool = False) -> bool:
    client = project.mlflow_client()
    from mlflow.exceptions import MlflowException

    uri = project.config.tracking_uri()
    for run_id, (key, parent) in plan.mlflow_keys.items():
        try:
            tags = client.get_run(run_id).data.tags
            tagged = tags.get("phd_flow.key")
            if tagged != key or (parent is not None and tags.get("phd_flow.parent_key") != parent):
                print(
                    f"error: {plan.run.key}: MLflow run {run_id} in {uri} belongs to "
                    f"{tagged or 'no phd_flow run'}, not to {key}: it is not deleted, and the run "
                    "directory is kept. Its record points at another MLflow run.",
                    file=sys.stderr,
                )
                return False
            client.delete_run(run_id)
            if purge:
                _purge_mlflow(client, run_id, uri)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                continue  # already gone: nothing to keep the local dir for
            print(
                f"error: {plan.run.key}: MLflow run {run_id} in {uri} was not deleted ({exc}); "
                "the run directory is kept so you can retry.",
                file=sys.stderr,
            )
            return False
    return True


def _purge_mlflow(client: Any, run_id: str, uri: str) -> None:
    """Delete a (soft-deleted) MLflow run for good: its artifacts, then its row in the tracking
    store (what ``mlflow gc --backend-store-uri URI --run-ids ID`` does). A store that cannot
    hard-delete (e.g. MLflow's REST server) keeps it soft-deleted: run ``mlflow gc`` there."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = client.get_run(run_id)
    try:
        repository: Any = get_artifact_repository(run.info.artifact_uri)
        repository.delete_artifacts()
    except Exception as exc:  # artifacts elsewhere (a server without delete): the row still goes
        print(f"warning: MLflow run {run_id}: its artifacts were not deleted ({exc}).", file=sys.stderr)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    hard_delete = getattr(store, "_hard_delete_run", None)
    if callable(hard_delete):
        hard_delete(run_id)
    else:
        print(
            f"warning: MLflow run {run_id} is deleted but stays in {uri} as deleted: this tracking "
            f"store cannot purge from here; run `mlflow gc --backend-store-uri <its database URI> "
            f"--run-ids {run_id}` where the store lives.",
            file=sys.stderr,
        )


def register_rm(commands: Any) -> None:
    parser = commands.add_parser(
        "rm",
        help="delete runs (local dir, MLflow run; --remote: storage too)",
        description="Delete runs by key or filter. Shows what will be deleted and asks (y/N) "
        "unless --force. Exit 0 when done or when a filter matches nothing, 1 when you answer "
        "no, 2 for a key that matches no run or a run that is still running (never deleted).",
    )
    parser.add_argument("keys", nargs="*", metavar="KEY", help="run keys or unique prefixes")
    add_filters(
        parser,
        prefix=False,  # KEY... takes every positional; `--where node=NAME` selects a node's runs
        statuses=tuple(s for s in STATUS_CHOICES if s != RUNNING),  # a running run is never deleted
        remote_help="delete the runs' copies in storage too (and include runs only there)",
    )
    parser.add_argument("-f", "--force", action="store_true", help="do not ask")
    parser.add_argument(
        "--with-data",
        action="store_true",
        help="also delete what the runs wrote through self.storage outside their run directories "
        "(paths below local_path named after their keys, e.g. datasets/<key>; in storage too with --remote)",
    )
    parser.add_argument(
        "--purge",
        action="store_true",
        help="delete the MLflow runs for good (artifacts and rows, like `mlflow gc`), not only mark them deleted",
    )
    parser.set_defaults(func=remove)
