"""Executors for sweeps: local processes, or a SLURM job array through submitit.

* ``local`` (warm): the driver imports the node's module and phd_flow's run machinery once and
  forks one child per point, which runs the point through the CLI's own entry point
  (``run --key <KEY> --sweep <SWEEP> <Node> ...``), so points are isolated like separate runs.
* ``process``: one ``python -m <package> run --key <KEY> --sweep <SWEEP> <Node> ...`` process
  per point (each pays the interpreter's and MLflow's start-up).
* Both: at most ``max_parallel`` at a time; Ctrl-C (or SIGTERM) is forwarded to the running
  points, which record ``killed``; points not started yet are marked ``killed`` in the sweep so
  ``--resume`` runs them.
* ``slurm``: submitit's ``AutoExecutor`` + ``map_array``; each array task runs its point in
  process through :class:`PointJob`, which follows submitit's checkpoint protocol: on SLURM's
  timeout/preemption signal the job is requeued with the same point, so the run keeps its key
  and directory and the node sees ``self.resumed``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import typing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from phd_flow import keys, reuse
from phd_flow.errors import ConfigError, RunKilledError, UserError, closest
from phd_flow.log import logger
from phd_flow.run.record import COMPLETED, KILLED, RUNNING, RunRecord, utcnow
from phd_flow.sweeps.grid import FINISHED, LOST, PENDING, STALE, SUBMITTED, Sweep, describe_point

if typing.TYPE_CHECKING:
    from phd_flow.config import Config, SlurmConfig
    from phd_flow.run.node import Node

Printer = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class PointSpec:
    """Everything a process needs to run one sweep point (picklable, for SLURM jobs)."""

    module: str  # the node's module, e.g. my_project.fit_ols
    qualname: str  # the node class inside it
    argv: tuple[str, ...]  # the node's arguments
    key: str  # the pre-assigned run key
    sweep: str  # the sweep key
    project_root: str
    config_path: str | None = None

    def node_class(self) -> type[Node[Any, Any]]:
        """Import the node class (the project root goes on sys.path if needed)."""
        if self.project_root not in sys.path:
            sys.path.insert(0, self.project_root)
        module = importlib.import_module(self.module)
        return typing.cast("type[Node[Any, Any]]", functools.reduce(getattr, self.qualname.split("."), module))

    def build(self) -> Node[Any, Any]:
        """The node, ready to ``run()`` with the point's key and sweep tag."""
        from phd_flow.config import load_config
        from phd_flow.run.node import RunOptions

        node_cls = self.node_class()
        config = load_config(Path(self.project_root), self.config_path)
        # wait: a SLURM job's processes die with it, and a sweep is fed through one feeder
        options = RunOptions(key=self.key, sweep=self.sweep, tags={"phd_flow.sweep": self.sweep}, wait_mlflow=True)
        return node_cls(node_cls.parse_argv(list(self.argv)), config=config, options=options)


def point_specs(sweep: Sweep, points: Sequence[dict[str, Any]], project_root: Path) -> list[PointSpec]:
    """One :class:`PointSpec` per point of ``sweep``."""
    module, _, qualname = _split_class(sweep.data["node_class"])
    return [
        PointSpec(
            module, qualname, tuple(p["argv"]), p["key"], sweep.key, str(project_root), sweep.data.get("config_path")
        )
        for p in points
    ]


def _split_class(dotted: str) -> tuple[str, str, str]:
    """``pkg.mod.Class`` -> (``pkg.mod``, ``.``, ``Class``), trying the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return module, ".", ".".join(parts[cut:])
    raise UserError(f"Cannot import the node class {dotted}: is the package on the Python path?")


# --- local --------------------------------------------------------------------------------------

#: ``[executor] kind`` values that run points on this machine: ``local`` forks each point from a
#: warm driver, ``process`` starts a new interpreter per point.
LOCAL_KINDS = ("local", "process")
#: phd_flow modules every point imports: the warm driver imports them once, before forking.
_WARM_MODULES = (
    "phd_flow.run.lifecycle",
    "phd_flow.run.active",
    "phd_flow.run.result",
    "phd_flow.run.repro",
    "phd_flow.tracking",
    "phd_flow.storage.facade",
)
POLL = 0.01  # seconds between two looks at the running points

#: Runs one point's CLI arguments (``run --key K --sweep S Node ...``) and returns the exit code:
#: ``phd_flow.cli.main`` bound to the package (the same entry point as ``python -m pkg``).
Entry = Callable[[list[str]], int]


class _Handle(typing.Protocol):
    """What the driver needs of a running point: ``subprocess.Popen`` or :class:`_Forked`."""

    returncode: int | None

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass
class _Started:
    point: dict[str, Any]
    proc: _Handle
    log: Path
    started: float


def run_local(
    sweep: Sweep,
    points: Sequence[dict[str, Any]],
    *,
    package: str,
    config: Config,
    max_parallel: int,
    config_path: str | None = None,
    out: Printer = _print,
    entry: Entry | None = None,
) -> dict[str, int]:
    """Run ``points`` on this machine, ``max_parallel`` at a time; returns status counts.

    With ``entry`` (the ``local`` executor) this process imports the node's module (and
    phd_flow's run machinery) once and forks one child per point, which runs
    ``entry(["run", "--key", KEY, ...])``; without it (``process``) each point is a new
    ``python -m <package> run ...`` process. Either way a point is its own process, session
    and exit code, with its output in ``<sweep dir>/logs/<key>.log``.

    Raises ``KeyboardInterrupt`` / :class:`RunKilledError` after stopping the running points
    (they record ``killed``) and marking the points not started ``killed`` in the sweep.
    """
    logs = sweep.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    todo = deque(points)
    running: dict[str, _Started] = {}
    total, finished = len(points), 0
    live = _Live(total, on=out is _print and sys.stdout.isatty())
    previous = _raise_on_sigterm()
    # warm: every point runs the code the driver imported, so every point's fingerprint is of the
    # files as the driver read them at import time, not as they are when the point starts
    pin = reuse.pinned() if entry is not None else contextlib.nullcontext()
    pin.__enter__()
    try:
        if entry is not None and todo:
            warm_up(sweep, config)
        while todo or running:
            for key, started in list(running.items()):
                if started.proc.poll() is None:
                    continue
                del running[key]
                finished += 1
                status = _finished_status(config, started)
                sweep.set_status([key], status)
                live.clear()
                out(_progress(finished, total, status, started) + live.eta_text(finished))
            while todo and len(running) < max_parallel:
                point = todo.popleft()
                argv = _point_argv(point, sweep, config_path)
                log = logs / f"{keys.run_name(point['key'])}.log"  # a run key: never a path
                with _signals_deferred() as mask:  # a Ctrl-C now would leave a point nobody stops
                    proc = _spawn(package, argv, log) if entry is None else _Forked.start(entry, argv, log, mask)
                    running[point["key"]] = _Started(point, proc, log, time.monotonic())
                sweep.set_status([point["key"]], RUNNING)
            if running:
                live.show(finished, len(running))
                time.sleep(POLL)
        live.clear()
    except (KeyboardInterrupt, RunKilledError):
        live.clear()
        _stop(list(running.values()))
        not_started = [p["key"] for p in todo]
        sweep.set_status(not_started, KILLED)
        sweep.refresh(config.local_path, config.runs.stale_after_seconds)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        pin.__exit__(None, None, None)
    return sweep.refresh(config.local_path, config.runs.stale_after_seconds)


def _point_argv(point: dict[str, Any], sweep: Sweep, config_path: str | None) -> list[str]:
    """The CLI arguments of one point (after ``python -m <package>``).

    A local point does not wait for MLflow: the one feeder of the store takes the points as they
    end, and the sweep waits once, at its end, for all of them (:func:`wait_for_mlflow`)."""
    argv = ["--config", config_path] if config_path else []
    # run options before the node name: a field of the node may have the same name (--key)
    run = ["run", "--key", point["key"], "--sweep", sweep.key, "--no-wait-mlflow"]
    return [*argv, *run, sweep.data["node_class"], *point["argv"]]


def wait_for_mlflow(config: Config, keys_: Sequence[str], out: Printer = _print) -> None:
    """Return once MLflow has every point of ``keys_`` whole (the feeder fed them; or, with no
    feeder running, this process feeds them). Ctrl-C stops the wait, not the feeding."""
    if not config.mlflow.enabled:
        return
    from phd_flow import feeder

    uri = config.tracking_uri()
    queue = feeder.queue_dir(config.local_path, uri)
    pending = [k for k in keys_ if _mlflow_state(config.local_path / k) == feeder.PENDING]
    if not pending:
        return
    out(f"Waiting for MLflow to have the {len(pending)} point(s) (the feeder logs to {queue / 'feeder.log'}).")
    for key in pending:
        feeder.wait_for(queue, config.local_path / key, key, uri, config.mlflow.telemetry)


def start_feeder(config: Config) -> None:
    """Start the store's MLflow feeder as the sweep starts its points: it imports mlflow and opens
    the store meanwhile, so the first points' MLflow runs (and SLURM jobs waiting for them) do
    not wait for that. It leaves once idle, like any feeder; a point starts another if needed."""
    if not config.mlflow.enabled:
        return
    from phd_flow import feeder

    uri = config.tracking_uri()
    queue = feeder.queue_dir(config.local_path, uri)
    try:
        queue.mkdir(parents=True, exist_ok=True)
        feeder.ensure_feeder(queue, uri, config.mlflow.telemetry)
    except OSError as exc:  # only an early start is lost: every point queues itself anyway
        logger.debug(f"No early MLflow feeder ({exc}).")


def close_mlflow_sweep(config: Config, sweep: Sweep) -> None:
    """Once every point of ``sweep`` ended: its MLflow run (the parent its points are nested
    under) gets the sweep's final status. Nothing when MLflow is off or no point reached it."""
    from phd_flow.sweeps.grid import mlflow_close_status

    status = mlflow_close_status({p["status"] for p in sweep.points})
    if not config.mlflow.enabled or status is None:
        return
    from phd_flow import feeder

    uri, experiment = config.tracking_uri(), config.experiment_name(sweep.data.get("package"))
    try:
        if "mlflow" in sys.modules:  # imported here already (`sync`): closed directly
            feeder.close_sweep_run(config.local_path, sweep.key, uri, experiment, status)
        else:  # by the feeder, which has mlflow imported: this process does not import it (~2 s)
            feeder.request_sweep_close(config.local_path, sweep.key, uri, experiment, status, config.mlflow.telemetry)
    except Exception as exc:  # the points are whole; `sweep --status` or `sync` closes it later
        logger.warning(f"The MLflow run of sweep {sweep.key} could not be closed ({type(exc).__name__}: {exc}).")


def _mlflow_state(run_dir: Path) -> str | None:
    try:
        section = RunRecord.load(run_dir).data.get("mlflow")
    except Exception:  # a point that never wrote its record, or a torn one: nothing to wait for
        return None
    return section.get("state") if isinstance(section, dict) else None


def _spawn(package: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """The ``process`` executor: a new interpreter for the point."""
    with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", package, *argv], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def warm_up(sweep: Sweep, config: Config) -> None:
    """Import, once and in the driver, what every point would import: the node's module,
    phd_flow's run machinery; and scan the installed distributions (reproducible.json) once.
    Not mlflow: a point never imports it before ``_run`` (the store's feeder feeds MLflow), and a
    module that imported mlflow would make every point open its MLflow run itself.

    Only modules: no connection, file, thread or lock is opened here, so nothing stateful is
    inherited by a forked point.
    """
    module, _, name = _split_class(sweep.data["node_class"])  # imports the node's module
    node_cls = operator.attrgetter(name)(sys.modules[module])
    reuse.code_of(node_cls)  # read (and pinned) now, with the code just imported: see run_local
    for name in _WARM_MODULES:
        importlib.import_module(name)
    from phd_flow.run import repro

    repro.packages()  # the installed distributions, scanned once for every point's reproducible.json
    if threading.active_count() > 1:
        names = ", ".join(sorted(t.name for t in threading.enumerate() if t is not threading.current_thread()))
        logger.warning(
            f"Threads run in the sweep process before its points are forked ({names}): a point "
            "gets none of them, and may hang on a lock one of them held. If points hang, start "
            "such threads in _run, or use --executor process."
        )
    gc.freeze()  # what the driver holds is never collected in a point: fewer pages copied on write


class _Forked:
    """One point in a child forked from the warm driver: a ``Popen``-like handle.

    The child starts its own session (like ``start_new_session``: a terminal's Ctrl-C reaches
    only the driver, which forwards SIGINT), writes stdout and stderr to the point's log, gets
    Python's default signal handlers back, reseeds the random generators it inherited, runs
    ``entry(argv)`` and leaves with ``os._exit`` (the atexit handlers the point registered run;
    the driver's handlers and buffers and the interpreter's teardown do not).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, entry: Entry, argv: list[str], log: Path, mask: set[int | signal.Signals]) -> _Forked:
        """Fork the point; call with SIGINT and SIGTERM blocked (``mask`` is the mask to
        restore), so that the driver's SIGTERM handler never runs in a point."""
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()  # or the child writes the driver's pending output again
        try:
            pid = os.fork()
            if pid == 0:
                _child(entry, argv, fd, mask)
        finally:
            os.close(fd)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(POLL)
        return typing.cast(int, self.returncode)


def _child(entry: Entry, argv: list[str], fd: int, mask: set[int | signal.Signals]) -> typing.NoReturn:
    """The forked point: never returns to the driver's code."""
    code = 1
    try:
        os.setsid()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        sys.argv = [sys.argv[0], *argv]  # what `python -m <package> run ...` would have (run.json's command)
        atexit._clear()  # the driver's exit handlers are the driver's (one may delete what it shares)
        _reseed()
        code = entry(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # the handlers the point registered, as a normal exit runs them
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reseed() -> None:
    """Fresh seeds for global generators a point inherited from the driver (``random`` reseeds
    itself at fork), as a new process would have: numpy's and torch's, when imported."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):
            numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.seed()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[set[int | signal.Signals]]:
    """Hold SIGINT and SIGTERM (delivered when the block ends); yields the mask to restore."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield previous
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Live:
    """The live ``[done/total] N running  ETA ...`` line of a local sweep: on a terminal only,
    redrawn in place at most once a second and cleared before each finished point's line. The
    ETA is the remaining points at the pace of the points finished so far (parallelism counted)."""

    def __init__(self, total: int, on: bool) -> None:
        self.total, self.on = total, on
        self.begun = time.monotonic()
        self.drawn_at = 0.0
        self.drawn = False

    def eta_text(self, done: int) -> str:
        if not done or done >= self.total:
            return ""
        left = (time.monotonic() - self.begun) / done * (self.total - done)
        minutes, seconds = divmod(round(left), 60)
        hours, minutes = divmod(minutes, 60)
        return "  ETA " + (
            f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
        )

    def show(self, done: int, running: int) -> None:
        now = time.monotonic()
        if not self.on or now - self.drawn_at < 1.0:
            return
        self.drawn_at, self.drawn = now, True
        eta = self.eta_text(done) or ("  ETA ?" if done < self.total else "")
        elapsed = round(now - self.begun)
        sys.stdout.write(f"\r\x1b[K[{done}/{self.total}] {running} running, {elapsed} s elapsed{eta}")
        sys.stdout.flush()

    def clear(self) -> None:
        if self.drawn:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self.drawn = False
            self.drawn_at = 0.0


def _finished_status(config: Config, started: _Started) -> str:
    from phd_flow.sweeps.grid import point_status

    run_dir = config.local_path / started.point["key"]
    status = point_status(run_dir, LOST, config.runs.stale_after_seconds)
    if status == RUNNING:  # the process is gone but never wrote its final status (SIGKILL, a crash)
        _mark_dead(run_dir, f"the point's process ended ({_exit_reason(started.proc.returncode)})")
        return KILLED
    return status


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _progress(done: int, total: int, status: str, started: _Started) -> str:
    seconds = time.monotonic() - started.started
    line = f"[{done}/{total}] {status:<9} {started.point['key']}  {describe_point(started.point)}  ({seconds:.1f} s)"
    if status != COMPLETED:
        line += f"\n    {_last_error(started.log, started.proc.returncode)} (log: {started.log})"
    return line


def _last_error(log: Path, code: int | None = None) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith(("error:", "interrupted"))]
    if not errors and code not in (None, 0, 1, 130, 143):  # a crash: say how the process ended
        return f"the process ended without recording the run's end ({_exit_reason(code)})"
    return (errors or lines or ["no output"])[-1]


def _raise_on_sigterm() -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise RunKilledError(signal.Signals(signum).name)

    return signal.signal(signal.SIGTERM, handler)


def _stop(started: list[_Started], grace: float = 20.0) -> None:
    """SIGINT to every running point (they record ``killed``), SIGKILL after ``grace`` s."""
    for item in started:
        if item.proc.poll() is None:
            item.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for item in started:
        try:
            item.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            item.proc.kill()
            item.proc.wait()


# --- SLURM --------------------------------------------------------------------------------------


def check_slurm(config: Config) -> None:
    """Raise :class:`ConfigError` when a SLURM sweep cannot be submitted: submitit missing, no
    ``sbatch`` on PATH, or an unknown ``[executor.slurm] partition``."""
    try:
        importlib.import_module("submitit")
    except ImportError:
        raise ConfigError(
            "The slurm executor needs submitit: pip install 'phd_flow[slurm]' (or pip install submitit)."
        ) from None
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "The slurm executor needs SLURM's sbatch, which is not on PATH. Run the sweep on a "
            "login node of the cluster, or use --executor local."
        )
    partition = config.executor.slurm.partition
    if partition:
        known = slurm_partitions()
        if known and partition not in known:
            raise ConfigError(
                f"{config.where('executor.slurm.partition')}: [executor.slurm] partition = "
                f"{partition!r} is not a partition of this SLURM cluster.{closest(partition, known)} "
                f"Partitions (sinfo): {', '.join(known)}. Nothing was submitted."
            )


def slurm_partitions() -> list[str]:
    """The cluster's partition names (``sinfo``), or [] when sinfo cannot answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.strip().rstrip("*") for line in out.splitlines() if line.strip()})


def slurm_parameters(
    slurm: SlurmConfig, max_parallel: int, name: str, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``[executor.slurm]`` (its ``extra`` table, then ``options`` from ``--slurm-option``) as
    submitit ``update_parameters`` keywords.

    An option submitit knows (``constraint``, ``gres``, ``account`` ...) becomes ``slurm_<name>``;
    any other sbatch long option goes through ``slurm_additional_parameters``. Unknown options
    raise :class:`ConfigError` with the closest name (see :func:`check_slurm_options`).
    """
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": slurm.timeout_min,
        "cpus_per_task": slurm.cpus_per_task,
        "slurm_array_parallelism": max_parallel,
        "slurm_signal_delay_s": slurm.signal_delay_s,
        "slurm_setup": list(slurm.setup),
    }
    optional = {
        "slurm_partition": slurm.partition,
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem_gb": slurm.mem_gb,
        "slurm_account": slurm.account,
        "slurm_qos": slurm.qos,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return apply_slurm_options(params, {**slurm.extra, **(options or {})})


def apply_slurm_options(params: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``params`` with sbatch ``options`` (``{"constraint": "a100"}``) added, checked first."""
    if not options:
        return params
    known = submitit_slurm_parameters()
    check_slurm_options(options, known)
    out = dict(params)
    additional = dict(out.get("slurm_additional_parameters") or {})
    for raw, value in options.items():
        name = raw.removeprefix("--").replace("-", "_")
        if name in known:
            out[f"slurm_{name}"] = value
        else:
            additional[name] = value
    if additional:
        out["slurm_additional_parameters"] = additional
    return out


def submitit_slurm_parameters() -> set[str]:
    """The sbatch parameters submitit's SLURM executor takes (``constraint``, ``gres`` ...)."""
    try:
        from submitit.slurm.slurm import SlurmExecutor
    except ImportError:
        return set()
    return set(SlurmExecutor._valid_parameters()) - {"additional_parameters"}


@functools.cache
def sbatch_options() -> frozenset[str]:
    """Long options of this cluster's ``sbatch --help`` (``constraint``, ``gres`` ...), or
    nothing when sbatch cannot answer."""
    try:
        out = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9-]+)", out))


def check_slurm_options(options: dict[str, Any], known: set[str] | None = None) -> None:
    """Raise :class:`ConfigError` for an option neither submitit nor ``sbatch --help`` knows
    (when neither can answer, the option is passed through unchecked)."""
    names = (submitit_slurm_parameters() if known is None else known) | sbatch_options()
    for raw, value in options.items():
        name = str(raw).removeprefix("--").replace("-", "_")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ConfigError(f"SLURM option {raw!r}: write it as an sbatch long option name, e.g. constraint.")
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"SLURM option {raw}: {value!r} must be a string, a number or true/false.")
        if names and name not in names:
            raise ConfigError(
                f"SLURM option {raw!r} is not an sbatch option.{closest(name, sorted(names))} "
                "See `sbatch --help` for the options; nothing was submitted."
            )


def parse_slurm_option(text: str) -> tuple[str, Any]:
    """``--slurm-option KEY=VALUE`` -> (``KEY``, ``VALUE``); a number stays a string (sbatch
    takes text)."""
    name, sep, value = text.partition("=")
    name = name.strip().removeprefix("--")
    if not sep or not name:
        raise ConfigError(f"--slurm-option {text!r}: write it as KEY=VALUE, e.g. --slurm-option constraint=a100.")
    return name, value.strip()


def submit_slurm(
    sweep: Sweep,
    points: Sequence[dict[str, Any]],
    *,
    config: Config,
    max_parallel: int,
    params: dict[str, Any] | None = None,
) -> list[str]:
    """Submit ``points`` as one job array; record and return the job ids (``<array>_<index>``).

    ``params`` are submitit's parameters (the sweep record's, on a resume); by default they
    are built from ``[executor.slurm]``. A point's earlier job ids stay in its
    ``slurm_job_history``.
    """
    import submitit

    slurm = config.executor.slurm
    if params is None:
        params = slurm_parameters(slurm, max_parallel, f"{sweep.data['node']}-sweep")
    params = {**params, "slurm_array_parallelism": max_parallel}
    recorded = sweep.data.get("executor", {})
    requeues = recorded.get("max_requeues", slurm.max_requeues) if isinstance(recorded, dict) else slurm.max_requeues
    folder = Path(slurm.folder) if slurm.folder else config.local_path / ".slurm" / sweep.key
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=int(requeues))
    executor.update_parameters(**params)
    specs = point_specs(sweep, points, config.project_root)
    jobs = executor.map_array(PointJob(), specs)
    ids = [str(job.job_id) for job in jobs]
    for point, job_id in zip(points, ids, strict=True):
        history = [*point.get("slurm_job_history", [])]
        if point.get("slurm_job_id") and point["slurm_job_id"] not in history:
            history.append(point["slurm_job_id"])
        point.update(status=SUBMITTED, slurm_job_id=job_id, submitted_at=utcnow())
        if history:
            point["slurm_job_history"] = history
    sweep.data["slurm_job_ids"] = sorted({*sweep.data.get("slurm_job_ids", []), *{i.split("_")[0] for i in ids}})
    sweep.data["status"] = SUBMITTED
    sweep.data["slurm_folder"] = str(folder)
    sweep.save()
    return ids


def slurm_queue(job_ids: Sequence[str]) -> dict[str, str] | None:
    """State of every queued/running array task of these jobs (``{"12_3": "RUNNING"}``), or
    None when ``squeue`` cannot answer (then nothing is assumed about the queue)."""
    arrays = sorted({j.split("_")[0] for j in job_ids if j})
    if not arrays:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # squeue fails on ids it no longer knows when *all* of them are gone
        return {} if "Invalid job id" in proc.stderr else None
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)


def active_points(sweep: Sweep) -> set[str]:
    """Keys of points whose SLURM task is still queued or running."""
    queue = slurm_queue([p.get("slurm_job_id") or "" for p in sweep.points]) or {}
    return {p["key"] for p in sweep.points if p.get("slurm_job_id") in queue}


def wait_slurm(sweep: Sweep, config: Config, poll: float = 2.0, out: Printer = _print) -> dict[str, int]:
    """Follow a SLURM sweep until every point has finished; print each change; return counts."""
    stale_after = config.runs.stale_after_seconds
    reported: dict[str, str] = {}
    while True:
        sweep.refresh(config.local_path, stale_after)
        queue = slurm_queue([p.get("slurm_job_id") or "" for p in sweep.points])
        gone = [] if queue is None else [p for p in sweep.points if p.get("slurm_job_id") not in queue]
        for point in gone:
            if point["status"] in (SUBMITTED, PENDING):
                point["status"] = LOST  # ended without ever starting the run: see the submitit log
            elif point["status"] in (RUNNING, STALE):
                reason = "SIGKILL, OOM, node failure or time limit"
                _mark_dead(config.local_path / point["key"], f"SLURM job {point.get('slurm_job_id')} ended ({reason})")
                point["status"] = KILLED
        done = [p for p in gone if p["status"] in FINISHED]
        for point in done:
            if reported.get(point["key"]) != point["status"]:
                reported[point["key"]] = point["status"]
                line = (
                    f"[{len(reported)}/{len(sweep.points)}] {point['status']:<9} {point['key']}  "
                    f"{describe_point(point)}  (job {point.get('slurm_job_id')})"
                )
                error = point_error(config.local_path / point["key"]) if point["status"] != COMPLETED else ""
                out(line + (f"\n    {error}" if error else ""))
        if len(done) == len(sweep.points):
            return sweep.refresh(config.local_path, stale_after)
        time.sleep(poll)


def point_error(run_dir: Path) -> str:
    """The error line a point's run.json recorded (``RuntimeError: ...``), or ''."""
    try:
        error = RunRecord.load(run_dir).data.get("error")
    except UserError:
        return ""
    if not isinstance(error, str) or not error.strip():
        return ""
    lines = [ln for ln in error.strip().splitlines() if ln.strip()]
    return lines[-1][:300]


def _mark_dead(run_dir: Path, what: str) -> None:
    """A run whose process (or SLURM job) is gone but whose run.json says running was killed
    hard: record it ``killed`` with ``what`` ended it."""
    try:
        record = RunRecord.load(run_dir)
    except UserError:
        return
    if record.status == RUNNING:
        record.update(status=KILLED, ended_at=utcnow(), error=f"{what} without the run finishing")


class PointJob:
    """What a SLURM array task runs: one sweep point, in process, under its pre-assigned key.

    It speaks submitit's checkpoint protocol (``checkpoint()`` returning a ``DelayedSubmission``),
    so on SLURM's timeout/preemption signal (USR2, ``signal_delay_s`` before the limit) submitit
    requeues the same point: the run keeps its key and directory, ``self.resumed`` is True, and
    ``self.checkpoint_dir`` holds what the node saved. ``Node.save_checkpoint()`` is called at
    that signal, before the requeue.
    """

    def __init__(self) -> None:
        self._node: Node[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # the running node never travels with the pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._node = None

    def __call__(self, spec: PointSpec) -> str:
        from phd_flow.log import configure_cli_stderr

        configure_cli_stderr("INFO")  # no loguru default sink: it would print local variables
        node = self._node = spec.build()
        node.run()  # a failure raises, so the SLURM job is FAILED in sacct too
        return node.record.status

    def checkpoint(self, spec: PointSpec) -> Any:
        """Called by submitit in the job on USR2: save, mark the attempt, requeue the same point."""
        from submitit.helpers import DelayedSubmission

        node = self._node
        if node is not None and node.started:
            node.save_checkpoint()
            node.record.update(
                status=KILLED,
                ended_at=utcnow(),
                requeued_at=utcnow(),
                error="SLURM time limit or preemption: checkpointed and requeued with the same key",
            )
        return DelayedSubmission(PointJob(), spec)


__all__ = [
    "LOCAL_KINDS",
    "PointJob",
    "PointSpec",
    "active_points",
    "check_slurm",
    "close_mlflow_sweep",
    "run_local",
    "slurm_parameters",
    "start_feeder",
    "submit_slurm",
    "wait_for_mlflow",
    "wait_slurm",
]
