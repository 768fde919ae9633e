"""The training job for real: Ray Train (2 workers) + DeepSpeed ZeRO-2 + MLflow, at toy scale."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mmreason.config import ConfigError, load_config
from mmreason.models import CheckpointError, build_tiny, load_backbone
from mmreason.train.config import TrainConfig
from jobs import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def stage_cfg(data: Path, storage: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        f"data.path={data}", f"storage={storage}", "run_name=t", "optim.batch_size=8", "optim.epochs=1",
        "eval.max_examples=6", "eval.batch_size=6", "eval.modes.cot.max_new_tokens=24",
        "eval.modes.vanilla.max_new_tokens=8", *extra])


def test_cot_stage_trains_exports_evaluates_tracks_and_resumes(maze_data, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = stage_cfg(maze_data, tmp_path / "runs")
    out = train.run_stage(cfg)
    assert out["train"]["epoch"] == 0 and out["train"]["steps_per_epoch"] == 80 // 16
    assert set(out["eval"]) == {"vanilla", "cot"}
    export = Path(out["export"])
    assert (export / "model.safetensors").is_file()
    family = load_backbone("tiny-internvl", export)  # HF format, through from_pretrained
    assert family.model.config.model_type == "internvl"
    preds = (cfg.run_dir / "eval" / "predictions-cot.jsonl").read_text().splitlines()
    assert len(preds) == 6 and {"id", "prediction", "correct", "n_tokens"} <= set(json.loads(preds[0]))
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.params["stage"] == "cot" and "loss" in run.data.metrics and "cot_accuracy" in run.data.metrics
    assert run.data.tags.get("mlflow.parentRunId")

    # same run name and storage, more epochs: resumes after epoch 0 instead of starting over
    again = train.run_stage(stage_cfg(maze_data, tmp_path / "runs", "optim.epochs=2"))
    assert again["train"]["epoch"] == 1
    history = mlflow.MlflowClient().get_metric_history(again["mlflow_run_id"], "epoch")
    assert [m.value for m in history] == [1.0]
    assert "data_wait_s" in run.data.metrics


def test_training_rows_are_cut_into_whole_batches_on_block_boundaries(maze_data, tmp_path):
    """Ray Train's equal split of the dataset then never cuts a block (a Ray task each epoch)."""
    ds, n_rows = train.train_dataset(stage_cfg(maze_data, tmp_path / "runs"))
    assert n_rows == 80
    blocks = train.batch_blocks(ds, n_rows, n_batches=6, batch_size=12)  # 72 of the 80 rows train
    assert [e.metadata.num_rows for bundle in blocks.iter_internal_ref_bundles() for e in bundle.blocks] == [12] * 6
    kept = [r["id"] for r in blocks.take_all()]
    assert len(set(kept)) == 72 and set(kept) <= {r["id"] for r in ds.take_all()}
    shards = blocks.streaming_split(2, equal=True)  # read at once, as the workers do
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda shard: [i for b in shard.iter_batches(batch_size=12) for i in b["id"]], shards))
    assert [len(r) for r in rows] == [36, 36] and sorted(rows[0] + rows[1]) == sorted(kept)


def test_training_deepspeed_skips_the_shared_memory_inference_op():
    """Its ~45 s compile is not waited for by any worker; ZeRO's collectives stay on torch.distributed."""
    from deepspeed.comm.torch import build_shm_op

    from mmreason.train.loop import training_deepspeed

    training_deepspeed()
    assert build_shm_op() is None


@pytest.mark.parametrize(
    "override, error, needle",
    [
        ("model.backbone=tiny-gpt", ConfigError, "unknown backbone 'tiny-gpt'"),
        ("stage=rlhf", ConfigError, "config key 'stage' must be one of \\['cot', 'coconut', 'rl', 'dare', 'cosre'\\], got 'rlhf'"),
        ("init_from=/nonexistent/ckpt", CheckpointError, "checkpoint /nonexistent/ckpt does not exist"),
        ("visual_thoughts.enabled=true", ConfigError, "the internvl family \\(tiny-internvl\\) cannot write images"),
    ],
)
def test_bad_stage_inputs_fail_before_any_worker_starts(maze_data, tmp_path, override, error, needle):
    with pytest.raises(error, match=needle):
        train.run_stage(stage_cfg(maze_data, tmp_path / "runs", override))
    assert not (tmp_path / "runs" / "t").exists() or not list((tmp_path / "runs" / "t").glob("checkpoint_*"))


def test_dataset_without_shards_and_foreign_checkpoints_are_named(maze_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(FileNotFoundError, match=f"{empty} has no train shards"):
        train.run_stage(stage_cfg(empty, tmp_path / "runs"))
    not_ckpt = tmp_path / "notckpt"
    not_ckpt.mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        train.run_stage(stage_cfg(maze_data, tmp_path / "runs", f"init_from={not_ckpt}"))
    internvl = build_tiny("tiny-internvl", tmp_path / "ti")
    (internvl / "config.json").write_text(
        (internvl / "config.json").read_text().replace('"model_type": "internvl"', '"model_type": "chameleon"'))
    with pytest.raises(CheckpointError, match="'chameleon' model"):
        train.run_stage(stage_cfg(maze_data, tmp_path / "runs", f"init_from={internvl}"))


@pytest.mark.parametrize("backbone, extra", [("tiny-anole", "visual_thoughts.enabled=true"),
                                             ("tiny-phi4mm", "visual_thoughts.enabled=false")])
def test_every_tiny_family_trains_cot_through_ray_train_and_deepspeed(maze_data, tmp_path, monkeypatch, backbone,
                                                                      extra):
    """tiny-internvl: test_cot_stage_…; tiny-anole with MVoT's visual thoughts (drawn step images in
    the targets, the discrepancy loss logged)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = train.run_stage(stage_cfg(maze_data, tmp_path / "runs", f"model.backbone={backbone}", extra,
                                    "eval.modes={cot: {max_new_tokens: 8}}"))
    assert out["train"]["steps_per_epoch"] == 5 and out["train"]["loss"] > 0
    assert ("visual_discrepancy" in out["train"]) == extra.endswith("true")
    if extra.endswith("true"):
        assert out["train"]["visual_discrepancy"] > 0
    family = load_backbone(backbone, out["export"])
    assert family.model.config.model_type in family.model_types
    assert out["eval"]["cot"]["n"] == 6


def test_sigkill_mid_run_then_rerun_resumes_at_the_right_epoch_and_stage(maze_data, tmp_path):
    """Kill the driver (and the local Ray it started) once a checkpoint exists; the same command
    run again continues from that checkpoint's epoch and curriculum stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow
    import psutil

    init = build_tiny("tiny-internvl", tmp_path / "init")
    storage = tmp_path / "runs"
    args = [str(REPO / "configs/train/coconut-maze.yaml"), f"data.path={maze_data}", f"storage={storage}",
            "run_name=k", f"init_from={init}", "optim.batch_size=8", "optim.epochs=4", "eval.epoch_examples=0",
            "eval.max_examples=4", "eval.modes={coconut: {max_new_tokens: 8}}",
            "coconut={c_thought: 1, epochs_per_stage: 1, max_latent_stage: 2, uniform_prob: 0.0}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = storage / "k"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if _latest_checkpoint_epoch(run_dir) is not None:  # registered by Ray Train, not just uploaded
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    p.send_signal(signal.SIGKILL)
            except (ProcessLookupError, psutil.Error):
                pass
        proc.wait(timeout=30)
    done = _latest_checkpoint_epoch(run_dir)  # what Ray Train resumes from
    assert done is not None and done < 3

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        from mmreason.config import load_config as load

        out = train.run_stage(load(TrainConfig, args[0], args[1:]))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    # epochs 0..3 are stages 0, 1, 2 and 3 — the last, past max_latent_stage 2, with every step latent
    assert out["train"]["epoch"] == 3 and out["train"]["stage"] == 3
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    epochs = [m.value for m in client.get_metric_history(out["mlflow_run_id"], "epoch")]
    stages = [m.value for m in client.get_metric_history(out["mlflow_run_id"], "stage")]
    assert epochs == [float(e) for e in range(done + 1, 4)]
    assert stages == [float(e) for e in range(done + 1, 4)]


def _latest_checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the checkpoint Ray Train has recorded as latest (its snapshot), if any."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(latest["metrics"]["epoch"]) if latest else None
