"""The ``optimize`` command: an Optuna study whose trials are runs of one node.

``python -m my_project optimize Quadratic --objective score --n-trials 20 --param x=float:-1:5``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phd_flow.errors import ArgsError

if TYPE_CHECKING:
    from phd_flow.project import Project
    from phd_flow.run.node import Node

DESCRIPTION = """\
Run an Optuna study of NODE: each trial is a normal run (own key, directory, MLflow run nested
under the study's run Study_<name>) with the node's fixed arguments plus the values the sampler
suggests for the --param fields. The study is stored in sqlite:///<local_path>/optuna.db (or
--storage), so the same --study name continues it; a parameter set already evaluated is never run
again (the trial reuses the earlier value).

search space (one --param per field; the field's own type checks the values):
  NAME=int:LOW:HIGH          integer in [LOW, HIGH]          seed=int:0:10
  NAME=int:LOW:HIGH:log      integer, log scale               batch=int:16:512:log
  NAME=float:LOW:HIGH        float in [LOW, HIGH]            x=float:-1:5
  NAME=float:LOW:HIGH:log    float, log scale                 lr=float:1e-4:1e-1:log
  NAME=choice:A,B,C          one of the values               mode=choice:fast,slow

examples:
  optimize Quadratic --objective score --n-trials 20 --param x=float:-1:5 --param y=float:-4:2
  optimize FitOLS --dataset d.csv --target y --objective mse --direction minimize \\
      --n-trials 5 --param seed=int:0:10 --seed 0
"""


def register_optimize(commands: Any) -> None:
    """Add the ``optimize`` command (see :data:`phd_flow.cli.COMMANDS`)."""
    parser = commands.add_parser(
        "optimize",
        help="an Optuna study whose trials are runs of a node",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("node", nargs="?", help="node class name or dotted path")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, help="the node's fixed arguments")
    _add_options(parser)
    parser.set_defaults(func=_cmd_optimize, optimize_parser=parser)


def _add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimize options")
    group.add_argument("--objective", metavar="FIELD", help="the Result field to optimise (required)")
    group.add_argument("--direction", choices=("minimize", "maximize"), default=None, help="default: minimize")
    group.add_argument("--n-trials", type=int, default=None, metavar="N", help="trials to run (default: 10)")
    group.add_argument(
        "--param", action="append", default=[], metavar="NAME=SPEC", help="a searched field (see search space)"
    )
    group.add_argument("--study", metavar="NAME", help="study name (default: the node's name); the same name continues")
    group.add_argument("--storage", metavar="URL", help="Optuna storage (default: sqlite:///<local_path>/optuna.db)")
    group.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the TPE sampler")
    group.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop starting trials after")
    group.add_argument("-h", "--help", action="store_true", dest="help_requested", help="show this help")


_NAMES = ("objective", "direction", "n_trials", "study", "storage", "seed", "timeout")


def _options(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Options given after NODE (argparse's REMAINDER swallowed them) merged with those before."""
    inner = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_options(inner)
    later, node_argv = inner.parse_known_args(list(args.node_args))
    merged = argparse.Namespace(param=[*args.param, *later.param])
    for name in _NAMES:
        setattr(merged, name, getattr(later, name) if getattr(later, name) is not None else getattr(args, name))
    merged.help_requested = args.help_requested or later.help_requested
    return merged, node_argv


@dataclass(frozen=True)
class ParamSpec:
    """One ``--param NAME=SPEC``: how to ask an Optuna trial for the field's value."""

    name: str
    kind: str  # int | float | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The trial's value for this field."""
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


def parse_param(node_cls: type[Node[Any, Any]], text: str) -> ParamSpec:
    """Parse ``NAME=int:LOW:HIGH[:log]``, ``NAME=float:LOW:HIGH[:log]`` or ``NAME=choice:A,B``;
    NAME must be a field of the node, choices are parsed with the field's type."""
    from phd_flow.sweeps.grid import convert_value, field_action

    name, sep, spec = text.partition("=")
    name = name.strip().removeprefix("--")
    kind, _, rest = spec.partition(":")
    usage = f"--param {text!r}: write NAME=int:LOW:HIGH[:log], NAME=float:LOW:HIGH[:log] or NAME=choice:A,B,..."
    if not sep or not name or kind not in ("int", "float", "choice") or not rest:
        raise ArgsError(usage + " (see optimize --help).")
    action = field_action(node_cls, name, "--param")
    field = action.dest.removeprefix("args.")
    if kind == "choice":
        values = tuple(convert_value(node_cls, name, action, v.strip(), "--param") for v in rest.split(","))
        return ParamSpec(field, kind, choices=values)
    parts = rest.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise ArgsError(usage + ".")
    number: Callable[[str], float] = int if kind == "int" else float
    try:
        low, high = number(parts[0]), number(parts[1])
    except ValueError:
        raise ArgsError(f"--param {text!r}: LOW and HIGH must be {kind} numbers.") from None
    log = len(parts) == 3
    if not (math.isfinite(low) and math.isfinite(high)) or low > high or (log and low <= 0):
        raise ArgsError(f"--param {text!r}: give LOW <= HIGH (and LOW > 0 on a log scale).")
    return ParamSpec(field, kind, float(low), float(high), log)


def _cmd_optimize(project: Project, args: argparse.Namespace) -> int:
    opts, node_argv = _options(args)
    if opts.help_requested or args.node is None:
        args.optimize_parser.print_help()
        return 0 if opts.help_requested else 2
    from phd_flow.run.discovery import resolve_node
    from phd_flow.sweeps.grid import parse_point
    from phd_flow.sweeps.optuna import check_objective

    node_cls = resolve_node(project.package_name, args.node)
    if not opts.objective:
        raise ArgsError("optimize needs --objective FIELD (a field of the node's Result).")
    check_objective(node_cls, opts.objective)
    if not opts.param:
        raise ArgsError("optimize needs at least one --param NAME=SPEC (e.g. --param seed=int:0:10).")
    specs = [parse_param(node_cls, text) for text in opts.param]
    if len({s.name for s in specs}) != len(specs):
        raise ArgsError("a --param field is given twice: give each searched field once.")
    n_trials = 10 if opts.n_trials is None else opts.n_trials
    if n_trials < 1:
        raise ArgsError(f"--n-trials {n_trials}: give 1 or more.")
    base = parse_point(node_cls, node_argv)  # the fixed arguments, checked like `run`'s
    base_args = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}

    def space(trial: Any) -> Mapping[str, Any]:
        return {spec.name: spec.suggest(trial) for spec in specs}

    from phd_flow.sweeps.optuna import _import_optuna, optimize

    optuna = _import_optuna()
    sampler = optuna.samplers.TPESampler(seed=opts.seed) if opts.seed is not None else None
    name = opts.study or node_cls.__name__
    print(f"Study {name}: {n_trials} trials of {node_cls.__name__}, {opts.direction or 'minimize'} {opts.objective}")
    study = optimize(
        node_cls,
        objective=opts.objective,
        space=space,
        n_trials=n_trials,
        base_args=base_args,
        direction=opts.direction or "minimize",
        study_name=name,
        storage=opts.storage,
        sampler=sampler,
        config=project,
        timeout=opts.timeout,
    )
    complete = [t for t in study.trials if t.value is not None]
    for trial in study.trials[-n_trials:]:
        value = "failed" if trial.value is None else f"{opts.objective}={trial.value:.6g}"
        same = f"  (same as trial {trial.user_attrs['duplicate_of']})" if "duplicate_of" in trial.user_attrs else ""
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"[trial {trial.number}] {value}  {params}  {trial.user_attrs.get('run_key', '')}{same}")
    if not complete:
        print(f"Study {name}: no trial completed.")
        return 1
    best = study.best_trial
    params = " ".join(f"{k}={v}" for k, v in best.params.items())
    print(f"Best of study {name}: {opts.objective}={best.value:.6g}  {params}  run {best.user_attrs.get('run_key')}")
    return 0
