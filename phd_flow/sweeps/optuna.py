"""Optuna studies whose trials are node runs.

Each trial builds the node's Args from ``base_args`` plus what ``space(trial)`` suggests, runs the
node (own key, run directory, MLflow run nested under the study's MLflow run) and returns a field
of the Result to Optuna. The study lives in Optuna's RDB storage,
``sqlite:///<local_path>/optuna.db`` by default, so calling :func:`optimize` again with the same
``study_name`` continues it (after an interruption, or to add trials). Optuna is an optional
extra: ``pip install 'phd_flow[optuna]'``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any

from phd_flow import keys
from phd_flow.errors import ArgsError, ConfigError, RunFailedError, RunKilledError, closest

if typing.TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.project import Project
    from phd_flow.run.node import Node

STUDY_TAG = "phd_flow.study"


def optimize(
    node: type[Node[Any, Any]],
    *,
    objective: str | Callable[[Any], float],
    space: Callable[[Any], Mapping[str, Any]],
    n_trials: int,
    base_args: Mapping[str, Any] | None = None,
    direction: str = "minimize",
    study_name: str | None = None,
    storage: str | None = None,
    sampler: Any = None,
    config: Config | Project | str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> Any:
    """Run ``n_trials`` Optuna trials of ``node`` and return the ``optuna.Study``.

    ``objective`` names the Result field (attribute or mapping key) to optimise, or is a
    function of the Result. ``space(trial)`` returns Args values (``"optim.lr"`` sets a nested
    field). A trial whose run fails is recorded as failed by Optuna and the study goes on; Ctrl-C
    stops it (the running trial's run is ``killed``). Each trial's run key is in the trial's user
    attribute ``run_key``; MLflow runs are tagged ``phd_flow.study`` and ``optuna.trial``.

    >>> study = optimize(Fit, objective="mse", n_trials=20, base_args={"dataset": "d.csv"},
    ...                  space=lambda t: {"alpha": t.suggest_float("alpha", 1e-3, 10, log=True)})
    ... # doctest: +SKIP
    """
    optuna = _import_optuna()
    from phd_flow.project import Project

    if isinstance(objective, str):
        check_objective(node, objective)  # before the first trial, not after it
    project = Project.of(config, node.package)
    settings = project.config
    name = study_name or node.__name__
    settings.local_path.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=name,
        storage=storage or f"sqlite:///{settings.local_path / 'optuna.db'}",
        direction=direction,
        sampler=sampler,
        load_if_exists=True,
    )
    if study.trials and hasattr(study.sampler, "reseed_rng"):
        # A continued study with a seeded sampler would replay the first call's random points.
        study.sampler.reseed_rng()
    parent = _study_mlflow_run(settings, node, name)
    trial_fn = _Objective(node, project, objective, space, dict(base_args or {}), name, parent)
    status = "killed"
    try:
        study.optimize(trial_fn, n_trials=n_trials, timeout=timeout, catch=(RunFailedError,))
        status = "completed"
    except BaseException as exc:
        status = "killed" if isinstance(exc, (KeyboardInterrupt, RunKilledError)) else "failed"
        raise
    finally:
        if parent is not None:
            parent.close(status)  # Ctrl-C: the study's MLflow run is KILLED, like the trial's
    return study


def check_objective(node: type[Node[Any, Any]], objective: str) -> None:
    """Raise :class:`ArgsError` when ``objective`` is not a field of the node's Result type (a
    dataclass, or a class / TypedDict / NamedTuple with annotations), with the closest name.
    Results without declared fields (``float``, ``dict``, ``Any``) are not checked."""
    result = getattr(node, "result_class", Any)
    fields: list[str] = []
    if isinstance(result, type) and dataclasses.is_dataclass(result):
        fields = [f.name for f in dataclasses.fields(result)]
    elif isinstance(result, type) and result.__module__ != "builtins":
        try:
            fields = list(typing.get_type_hints(result))
        except Exception:  # unresolvable annotations: nothing to check against
            fields = []
    if fields and objective not in fields:
        raise ArgsError(
            f"objective {objective!r} is not a field of {node.__name__}'s result "
            f"{getattr(result, '__name__', result)}.{closest(objective, fields)} Its fields: {', '.join(fields)}."
        )


class _Objective:
    """The Optuna objective: one node run per trial."""

    def __init__(
        self,
        node: type[Node[Any, Any]],
        project: Project,
        objective: str | Callable[[Any], float],
        space: Callable[[Any], Mapping[str, Any]],
        base_args: dict[str, Any],
        study: str,
        parent: Any,
    ) -> None:
        self.node, self.project, self.objective, self.space = node, project, objective, space
        self.base_args, self.study, self.parent = base_args, study, parent

    def __call__(self, trial: Any) -> float:
        from phd_flow.run.options import RunOptions

        values = {**self.base_args, **dict(self.space(trial))}
        previous = _same_params(trial)
        if previous is not None:
            # Already evaluated: reuse its value and run (no second run of the same point).
            trial.set_user_attr("duplicate_of", previous.number)
            trial.set_user_attr("run_key", previous.user_attrs.get("run_key"))
            return float(previous.value)
        key = keys.new_key(self.node.__name__)
        trial.set_user_attr("run_key", str(key))
        tags = {STUDY_TAG: self.study, "optuna.trial": str(trial.number)}
        if self.parent is not None and self.parent.run_id:
            tags["mlflow.parentRunId"] = str(self.parent.run_id)
        options = RunOptions(key=str(key), tags=tags)
        result = self.node(nest(values), config=self.project, options=options).run()
        return _score(result, self.objective)


def _same_params(trial: Any) -> Any:
    """The earliest completed trial of the study with exactly this trial's parameters, or None."""
    import optuna

    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.number != trial.number and other.params == trial.params and other.value is not None:
            return other
    return None


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1}`` -> ``{"optim": {"lr": 0.1}}`` (dotted names set nested Args)."""
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return out


def _score(result: Any, objective: str | Callable[[Any], float]) -> float:
    if callable(objective):
        return float(objective(result))
    if isinstance(result, Mapping):
        return float(result[objective])
    return float(getattr(result, objective))


def _study_mlflow_run(config: Config, node: type[Node[Any, Any]], study: str) -> Any:
    """The study's MLflow run (found again by its key tag when the study resumes), or None."""
    if not config.mlflow.enabled:
        return None
    from phd_flow.log import logger
    from phd_flow.tracking import MlflowRun

    run = MlflowRun(config.tracking_uri(), config.experiment_name(node.package))
    tags = {"phd_flow.key": f"Study_{study}", STUDY_TAG: study, "phd_flow.node": node.__name__}
    try:
        run.open(f"Study_{study}", tags, {}, activate=False)
    except Exception as exc:  # MLflow down: the trials still run and record locally
        logger.warning(f"The study's MLflow run could not be opened ({type(exc).__name__}: {exc}).")
        return None
    return run


def _import_optuna() -> Any:
    try:
        return importlib.import_module("optuna")
    except ImportError:
        raise ConfigError(
            "phd_flow.optimize needs Optuna: pip install 'phd_flow[optuna]' (or pip install optuna)."
        ) from None
