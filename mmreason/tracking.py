"""MLflow in one place: where the store is, which experiment a run goes to, the tags every run
carries, parent run per pipeline invocation, child run per stage or trial, and the local UI.

Layout (README "Reviewing runs in MLflow"):

- Store: a local SQLite file in the working directory (`mlflow.db`; MLflow 3.17 refuses a plain
  file store) unless `MLFLOW_TRACKING_URI` names another one (a server on a cluster).
- Experiments per stage family: a stage run on its own goes to `<experiment>-train` (cot, coconut,
  dare, cosre, rl) or `<experiment>-eval` (press evaluation, video QA); a sweep to `<experiment>-sweep`;
  a pipeline (the quickstart) to `<experiment>-pipeline`. Runs started inside a pipeline or a sweep
  nest under its run, in its experiment (MLflow nests runs only within one experiment).
- Run names: a pipeline or sweep by its name, a stage by its `run_name`, a trial `<sweep>-<trial>`.
- Experiments are tagged `mlflow.experimentKind: custom_model_development`, so that MLflow 3's
  UI opens them on their runs, not on the GenAI (traces) overview.
- Tags on every run: `git_commit` (+ `git_dirty`), `config_hash` (of the run's resolved config),
  `dataset_manifest_hash` and `dataset_path` (when the config reads a dataset), `stage`, and
  whatever `MMREASON_RUN_TAGS` (a JSON object) adds — a sweep sets `sweep` and `trial_id` there.
- Inputs: a stage run's `data.path` (and `data.eval_path`) as MLflow datasets — name, the
  manifest's hash as digest, the location as source, the manifest's row counts as profile; the
  data is not read (`log_dataset_inputs`).
- Models: a stage's export as an MLflow model of its run that points at the export's location;
  MLflow keeps no copy of the weights (`log_export`).

Workers log with `MlflowClient(uri).log_metric(run_id, …)` to the run id the driver hands them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mmreason import storage
from mmreason.config import ConfigError, config_hash

PARENT_ENV = "MMREASON_PARENT_RUN_ID"
TAGS_ENV = "MMREASON_RUN_TAGS"
"""A JSON object of extra tags for every run this process starts (a sweep's trial id, say)."""
COMMIT_ENV = "MMREASON_GIT_COMMIT"
"""The commit, where the code runs without its .git (a `ray job submit` working dir)."""
FAMILIES = {"cot": "train", "coconut": "train", "dare": "train", "cosre": "train", "rl": "train",
            "evaluate": "eval", "video-qa": "eval", "sweep": "sweep", "pipeline": "pipeline"}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's experiment type for model training (the other is `genai_development`); the UI reads
it to choose what an experiment opens on."""
EXPORT_URI_TAG = "export_uri"
"""The tag of a logged model (and of its run) that holds where the export's files are."""
REPO = Path(__file__).resolve().parents[1]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def family_experiment(experiment: str, stage: str) -> str:
    """`mmreason` + stage `cot` → `mmreason-train`; an unknown stage is its own family."""
    return f"{experiment}-{FAMILIES.get(stage, stage)}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config → {'optim.lr': '0.002', …} for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, (list, dict)) else str(data)}


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, str]:
    """{'git_commit': sha, 'git_dirty': 'true'|'false'} of the code that runs (or MMREASON_GIT_COMMIT)."""
    if os.environ.get(COMMIT_ENV):
        return {"git_commit": os.environ[COMMIT_ENV]}
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}
    return {"git_commit": sha, "git_dirty": "true" if dirty else "false"}


def read_manifest(dataset: str | Path) -> dict[str, Any] | None:
    """A dataset's manifest.json (a local folder or an s3:// / gs:// location), or None where there
    is none to read: tracking records what it can and never stops a run."""
    try:
        manifest = json.loads(storage.read_text(storage.join(dataset, "manifest.json")))
    except (OSError, ValueError, ConfigError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_hash(dataset: str | Path, manifest: dict[str, Any] | None = None) -> str | None:
    """Hash of a dataset's manifest.json — what was written (shards, rows, schema, generator config),
    not when or where: the `last_run` timings and the output directory are left out."""
    manifest = dict(manifest if manifest is not None else read_manifest(dataset) or {})
    if not manifest:
        return None
    manifest.pop("last_run", None)
    if isinstance(manifest.get("config"), dict):
        manifest["config"] = {k: v for k, v in manifest["config"].items() if k not in ("output_dir", "overwrite")}
    return config_hash(manifest)


def run_tags(params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict[str, str]:
    """The tags every run carries (module doc), then `MMREASON_RUN_TAGS`, then `tags`."""
    out = dict(git_state())
    if params is not None:
        out["config_hash"] = config_hash(params)
        data = params.get("data") if isinstance(params.get("data"), dict) else {}
        if data.get("path"):
            out["dataset_path"] = str(data["path"])
            digest = manifest_hash(data["path"])
            if digest:
                out["dataset_manifest_hash"] = digest
    try:
        extra = json.loads(os.environ.get(TAGS_ENV) or "{}")
    except ValueError:
        extra = {}
    out.update({str(k): str(v) for k, v in extra.items()})
    out.update(tags or {})
    return out


def _enter_experiment(mlflow: Any, experiment: str, parent_id: str | None) -> None:
    """The parent run's experiment when nested (runs nest only within one), else `experiment`,
    created here if need be, and marked as model development (`EXPERIMENT_KIND`) unless it says
    what it is already."""
    if parent_id is not None:
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(parent_id).info.experiment_id)
        return
    uri = tracking_uri()
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        location = None
        if uri.startswith("sqlite:///"):
            # artifacts beside the database, not in ./mlruns of whatever directory the process runs in
            # (a submitted job's is a temporary copy, deleted when the job ends)
            location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=location,
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by a concurrent stage or trial
    elif EXPERIMENT_KIND_TAG not in found.tags:  # made before we marked experiments
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment)


DATASET_LOG_ATTEMPTS = 5
"""How often `log_dataset_inputs` tries when a concurrent run inserted the same dataset first."""


def log_dataset_inputs(run_id: str, data: dict[str, Any], training: bool) -> None:
    """The datasets a run's config reads (`data.path`; `data.eval_path`) as MLflow dataset inputs
    of the run: named after their folder, the manifest hash as digest, the location as source, the
    manifest's rows by split and task as profile, context `training` (`data.path` of a training
    stage) or `evaluation`. Nothing is loaded; a dataset with no manifest to read is left out."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for location, context in ((data.get("path"), "training" if training else "evaluation"),
                              (data.get("eval_path"), "evaluation")):
        if not location or (context == "evaluation" and location == data.get("path") and inputs):
            continue  # no dataset, or the held-out rows come from data.path, logged already
        manifest = read_manifest(location)
        if manifest is None:
            continue
        location = str(location) if storage.is_remote(location) else str(Path(location).resolve())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a local path: "" and file:// name the same source
            source = resolve_dataset_source(location)
        profile = {"dataset": manifest.get("dataset"), "total_rows": manifest.get("total_rows"),
                   "rows": manifest.get("rows"), "shards": len(manifest.get("shards") or []),
                   "schema_version": manifest.get("schema_version")}
        dataset = Dataset(name=location.rstrip("/").rsplit("/", 1)[-1], digest=manifest_hash(location, manifest),
                          source_type=source._get_source_type(), source=source.to_json(),
                          profile=json.dumps(profile, sort_keys=True))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    if not inputs:
        return
    client = mlflow.MlflowClient()
    for attempt in range(DATASET_LOG_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except mlflow.exceptions.MlflowException as exc:
            # MLflow looks a dataset up, then inserts it: stages or trials that start together on a
            # new dataset race, and all but one fail on the unique key (nothing of theirs was
            # written). Again, the dataset is found and only the run's input is added. The words
            # are SQLite's and PostgreSQL's ("unique constraint") and MySQL's ("duplicate entry").
            message = str(exc).lower()
            duplicate = "unique constraint" in message or "duplicate entry" in message
            if not duplicate or attempt == DATASET_LOG_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def log_export(export: str | Path, name: str, params: dict[str, Any] | None = None,
               model_type: str | None = None) -> str:
    """Log `export` (a local folder or an s3:// / gs:// location) as an MLflow model of the active
    run: an external model — MLflow keeps no copy of the weights, only where they are
    (`EXPORT_URI_TAG`, also set on the run) — listed as the run's output, so the UI's Model column
    shows it and it can be registered (`models:/<model id>`). A character MLflow refuses in a model
    name (`/ : . % " '`, as in a run name `dare-0.5`) becomes `-`. Returns the model id."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    location = str(export) if storage.is_remote(export) else str(Path(export).resolve())
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_export needs an active MLflow run (stage_run)")
    name = re.sub(r"""[/:.%"']""", "-", name)
    model = mlflow.create_external_model(name=name, source_run_id=run.info.run_id, model_type=model_type,
                                         tags={EXPORT_URI_TAG: location},
                                         params={k: str(v) for k, v in (params or {}).items()})
    mlflow.log_outputs([LoggedModelOutput(model.model_id, step=0)])
    mlflow.set_tag(EXPORT_URI_TAG, location)
    return model.model_id


@contextmanager
def _killed_on_exit() -> Iterator[None]:
    """End the active run KILLED when its process is told to stop — Ray Tune stops a trial (ASHA)
    with SystemExit in it, a user with Ctrl-C — rather than FAILED, which MLflow would record."""
    import mlflow

    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        mlflow.end_run("KILLED")
        raise


@contextmanager
def stage_run(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A child run for one stage under the pipeline's parent run (created here if none is active).

    Yields the active MLflow run; the parent is shared through MMREASON_PARENT_RUN_ID so that
    stages run as separate processes nest under one pipeline invocation. On its own a stage goes
    to its family's experiment (`family_experiment`), under a parent `pipeline-<name>`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    parent_id = os.environ.get(PARENT_ENV)
    all_tags = run_tags(params, tags)
    _enter_experiment(mlflow, family_experiment(experiment, (tags or {}).get("stage", "pipeline")), parent_id)
    own_parent = None
    if parent_id is None:
        own_parent = mlflow.start_run(run_name=f"pipeline-{name}", tags=run_tags())
        parent_id = own_parent.info.run_id
    status = "FINISHED"  # of the parent made here, as its one child ends
    try:
        with mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_id, tags=all_tags) as run:
            mlflow.log_params(flatten(params))
            data = params.get("data")
            if isinstance(data, dict):
                log_dataset_inputs(run.info.run_id, data, FAMILIES.get((tags or {}).get("stage", "")) == "train")
            with _killed_on_exit():
                yield run
    except (SystemExit, KeyboardInterrupt):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if own_parent is not None:
            mlflow.end_run(status)


@contextmanager
def pipeline_run(experiment: str, name: str, family: str = "pipeline",
                 params: dict[str, Any] | None = None) -> Iterator[str]:
    """The parent run of a pipeline invocation (or a sweep: `family="sweep"`); stages and trials
    started inside nest under it. Inside another pipeline's run it nests there in turn."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    previous = os.environ.get(PARENT_ENV)
    _enter_experiment(mlflow, family_experiment(experiment, family), previous)
    with mlflow.start_run(run_name=name, nested=previous is not None, parent_run_id=previous,
                          tags=run_tags(params, {"stage": family})) as run:
        if params is not None:
            mlflow.log_params(flatten(params))
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            with _killed_on_exit():
                yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def check_tracking_uri(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail with a ConfigError naming the URI if runs could not be logged there; returns the URI.

    Cheap and before any work starts: a server must answer HTTP within `timeout` s (MLflow's own
    client would retry for minutes); a SQLite file's folder must exist and be writable."""
    uri = uri or tracking_uri()
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered (an auth proxy, an older server without /health)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"MLflow tracking URI {uri} cannot be reached ({reason}); start the server or "
                              f"unset MLFLOW_TRACKING_URI to log to ./mlflow.db") from None
        return uri
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise ConfigError(f"MLflow tracking URI {uri}: expected sqlite:///PATH/mlflow.db")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"MLflow tracking URI {uri} cannot be reached: folder {path.parent} does not exist "
                              f"or is not writable")
        return uri
    if scheme in ("", "file") or len(scheme) == 1:  # a path (or a Windows drive letter)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ConfigError(f"MLflow tracking URI {uri} is a file store, which MLflow 3.17 refuses; use "
                              f"sqlite:///{Path(uri.removeprefix('file://')).resolve() / 'mlflow.db'}")
        return uri
    import mlflow

    try:  # a database or a hosted service: one cheap query
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 — any failure here means "cannot log there"
        raise ConfigError(f"MLflow tracking URI {uri} cannot be reached: {exc}") from None
    return uri


def ui_command(uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow ui` command line for a local store: one worker (it spawns many processes
    otherwise), bound to `host` only."""
    import sys

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]
