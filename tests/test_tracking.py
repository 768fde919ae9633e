"""The MLflow layout (mmreason.tracking): tags every run carries, experiments per stage family,
nesting, tracking-URI checks, and `mmreason mlflow` serving the local store on 127.0.0.1."""

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
