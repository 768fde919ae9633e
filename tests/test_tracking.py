"""The MLflow layout (mmreason.tracking): tags every run carries, experiments per stage family and
their kind, nesting, datasets as run inputs, exports as logged models, tracking-URI checks, and
`mmreason mlflow` serving the local store on 127.0.0.1 — all on a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from mmreason import tracking
from mmreason.config import ConfigError, config_hash
from tests.s3 import s3, s3_server  # noqa: F401  (pytest fixtures)



def _dataset(path: Path, **extra) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"dataset": "gridworld", "schema_version": 1, "total_rows": 4,
                "config": {"seed": 0, "output_dir": str(path)},
                "shards": [{"path": "train/maze-n3-0000.parquet", "rows": 4}], "last_run": {"seconds": 1.5}, **extra}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_tags_name_commit_config_and_dataset(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "d")
    params = {"run_name": "x", "data": {"path": str(data)}}
    monkeypatch.setenv(tracking.TAGS_ENV, json.dumps({"sweep": "s", "trial_id": "t1"}))
    tags = tracking.run_tags(params, {"stage": "cot"})
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    assert tags["config_hash"] == config_hash(params) and tags["dataset_path"] == str(data)
    assert tags["dataset_manifest_hash"] == tracking.manifest_hash(data)
    assert tags["sweep"] == "s" and tags["trial_id"] == "t1" and tags["stage"] == "cot"
    # the manifest hash is about the data written, not when or where
    moved = _dataset(tmp_path / "elsewhere", last_run={"seconds": 99.0})
    assert tracking.manifest_hash(moved) == tracking.manifest_hash(data)
    assert tracking.manifest_hash(_dataset(tmp_path / "more", total_rows=5)) != tracking.manifest_hash(data)
    assert tracking.manifest_hash(tmp_path / "none") is None
    monkeypatch.setenv(tracking.COMMIT_ENV, "abc123")  # code shipped without .git (ray job submit)
    tracking.git_state.cache_clear()
    try:
        assert tracking.run_tags()["git_commit"] == "abc123"
    finally:
        tracking.git_state.cache_clear()


def test_stage_families_and_nesting(mlflow_store, tmp_path):
    import mlflow

    data = str(_dataset(tmp_path / "d"))
    with tracking.stage_run("mmreason", "alone", {"data": {"path": data}}, tags={"stage": "cot"}) as run:
        alone = run.info.run_id
    with tracking.pipeline_run("mmreason", "qs") as parent:
        with tracking.stage_run("mmreason", "ev", {"x": 1}, tags={"stage": "evaluate"}) as run:
            nested = run.info.run_id
        with tracking.pipeline_run("mmreason", "sw", family="sweep", params={"name": "sw"}) as sweep:
            pass
    client = mlflow.MlflowClient(mlflow_store)
    experiment = {r: client.get_experiment(client.get_run(r).info.experiment_id).name
                  for r in (alone, parent, nested, sweep)}
    assert experiment == {alone: "mmreason-train", parent: "mmreason-pipeline", nested: "mmreason-pipeline",
                          sweep: "mmreason-pipeline"}  # inside a pipeline, runs stay in its experiment
    assert client.get_run(nested).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(sweep).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(alone).data.tags["dataset_manifest_hash"] == tracking.manifest_hash(data)
    assert client.get_run(parent).data.tags["git_commit"] == tracking.git_state()["git_commit"]
    assert os.environ.get(tracking.PARENT_ENV) is None


def test_a_run_told_to_stop_ends_killed_and_one_that_raised_failed(mlflow_store):
    """Ray Tune stops a trial (ASHA) with SystemExit inside it; that run, and the pipeline run
    around it, end KILLED rather than FAILED. An error still ends FAILED."""
    import mlflow

    ids = {}
    for name, exc in (("stopped", SystemExit(0)), ("interrupted", KeyboardInterrupt()), ("broken", ValueError("x"))):
        with pytest.raises(type(exc)):
            with tracking.pipeline_run("mmreason", f"p-{name}") as parent:
                with tracking.stage_run("mmreason", name, {"x": 1}, tags={"stage": "cot"}) as run:
                    ids[name] = (parent, run.info.run_id)
                    raise exc
    for name, exc in (("alone-stopped", SystemExit(0)), ("alone-broken", ValueError("x"))):
        with pytest.raises(type(exc)):  # a stage on its own: the parent it makes ends the same way
            with tracking.stage_run("mmreason", name, {"x": 1}, tags={"stage": "cot"}) as run:
                ids[name] = (run.data.tags["mlflow.parentRunId"], run.info.run_id)
                raise exc
    client = mlflow.MlflowClient(mlflow_store)
    status = {name: tuple(client.get_run(i).info.status for i in pair) for name, pair in ids.items()}
    assert status == {"stopped": ("KILLED", "KILLED"), "interrupted": ("KILLED", "KILLED"),
                      "broken": ("FAILED", "FAILED"), "alone-stopped": ("KILLED", "KILLED"),
                      "alone-broken": ("FAILED", "FAILED")}
    assert mlflow.active_run() is None


def test_experiments_are_marked_for_model_development(mlflow_store, tmp_path):
    """MLflow 3's UI opens an experiment tagged `mlflow.experimentKind: custom_model_development`
    on its runs (not the GenAI overview): ours get it when made, or later if made without it; a
    kind set by someone else stays."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    client.create_experiment("mmreason-eval")  # as made before experiments were marked
    client.create_experiment("mmreason-sweep", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    with tracking.stage_run("mmreason", "s", {}, tags={"stage": "cot"}):
        pass
    with tracking.stage_run("mmreason", "e", {}, tags={"stage": "evaluate"}):
        pass
    with tracking.pipeline_run("mmreason", "qs"):
        with tracking.pipeline_run("mmreason", "sw", family="sweep"):
            pass
    with tracking.pipeline_run("mmreason", "sw", family="sweep"):
        pass
    kinds = {e.name: e.tags.get("mlflow.experimentKind") for e in client.search_experiments()}
    assert kinds == {"mmreason-train": "custom_model_development", "mmreason-eval": "custom_model_development",
                     "mmreason-pipeline": "custom_model_development", "mmreason-sweep": "genai_development",
                     "Default": None}
    made = client.get_experiment_by_name("mmreason-train")
    assert made.artifact_location == (tmp_path / "mlruns").resolve().as_uri()  # beside the database, still


def _inputs(client, run_id: str) -> dict[str, object]:
    """The run's dataset inputs by context."""
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
            for i in client.get_run(run_id).inputs.dataset_inputs}


def test_a_stage_run_logs_its_datasets_as_inputs_without_reading_them(mlflow_store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    train = _dataset(tmp_path / "gw", rows={"train": {"maze": 4}})
    held = _dataset(tmp_path / "held", total_rows=2, shards=[{"path": "test/a.parquet", "rows": 2}])
    data = {"path": "gw", "eval_path": str(held)}  # a relative path is recorded resolved
    with tracking.stage_run("mmreason", "s", {"stage": "cot", "data": data}, tags={"stage": "cot"}) as run:
        pass
    client = mlflow.MlflowClient(mlflow_store)
    inputs = _inputs(client, run.info.run_id)
    assert set(inputs) == {"training", "evaluation"}
    training, evaluation = inputs["training"], inputs["evaluation"]
    assert (training.name, training.digest, training.source_type) == ("gw", tracking.manifest_hash(train), "local")
    assert mlflow.data.get_source(training).uri == str(train.resolve())
    assert json.loads(training.profile) == {"dataset": "gridworld", "total_rows": 4, "rows": {"train": {"maze": 4}},
                                            "shards": 1, "schema_version": 1}
    assert (evaluation.name, evaluation.digest) == ("held", tracking.manifest_hash(held))
    assert json.loads(evaluation.profile)["total_rows"] == 2
    assert evaluation.digest != training.digest

    # an evaluation's data is an evaluation input; held-out rows from data.path are not logged twice;
    # a folder without a manifest is left out (the run goes on)
    with tracking.stage_run("mmreason", "e", {"data": {"path": str(train), "eval_path": "gw"}},
                            tags={"stage": "evaluate"}) as run:
        pass
    assert {k: v.digest for k, v in _inputs(client, run.info.run_id).items()} == {
        "evaluation": tracking.manifest_hash(train)}
    with tracking.stage_run("mmreason", "n", {"data": {"path": str(tmp_path / "none")}}, tags={"stage": "cot"}) as run:
        pass
    assert client.get_run(run.info.run_id).inputs.dataset_inputs == []


def _log_input_with_others(data: str, run_id: str, start, done) -> None:
    """One of several processes logging the same dataset as their run's input at once."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    resolve_dataset_source(data)  # imports and the store's connection made before the start: the
    mlflow.MlflowClient().get_run(run_id)  # processes reach MLflow's lookup-then-insert together
    start.wait()
    try:
        tracking.log_dataset_inputs(run_id, {"path": data}, training=True)
        done.put("ok")
    except Exception as exc:  # reported to the test, which names it
        done.put(f"{type(exc).__name__}: {exc}"[:300])


def test_stages_starting_together_on_a_new_dataset_all_log_it(mlflow_store, tmp_path):
    """Concurrent trials of a sweep log the same dataset as they start: MLflow looks it up and then
    inserts it, so all but one of them hit its UNIQUE constraint (an errored sweep trial in CI):
    every run gets the input."""
    import multiprocessing

    import mlflow

    data = str(_dataset(tmp_path / "gw"))
    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.create_experiment("race")
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    ctx = multiprocessing.get_context("spawn")  # MLFLOW_TRACKING_URI comes with the environment
    start, done = ctx.Barrier(len(runs)), ctx.Queue()
    procs = [ctx.Process(target=_log_input_with_others, args=(data, run_id, start, done)) for run_id in runs]
    for proc in procs:
        proc.start()
    outcomes = [done.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert outcomes == ["ok"] * len(runs), outcomes
    logged = {(d.name, d.digest) for d in (_inputs(client, run_id)["training"] for run_id in runs)}
    assert logged == {("gw", tracking.manifest_hash(Path(data)))}


def test_a_dataset_on_s3_is_an_input_named_by_its_uri(mlflow_store, s3):
    import mlflow

    from mmreason import storage

    manifest = {"dataset": "cinepile", "schema_version": 1, "total_rows": 3, "rows": {"train": {"cinepile": 3}},
                "shards": [{"path": "train/c.parquet", "rows": 3}], "config": {"output_dir": s3.uri}}
    storage.write_text_atomic(f"{s3.uri}/cinepile-train/manifest.json", json.dumps(manifest))
    location = f"{s3.uri}/cinepile-train"
    with tracking.stage_run("mmreason", "s", {"data": {"path": location}}, tags={"stage": "cot"}) as run:
        pass
    client = mlflow.MlflowClient(mlflow_store)
    dataset = _inputs(client, run.info.run_id)["training"]
    assert (dataset.name, dataset.source_type) == ("cinepile-train", "s3")
    assert mlflow.data.get_source(dataset).uri == location
    assert dataset.digest == tracking.manifest_hash(location) and dataset.digest is not None
    assert client.get_run(run.info.run_id).data.tags["dataset_manifest_hash"] == dataset.digest


def test_an_export_is_a_logged_model_that_points_at_it(mlflow_store, tmp_path):
    """No copy of the weights: the model holds only MLflow's MLmodel stub and the export's URI;
    it is the run's output (the UI's Model column) and can be registered."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    export = tmp_path / "runs" / "cot-maze" / "export"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"\0" * 4096)
    with tracking.stage_run("mmreason", "cot-maze", {"stage": "cot"}, tags={"stage": "cot"}) as run:
        model_id = tracking.log_export(export, "cot-maze", {"stage": "cot", "backbone": "tiny-internvl"},
                                       model_type="mmreason-cot")
    client = mlflow.MlflowClient(mlflow_store)
    model = client.get_logged_model(model_id)
    assert (model.name, model.source_run_id, model.experiment_id, model.model_type) == (
        "cot-maze", run.info.run_id, run.info.experiment_id, "mmreason-cot")
    assert model.tags["export_uri"] == str(export) and model.params == {"stage": "cot", "backbone": "tiny-internvl"}
    assert model.status == LoggedModelStatus.READY
    assert [a.path for a in client.list_logged_model_artifacts(model_id)] == ["MLmodel"]
    finished = client.get_run(run.info.run_id)
    assert [o.model_id for o in finished.outputs.model_outputs] == [model_id]
    assert finished.data.tags["export_uri"] == str(export)
    assert client.list_artifacts(run.info.run_id) == []  # nor in the run's artifacts
    version = client.get_model_version("cot-maze", mlflow.register_model(f"models:/{model_id}", "cot-maze").version)
    assert (version.source, version.run_id) == (f"models:/{model_id}", run.info.run_id)
    with tracking.stage_run("mmreason", "dare-0.5", {"stage": "dare"}, tags={"stage": "dare"}):
        dotted = tracking.log_export(export, "dare-0.5", model_type="mmreason-dare")  # MLflow refuses "." in names
    assert client.get_logged_model(dotted).name == "dare-0-5"

    bucket = "s3://mmreason-runs/train/cot-maze/export"  # a remote export: its URI as it is
    with tracking.stage_run("mmreason", "remote", {"stage": "cot"}, tags={"stage": "cot"}):
        remote = tracking.log_export(bucket, "remote")
    assert client.get_logged_model(remote).tags["export_uri"] == bucket
    with pytest.raises(RuntimeError, match="needs an active MLflow run"):
        tracking.log_export(export, "nowhere")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri, needle", [
    ("http://127.0.0.1:{port}", "cannot be reached"),
    ("sqlite:////nonexistent/dir/mlflow.db", "folder /nonexistent/dir does not exist"),
    ("/tmp/some/mlruns", "file store, which MLflow 3.17 refuses"),
])
def test_unreachable_tracking_uris_are_named(uri, needle):
    uri = uri.format(port=_free_port())
    with pytest.raises(ConfigError, match=needle) as err:
        tracking.check_tracking_uri(uri)
    assert uri in str(err.value)


@pytest.mark.integration
def test_mmreason_mlflow_serves_the_local_store_on_localhost(mlflow_store, tmp_path):
    with tracking.stage_run("mmreason", "seen-in-ui", {"a": 1}, tags={"stage": "cot"}):
        pass
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mmreason"), "mlflow", "--port", str(port)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.read() == b"OK"
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        with urllib.request.urlopen(url, timeout=10) as r:
            names = {e["name"] for e in json.load(r)["experiments"]}
        assert "mmreason-train" in names  # the store the UI reads is the local one
        listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command stops the server's whole process group
        proc.wait(timeout=30)
    time.sleep(1)
    serving = [p for p in psutil.process_iter(["cmdline"]) if str(port) in (p.info["cmdline"] or [])]
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in serving), "the UI server outlived Ctrl-C"
