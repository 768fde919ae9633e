"""MLflow in one place: where the store is, parent run per pipeline invocation, child run per stage.

The default store is a local SQLite file in the working directory (`mlflow.db`; MLflow 3.17
refuses a plain file store); `MLFLOW_TRACKING_URI` points it at a server instead. Workers log with
`MlflowClient(uri).log_metric(run_id, …)` to the run id the driver hands them.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PARENT_ENV = "MMREASON_PARENT_RUN_ID"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config → {'optim.lr': '0.002', …} for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, (list, dict)) else str(data)}


@contextmanager
def stage_run(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A child run for one stage under the pipeline's parent run (created here if none is active).

    Yields the active MLflow run; the parent is shared through MMREASON_PARENT_RUN_ID so that
    stages run as separate processes nest under one pipeline invocation."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    parent_id = os.environ.get(PARENT_ENV)
    own_parent = None
    if parent_id is None:
        own_parent = mlflow.start_run(run_name=f"pipeline-{name}")
        parent_id = own_parent.info.run_id
    try:
        with mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_id, tags=tags or {}) as run:
            mlflow.log_params(flatten(params))
            yield run
    finally:
        if own_parent is not None:
            mlflow.end_run()


@contextmanager
def pipeline_run(experiment: str, name: str) -> Iterator[str]:
    """The parent run of a pipeline invocation; stages started inside nest under it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name) as run:
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous
