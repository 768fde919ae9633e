"""Cluster operation: cluster.yaml against Ray's own schema, and a real multi-node Ray cluster on
this machine — `ray start --head` + worker nodes (token auth off, as REFERENCE says) — that takes a
training stage through `ray job submit`, loses a worker node mid-training, and finishes the stage
from its last checkpoint on the nodes that are left."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def test_cluster_yaml_passes_rays_validator_and_wires_storage_mlflow_and_the_project():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)  # what `ray up` does before anything else: defaults, then the schema
    validate_config(config)
    types = config["available_node_types"]
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"] == "p4d.24xlarge"]
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types)
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-cu128"
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert any("/mnt/shared" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("MLFLOW_TRACKING_URI=http://" in c and "ray start" in c for c in commands)
    assert config["file_mounts"]["/home/ray/mmreason"] == "."

    broken = dict(raw, available_node_types={**raw["available_node_types"], "a100_x8": {
        **raw["available_node_types"]["a100_x8"], "max_wokers": 4}})
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(broken))


def test_runtime_env_and_rayignore():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((REPO / "runtime_env.yaml").read_text()))
    assert env["env_vars"]["DS_BUILD_OPS"] == "0"
    ignored = (REPO / ".rayignore").read_text().split()
    assert {".git/", ".venv/", "runs/", "mlruns/", "mlflow.db"} <= set(ignored)


# ------------------------------------------------------------------ a local multi-node cluster

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start` processes on this machine, under a private temp dir: a plain `ray start --head`
    would record itself in /tmp/ray/ray_current_cluster, where every `ray.init()` on the machine
    (other people's tests, benchmarks) would find and join it."""

    def __init__(self, env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Unix socket paths
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # notice a dead node in ~10 s instead of ~30 s
                    "RAY_health_check_period_ms": "2000", "RAY_health_check_timeout_ms": "3000",
                    "RAY_health_check_failure_threshold": "3",
                    "RAY_raylet_start_wait_time_s": "120"}  # a busy 2-core machine starts nodes slowly
        self.env.pop("RAY_ADDRESS", None)

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, head_cpus: int, worker_nodes: int) -> None:
        subprocess.run([RAY, "start", "--head", f"--port={self.port}", f"--num-cpus={head_cpus}",
                        f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats", *self._node_ports()],
                       env=self.env, check=True, capture_output=True, timeout=120)
        for _ in range(worker_nodes):  # one at a time: parallel joins time out on a busy 2-core machine
            joined = self.ray("start", f"--address={self.gcs}", "--num-cpus=1", *self._node_ports(), timeout=180)
            assert joined.returncode == 0, joined.stderr[-2000:]

    @staticmethod
    def _node_ports() -> list[str]:
        """Ports of its own for each node's dashboard agent: the default (52365) is taken by any other
        Ray on the machine, and then no node has a job agent ('No available agent to submit job')."""
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}"]

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def kill_node(self, node_id: str) -> None:
        """A node lost the way a reclaimed spot instance goes: told first (drained for
        preemption, as the autoscaler does), then its raylet and every process under it killed."""
        import psutil

        drained = self.ray("drain-node", f"--address={self.gcs}", f"--node-id={node_id}",
                           "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test: spot reclaim",
                           "--deadline-remaining-seconds=1")
        assert drained.returncode == 0, drained.stderr
        raylets = [p for p in psutil.process_iter(["cmdline"])
                   if f"--node_id={node_id}" in " ".join(p.info["cmdline"] or [])]
        assert len(raylets) == 1
        _kill([*raylets[0].children(recursive=True), raylets[0]])

    def shutdown(self) -> None:
        """Every process of this cluster and nothing else: those whose command line names its temp
        dir or its GCS port (the Ray client server), those whose RAY_ADDRESS is its GCS (job
        drivers, which Ray starts in a session of their own), and all their children (Ray renames
        its agents, so their command lines no longer say)."""
        import psutil

        port = f":{self.port}"
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                if self.temp_dir in cmdline or f"{port} " in f"{cmdline} " or \
                        p.environ().get("RAY_ADDRESS", "").endswith(port):
                    mine.append(p)
            except psutil.Error:
                pass
        family = {p.pid: p for p in mine}
        for p in mine:
            try:
                family.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        family.pop(os.getpid(), None)
        _kill(list(family.values()))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill(procs: list) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def _latest_checkpoint_epoch(run_dir: Path) -> int | None:
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(latest["metrics"]["epoch"]) if latest else None


@pytest.fixture
def shared(tmp_path):
    """The 'shared storage' every node sees: one folder (on a real cluster, the EFS mount)."""
    from dataclasses import asdict

    from mmreason.config import load_config
    from mmreason.data.gridworld import GridworldConfig, plan_shards
    from mmreason.data.shards import MANIFEST_NAME, write_json_atomic
    from pipelines import gridworld

    data = tmp_path / "shared" / "data"
    cfg = load_config(GridworldConfig, None, [f"output_dir={data}", "examples=80", "tasks={maze: {sizes: [3]}}",
                                              "step_images=false"])
    specs = plan_shards(cfg)
    entries = [gridworld._render_shard(asdict(s), cfg, str(data)) for s in specs]
    write_json_atomic(data / MANIFEST_NAME, gridworld._manifest(cfg, entries, len(specs)))
    return tmp_path / "shared"


@pytest.mark.integration
def test_ray_job_submit_of_a_stage_survives_losing_a_worker_node(shared):
    """3 nodes (head with 1 CPU + 2 × 1 CPU), a 2-worker cot stage submitted with `ray job submit`;
    once a checkpoint is on the shared storage, the node of a training worker is reclaimed. Ray
    Train restarts the workers on the 2 CPUs left, from that checkpoint, and the job SUCCEEDS."""
    import mlflow
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    uri = f"sqlite:///{shared / 'mlflow.db'}"
    cluster = LocalCluster({**os.environ, "MLFLOW_TRACKING_URI": uri})  # as cluster.yaml exports it on every node
    epochs = 8
    try:
        cluster.start(head_cpus=1, worker_nodes=2)
        submit = ["job", "submit", f"--address={cluster.dashboard}", "--working-dir", str(REPO),
                  "--runtime-env", str(REPO / "runtime_env.yaml"), "--no-wait", "--",
                  "python", "-m", "jobs.train", "configs/train/cot-maze.yaml", f"data.path={shared / 'data'}",
                  f"storage={shared / 'runs'}", "run_name=ft", "optim.batch_size=4", f"optim.epochs={epochs}",
                  "eval.epoch_examples=0", "eval.max_examples=2", "eval.modes={cot: {max_new_tokens: 8}}"]
        give_up = time.time() + 120
        while True:  # the head's job agent registers a little after `ray start` returns
            submitted = cluster.ray(*submit)
            if "No available agent" not in submitted.stderr or time.time() > give_up:
                break
            time.sleep(1)
        assert submitted.returncode == 0, submitted.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)
        client = JobSubmissionClient(cluster.dashboard)

        run_dir, deadline = shared / "runs" / "ft", time.time() + 300
        while _latest_checkpoint_epoch(run_dir) is None:
            assert time.time() < deadline and not client.get_job_status(job_id).is_terminal(), \
                client.get_job_logs(job_id)[-3000:]
            time.sleep(0.3)
        checkpointed = _latest_checkpoint_epoch(run_dir)
        head = next(n.node_id for n in list_nodes(address=cluster.dashboard) if n.is_head_node)
        workers = list_actors(address=cluster.dashboard,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        victim = next(a.node_id for a in workers if a.node_id != head)
        cluster.kill_node(victim)

        while not client.get_job_status(job_id).is_terminal():
            assert time.time() < deadline + 300, client.get_job_logs(job_id)[-3000:]
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        # the job's console keeps Ray Train's own lines in the run's log file, whose path it prints first
        log_file = Path(re.search(r"log: (\S+)", logs).group(1))
        full = log_file.read_text()
        assert "Source: preemption" in full and "[FailurePolicy] RETRY" in full
        dead = {n.node_id for n in list_nodes(address=cluster.dashboard) if n.state == "DEAD"}
        assert dead == {victim}
    finally:
        cluster.shutdown()

    run = mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()], "attributes.run_name = 'ft'")[0]
    assert run.info.status == "FINISHED"
    logged = [m.value for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "epoch")]
    # epochs up to the checkpoint ran once (no restart from scratch); every epoch ran; it finished
    assert all(logged.count(float(e)) == 1 for e in range(checkpointed + 1))
    assert set(logged) == {float(e) for e in range(epochs)} and logged[-1] == epochs - 1
    assert (run_dir / "export" / "model.safetensors").is_file()
