"""The training job for real: Ray Train (2 workers) + DeepSpeed ZeRO-2 + MLflow, at toy scale."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mmreason.config import ConfigError, load_config
from mmreason.models import CheckpointError, build_tiny, load_backbone
from mmreason.train.config import TrainConfig
from jobs import train
from tests.s3 import s3, s3_server  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def stage_args(data: Path, storage: Path, *extra: str) -> list[str]:
    """configs/train/cot-maze.yaml's overrides for a toy stage, as a command line gives them."""
    return [f"data.path={data}", f"storage={storage}", "run_name=t", "optim.batch_size=8", "optim.epochs=1",
            "eval.max_examples=6", "eval.batch_size=6", "eval.modes.cot.max_new_tokens=24",
            "eval.modes.vanilla.max_new_tokens=8", *extra]


def stage_cfg(data: Path, storage: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", stage_args(data, storage, *extra))


def test_cot_stage_trains_exports_evaluates_tracks_keeps_the_best_checkpoints_and_resumes(maze_data, tmp_path,
                                                                                         ray_session, monkeypatch):
    """One cot stage on 2 workers under ZeRO-3 with 2 micro-batches per step — its per-epoch
    evaluation needs both ranks to gather the weights — started as a user does (`mmreason train`,
    on the tests' Ray): the console shows its epoch bar — from Ray Train's reports through the
    controller's callback — while the workers' lines only reach the run's log; its export (HF format), evaluation on test and
    MLflow record (the experiment opens on runs, the data an input, the export a logged model with
    no weights copied); checkpoint retention by a named metric through Ray Train — `lr` (max), whose
    per-epoch values are known in advance: warm-up over 4 of 8 steps, then cosine, so epochs end at
    0.5, 1.0, 0.87, 0.23 × lr and keep_checkpoints=2 keeps epochs 1 and 2 (the latest 2 would be 2
    and 3) and epoch 3, the latest; and the same stage with more epochs resumes from epoch 3, not
    from the best-ranked epoch 1."""
    import os
    import re
    import subprocess
    import sys

    import mlflow

    from mmreason import console

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # for the subprocess, this process's reads and the resume
    args = ("deepspeed=configs/deepspeed/zero3.json", "optim.batch_size=10", "grad_accum=2", "optim.warmup_steps=4",
            "checkpoint_metric=lr", "checkpoint_mode=max", "keep_checkpoints=2", "eval.epoch_examples=4")
    cfg = stage_cfg(maze_data, tmp_path / "runs", "optim.epochs=4", *args)
    assert train.checkpoint_config(cfg).checkpoint_score_attribute == "lr"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # no cluster start
    done = subprocess.run([sys.executable, "-m", "mmreason.cli", "train", str(REPO / "configs/train/cot-maze.yaml"),
                           *stage_args(maze_data, tmp_path / "runs", "optim.epochs=4", *args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    # the console: the step, one line per epoch, the done line, the results table, the export
    lines = done.stdout.splitlines()
    assert len(lines) <= 14 and not done.stderr.strip(), done.stdout + done.stderr
    assert lines[1] == "[1/1] train: cot (t)"
    epochs = [line for line in lines if line.startswith("  epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/4", "2/4", "3/4", "4/4"]
    assert "loss" in epochs[0] and "ETA" in epochs[0] and "val_acc" in epochs[-1]
    assert re.fullmatch(r"\[1/1\] train: cot \(t\): done in .* — vanilla accuracy [0-9.]+, cot accuracy [0-9.]+ on test",
                        lines[-5])
    assert lines[-4].split()[:3] == ["mode", "split", "accuracy"]
    assert lines[-1] == f"export: {cfg.run_dir / 'export'}   MLflow run: {lines[-1].split()[-1]}"
    log = next((cfg.run_dir / console.LOG_DIR).glob("train-*.log")).read_text()
    for hidden in ("Reporting training result", "RayTrainWorker"):
        assert hidden in log and hidden not in done.stdout

    export = cfg.run_dir / "export"
    assert (export / "model.safetensors").is_file() and (cfg.run_dir / "best" / "model.safetensors").is_file()
    family = load_backbone("tiny-internvl", export)  # HF format, through from_pretrained
    assert family.model.config.model_type == "internvl"
    preds = (cfg.run_dir / "eval" / "predictions-cot.jsonl").read_text().splitlines()
    assert len(preds) == 6 and {"id", "prediction", "correct", "n_tokens"} <= set(json.loads(preds[0]))
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"vanilla", "cot"} and results["cot"]["split"] == "test" and results["cot"]["n"] == 6
    client = mlflow.MlflowClient(store)  # this process's MLflow may still point at an earlier test's store
    run = client.get_run(lines[-1].split()[-1])
    assert run.data.params["stage"] == "cot" and "loss" in run.data.metrics and "cot_accuracy" in run.data.metrics
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [0, 1, 2, 3]
    assert run.data.tags.get("mlflow.parentRunId") and "data_wait_s" in run.data.metrics
    # reviewable in MLflow 3: the experiment opens on runs, the data is an input, the export a model
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    training, = run.inputs.dataset_inputs
    assert training.dataset.name == maze_data.name
    assert training.dataset.digest == run.data.tags["dataset_manifest_hash"]
    model, = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert model.source_run_id == run.info.run_id and model.params["stage"] == "cot"
    assert model.tags["export_uri"] == str(export)
    assert client.list_artifacts(run.info.run_id, "model") == []  # the weights stay in the export

    def kept() -> set[int]:
        dirs = [d for d in (tmp_path / "runs/t").glob("checkpoint_*") if d.is_dir()]  # not Ray's snapshot file
        return {json.loads((d / "progress.json").read_text())["epoch"] for d in dirs}

    assert kept() == {1, 2, 3}
    assert _latest_checkpoint_epoch(str(tmp_path / "runs/t")) == 3

    # same run name and storage, more epochs: resumes after epoch 3 (the latest) instead of starting over
    again = train.run_stage(stage_cfg(maze_data, tmp_path / "runs", "optim.epochs=5", *args))
    assert again["train"]["epoch"] == 4 and again["train"]["global_batch"] == 40
    assert again["train"]["steps_per_epoch"] == 80 // 40  # 2 workers × 10 × 2 micro-batches
    history = client.get_metric_history(again["mlflow_run_id"], "epoch")
    assert [m.value for m in history] == [4.0]
    assert kept() == {1, 2, 4}  # epoch 4 ends at 0.16 × lr: now the latest, and 3 goes


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


def test_validation_rows_are_the_val_split_or_a_slice_of_train_never_trained_on(maze_data, tmp_path):
    """With a val split, per-epoch evaluation reads it and training keeps all of train; without one
    (val 0.0 here; CinePile writes none), whole layouts are carved out of train by a seeded hash —
    the same ones on every call — and the training dataset leaves exactly those rows out."""
    from mmreason.config import load_config
    from mmreason.data.gridworld import GridworldConfig
    from mmreason.data.reader import read_table
    from mmreason.data.selection import carved_validation, validation_group, validation_rows
    from pipelines import gridworld

    with_val = stage_cfg(maze_data, tmp_path / "runs")
    assert carved_validation(with_val.data) == frozenset()
    val = validation_rows(with_val.data, None)
    assert val and {r["split"] for r in val} == {"val"}
    assert {r["id"] for r in val} == set(read_table(maze_data, split="val")["id"].to_pylist())

    data = tmp_path / "noval"
    gridworld.run(load_config(GridworldConfig, None, [f"output_dir={data}", "examples=60", "tasks={maze: {sizes: [3]}}",
                                                      "splits={train: 0.9, val: 0.0, test: 0.1}"]), log=lambda *_: None)
    cfg = stage_cfg(data, tmp_path / "runs", "eval.epoch_examples=4")
    train_ids = set(read_table(data, split="train")["id"].to_pylist())
    held = carved_validation(cfg.data)
    assert held and held == carved_validation(cfg.data)
    val = validation_rows(cfg.data, None)
    assert {r["split"] for r in val} == {"train"} and {validation_group(r) for r in val} == held
    ds, n_rows = train.train_dataset(cfg)
    trained = {r["id"] for r in ds.take_all()}
    assert n_rows == len(trained) == len(train_ids) - len(val) and not trained & {r["id"] for r in val}
    assert not {validation_group(r) for r in ds.take_all()} & held  # a layout is wholly in one or the other
    assert train.train_dataset(stage_cfg(data, tmp_path / "runs", "eval.epoch_examples=0"))[1] == len(train_ids)
    other_seed = stage_cfg(data, tmp_path / "runs", "eval.epoch_examples=4", "data.val_seed=1")
    assert carved_validation(other_seed.data) != held


def test_per_epoch_evaluation_and_best_never_read_the_test_split(maze_data, tmp_path):
    """The loop's own validation rows (no `eval_rows` given), in a copy of the dataset whose test
    shards are gone: any read of test would raise, so `best` and the reported eval_accuracy can only
    come from val."""
    import shutil

    import torch

    from mmreason.data.reader import read_table
    from mmreason.data.shards import CorruptShardError
    from mmreason.train.loop import LocalWorker, run_loop, single_process_env

    data = tmp_path / "data"
    shutil.copytree(maze_data, data)
    for entry in json.loads((data / "manifest.json").read_text())["shards"]:
        if entry["split"] == "test":
            (data / entry["path"]).unlink()
    with pytest.raises(CorruptShardError):
        read_table(data, split="test")
    cfg = stage_cfg(data, tmp_path / "runs", "optim.epochs=2", "optim.warmup_steps=1", "eval.epoch_examples=4",
                    "eval.batch_size=4", "eval.modes={cot: {max_new_tokens: 8}}")
    single_process_env(torch.device("cpu"))
    rows = read_table(data, split="train").to_pylist()[:16]
    worker = LocalWorker(rows, cfg.optim.batch_size, torch.device("cpu"), tmp_path / "ckpt")
    tiny = build_tiny("tiny-internvl", tmp_path / "tiny")
    out = run_loop(cfg, str(tiny), worker, REPO / cfg.deepspeed, 2, str(tmp_path / "run"))
    assert [r["epoch"] for r in worker.reported] == [0, 1] and all("eval_accuracy" in r for r in worker.reported)
    assert out["best_eval_accuracy"] == max(r["eval_accuracy"] for r in worker.reported)
    assert (tmp_path / "run/best/model.safetensors").is_file()


def test_training_deepspeed_skips_the_shared_memory_inference_op():
    """Its ~45 s compile is not waited for by any worker; ZeRO's collectives stay on torch.distributed."""
    from deepspeed.comm.torch import build_shm_op

    from mmreason.train.loop import training_deepspeed

    training_deepspeed()
    assert build_shm_op() is None


def test_fresh_tiny_anole_codebook_fit_then_tokenizer_training_is_saved_in_its_init(maze_data, tmp_path):
    """`model.codebook_rows` + `model.tokenizer_steps`: k-means on the rows' images, then tokenizer
    training, both reported, and the checkpoint the stage starts from quantises with the result."""
    cfg = stage_cfg(maze_data, tmp_path / "runs", "model.backbone=tiny-anole", "model.codebook_rows=6",
                    "model.tokenizer_steps=30")
    built = build_tiny("tiny-anole", tmp_path / "init")
    fresh = load_backbone("tiny-anole", built)
    stats = train.fit_tiny_codebook(cfg, built)
    assert stats["residual_after"] < stats["residual_before"]
    assert stats["tokenizer_steps"] == 30 and stats["tokenizer_mse_last"] < stats["tokenizer_mse_first"]
    from mmreason.data.selection import training_rows
    images = [im for row in training_rows(cfg.data, 6) for im in row["images"]]
    assert not torch.equal(load_backbone("tiny-anole", built).image_token_ids(images), fresh.image_token_ids(images))


@pytest.mark.parametrize(
    "override, error, needle",
    [
        ("model.backbone=tiny-gpt", ConfigError, "unknown backbone 'tiny-gpt'"),
        ("stage=rlhf", ConfigError, "config key 'stage' must be one of \\['cot', 'coconut', 'rl', 'dare', 'cosre'\\], got 'rlhf'"),
        ("init_from=/nonexistent/ckpt", CheckpointError, "checkpoint /nonexistent/ckpt does not exist"),
        ("visual_thoughts.enabled=true", ConfigError, "the internvl family \\(tiny-internvl\\) cannot write images"),
        ("use_gpu=true", ConfigError, "use_gpu: true asks for 1 GPU\\(s\\) per worker, but the cluster has 0 GPU\\(s\\)"),
        ("storage=hdfs://nn/runs", ConfigError, "storage: 'hdfs://nn/runs' is not a supported location"),
        ("deepspeed=configs/deepspeed/nope.json", ConfigError, "deepspeed: config file not found"),
        ("model.codebook_rows=100", ConfigError, "model.codebook_rows: only an anole-family backbone has a VQ codebook"),
        ("model.backbone=tiny-anole model.codebook_rows=100 model.checkpoint=/x", ConfigError,
         "model.codebook_rows: the codebook is fitted only for a fresh tiny backbone; this stage starts from /x"),
        ("model.backbone=tiny-anole model.tokenizer_steps=50", ConfigError,
         "model.tokenizer_steps: the tokenizer trains on the images of model.codebook_rows"),
    ],
)
def test_bad_stage_inputs_fail_before_any_worker_starts(maze_data, tmp_path, override, error, needle):
    with pytest.raises(error, match=needle):
        train.run_stage(stage_cfg(maze_data, tmp_path / "runs", *override.split(" ")))
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


def test_truncated_missing_and_foreign_shards_are_named_before_any_worker_starts(maze_data, tmp_path, capsys):
    """A training run over a damaged dataset stops in its checks with one message naming each bad
    shard; readers of held-out rows check the same way."""
    import shutil

    from mmreason.data.reader import read_table
    from mmreason.data.shards import CorruptShardError

    data = tmp_path / "data"
    shutil.copytree(maze_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    train_shards = [e["path"] for e in manifest["shards"] if e["split"] == "train"]
    cut = data / train_shards[0]
    cut.write_bytes(cut.read_bytes()[:-100])  # truncated, as a copy cut short leaves it
    args = [str(REPO / "configs/train/cot-maze.yaml"), f"data.path={data}", f"storage={tmp_path / 'runs'}", "run_name=c"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cut) in err and "truncated" in err
    assert not (tmp_path / "runs").exists()  # stopped before a run dir, a backbone or Ray

    (data / train_shards[0]).write_bytes((maze_data / train_shards[0]).read_bytes())  # whole again
    (data / train_shards[1]).unlink()
    (data / "manifest.json").write_text(json.dumps(dict(manifest, dataset="cinepile")))  # now foreign
    with pytest.raises(CorruptShardError) as caught:
        read_table(data, split="train")
    message = str(caught.value)
    assert "2 bad shard(s)" in message and f"{data / train_shards[1]} is missing" in message
    assert f"{data / train_shards[0]} is a shard of 'gridworld', not of this 'cinepile' dataset" in message


def test_check_validates_and_prints_resources_without_starting_a_stage(maze_data, tmp_path, capsys):
    args = [str(REPO / "configs/train/cot-maze.yaml"), f"data.path={maze_data}", f"storage={tmp_path / 'runs'}",
            "run_name=c", "grad_accum=2", "optim.batch_size=4", "precision=bf16", "--check"]
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "per_worker: {CPU: 1.0}" in printed and "global_batch: 16" in printed and "bf16: {enabled: true}" in printed
    assert printed.rstrip().endswith("nothing was started")
    assert not (tmp_path / "runs").exists()  # no run dir, no tiny backbone built
    assert train.main([*args, "use_gpu=true"]) == 2
    assert "use_gpu: true asks for 1 GPU(s) per worker, but the cluster has 0 GPU(s)" in capsys.readouterr().err


@pytest.mark.parametrize("backbone, extra", [("tiny-anole", "visual_thoughts.enabled=true"),
                                             ("tiny-phi4mm", "visual_thoughts.enabled=false")])
def test_every_tiny_family_trains_cot_through_ray_train_and_deepspeed(maze_data, tmp_path, monkeypatch, backbone,
                                                                      extra):
    """tiny-internvl (under ZeRO-3 too): test_cot_stage_…; tiny-anole with MVoT's visual thoughts
    (drawn step images in the targets, the discrepancy loss logged); tiny-phi4mm (under ZeRO-3:
    tests/test_train_loop.py::test_phi4mm_trains_under_zero3_as_under_zero2)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = train.run_stage(stage_cfg(maze_data, tmp_path / "runs", f"model.backbone={backbone}", extra,
                                    "eval.modes={cot: {max_new_tokens: 8}}", "eval.epoch_examples=4"))
    assert out["train"]["steps_per_epoch"] == 5 and out["train"]["loss"] > 0
    assert out["train"]["global_batch"] == 16 and "eval_accuracy" in out["train"]
    assert (tmp_path / "runs/t/best/model.safetensors").is_file()
    assert ("visual_discrepancy" in out["train"]) == (extra == "visual_thoughts.enabled=true")
    if extra.endswith("true"):
        assert out["train"]["visual_discrepancy"] > 0
    family = load_backbone(backbone, out["export"])
    assert family.model.config.model_type in family.model_types
    assert out["eval"]["cot"]["n"] == 6


def test_on_s3_a_sigkilled_stage_resumes_at_the_right_epoch_and_stage_and_its_export_evaluates(s3, tmp_path):
    """Storage URIs end to end, against a real S3-API server: the grid-world job writes its shards to
    the bucket; a coconut stage reads them (data.path=s3://…), keeps its Ray Train checkpoints,
    `init`, `best`, `export` and `eval` there (storage=s3://…); its driver and local Ray are
    SIGKILLed once a checkpoint exists, and the same command continues from that checkpoint's
    epoch and curriculum stage; `jobs.evaluate` then reads the export from the bucket and writes its
    results there. Every
    command runs in an empty working directory, which stays empty."""
    import os
    import subprocess
    import sys
    import time

    import mlflow

    from mmreason import storage
    from tests.test_storage import kill_session

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data, runs = f"{s3.uri}/data", f"{s3.uri}/runs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # artifacts beside it
    made = subprocess.run([sys.executable, "-m", "mmreason.cli", "data", "gridworld", f"output_dir={data}",
                           "examples=100", "tasks={maze: {sizes: [3]}}", "rows_per_shard=50"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    args = [str(REPO / "configs/train/coconut-maze.yaml"), f"data.path={data}", f"storage={runs}", "run_name=k",
            "init_from=null",  # a fresh tiny backbone, built once into the bucket (runs/k/init)
            "optim.batch_size=8", "optim.epochs=4", "eval.epoch_examples=4", "eval.max_examples=4",
            "eval.modes={coconut: {max_new_tokens: 8}}",
            "coconut={c_thought: 1, epochs_per_stage: 1, max_latent_stage: 2, uniform_prob: 0.0}"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if _latest_checkpoint_epoch(f"{runs}/k") is not None:  # registered by Ray Train, not just uploaded
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        kill_session(proc)
    done = _latest_checkpoint_epoch(f"{runs}/k")  # what Ray Train resumes from
    assert done is not None and done < 3

    again = subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"export: {runs}/k/export" in again.stdout
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = again.stdout.split("MLflow run: ")[1].split()[0]
    # epochs 0..3 are stages 0, 1, 2 and 3 — the last, past max_latent_stage 2, with every step latent
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [float(e) for e in range(done + 1, 4)]
    assert [m.value for m in client.get_metric_history(run_id, "stage")] == [float(e) for e in range(done + 1, 4)]
    keys = s3.keys()
    for name in ("init", "export", "best"):
        assert f"runs/k/{name}/config.json" in keys and f"runs/k/{name}/model.safetensors" in keys
    assert "runs/k/eval/results.json" in keys and "runs/k/eval/predictions-coconut.jsonl" in keys
    assert json.loads(storage.read_text(f"{runs}/k/eval/results.json"))["coconut"]["n"] == 4

    evaluated = subprocess.run([sys.executable, "-m", "jobs.evaluate", str(REPO / "configs/eval/press-maze.yaml"),
                                f"model.checkpoint={runs}/k/export", f"data.path={data}", "max_examples=4",
                                f"output_dir={s3.uri}/eval", "generation.max_new_tokens=8", "press=none"],
                               cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert storage.read_text(f"{s3.uri}/eval/results.csv").count("\n") == 2  # the header and this run's row
    results = [k for k in s3.keys() if k.startswith("eval/") and k.endswith("/result.json")]
    assert len(results) == 1 and json.loads(storage.read_text(f"{s3.uri}/{results[0]}"))["row"]["n"] == 4
    assert sorted(cwd.rglob("*")) == []  # nothing under the working directory (no ./s3:/…)


def _latest_checkpoint_epoch(run_location: str) -> int | None:
    """The epoch of the checkpoint Ray Train has recorded as latest (its snapshot), if any."""
    from mmreason import storage

    try:
        latest = json.loads(storage.read_text(f"{run_location}/checkpoint_manager_snapshot.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = latest.get("latest_checkpoint_result")
    return int(latest["metrics"]["epoch"]) if latest else None


def test_gpus_the_autoscaler_can_add_count_for_use_gpu(ray_session, monkeypatch):
    """A cluster from cluster.yaml starts without GPU nodes: `ray up` leaves its launcher config on
    the head, whose p4d node types (8 GPUs) the autoscaler adds when a stage asks for GPUs."""
    from mmreason.hardware import require_gpus
    from pipelines import cluster_gpus

    monkeypatch.setenv("MMREASON_AUTOSCALER_CONFIG", str(REPO / "cluster.yaml"))
    now, scalable = cluster_gpus()
    assert (now, scalable) == (0.0, 8.0)
    require_gpus(True, 1, now, scalable=scalable)  # served once a p4d node is up
    with pytest.raises(ConfigError, match="asks for 16 GPU\\(s\\) per worker, but the cluster has 0 GPU\\(s\\) and "
                                          "its autoscaler can add nodes of at most 8"):
        require_gpus(True, 16, now, scalable=scalable)
    monkeypatch.setenv("MMREASON_AUTOSCALER_CONFIG", str(REPO / "no-such-file.yaml"))
    assert cluster_gpus() == (0.0, 0.0)
