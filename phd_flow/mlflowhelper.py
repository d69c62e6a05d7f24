"""A drop-in for `mlflowhelper <https://github.com/mgbckr/mlflowhelper>`_ users: change
``import mlflowhelper`` to ``from phd_flow import mlflowhelper`` and the code runs unchanged.

>>> from phd_flow import mlflowhelper                                    # doctest: +SKIP
>>> with mlflowhelper.start_run():
...     mlflowhelper.set_load(run_id="e1363f760b1e4ab3a9e93f856f2e9341", stages=["load_data"])
...     with mlflowhelper.managed_artifact_dir("data", stage="load_data") as artifact_dir:
...         if artifact_dir.loaded:
...             train = pd.read_csv(artifact_dir.get_path("train.csv"))

Same names, signatures and defaults as mlflowhelper (``stages="all"``, a stage name or a list,
``artifact_path=``, ``local_value_cache=``...); ``get_path()`` returns a ``str``; runs logged by
mlflowhelper itself (its files at the artifact root) load as well as phd_flow's, once
``adopt_run(run_id)`` recorded their checksums (everything loaded is verified by sha256).
The implementation is :mod:`phd_flow.stages.mlflowhelper`; see docs/stages.md.
"""

from __future__ import annotations

from typing import Any

from phd_flow.stages.mlflowhelper import (
    MlflowDict as _MlflowDict,
)
from phd_flow.stages.mlflowhelper import (
    MlflowManagedArtifact,
    StrPath,
    adopt_run,
    log_vars,
    managed_artifact,
    managed_artifact_dir,
    set_load,
    set_skip_log,
    start_run,
)

__all__ = [
    "MlflowDict",
    "MlflowManagedArtifact",
    "StrPath",
    "adopt_run",
    "end_run",
    "log_vars",
    "managed_artifact",
    "managed_artifact_dir",
    "set_load",
    "set_skip_log",
    "start_run",
]


def end_run(status: str = "FINISHED") -> None:
    """``mlflow.end_run`` (mlflowhelper's ``end_run``)."""
    from phd_flow.stages.mlflowhelper import _mlflow

    _mlflow().end_run(status=status)


class MlflowDict(_MlflowDict):
    """mlflowhelper's ``MlflowDict`` signature over phd_flow's (one MLflow run per dict, each
    item a tag holding JSON: values must be JSON-able).

    ``mlflow_client`` is an ``MlflowClient`` or a tracking URI; ``mlflow_tag_dict_name`` names
    the dict; ``mlflow_experiment_name`` its experiment; ``local_value_cache`` keeps read values
    in this process; ``read_only`` refuses writes. mlflowhelper's other options
    (``mlflow_pickler``, ``sync_mode``, ``lazy_value_cache``...) are accepted and have no effect.
    """

    def __init__(
        self,
        mlflow_client: Any = None,
        mlflow_experiment_name: str | None = None,
        mlflow_tag_dict_name: str = "default",
        mlflow_tag_user: str | None = None,
        mlflow_tag_defaults: Any = None,
        mlflow_tag_name_separator: str = ": ",
        mlflow_tag_prefix: str = "_mlflowdict",
        mlflow_custom_logger: Any = None,
        mlflow_pickler: Any = "cloudpickle",
        sync_mode: str | None = None,
        local_value_cache: bool = True,
        lazy_value_cache: bool = True,
        read_only: bool = False,
        only_load_finished_runs: bool = False,
    ) -> None:
        uri = mlflow_client if isinstance(mlflow_client, str) else None
        client = None if isinstance(mlflow_client, str) else mlflow_client
        super().__init__(
            mlflow_tag_dict_name,
            tracking_uri=uri,
            client=client,
            experiment=mlflow_experiment_name,
            local_value_cache=local_value_cache,
            read_only=read_only,
        )
