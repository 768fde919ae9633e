"""Train one stage on Ray Train + DeepSpeed, then evaluate it.

    python -m jobs.train CONFIG.yaml [key=value ...] [--check]
    mmreason train CONFIG.yaml [key=value ...] [--check]          (the same, through the console script)
    python -m jobs.train configs/train/cot-maze.yaml workers=2 optim.epochs=4
    python -m jobs.train configs/train/cot-maze.yaml use_gpu=true precision=bf16 storage=s3://bucket/runs

Everything a user can get wrong (backbone, stage, a path setting that is neither a local path nor an
s3:// / gs:// URI, dataset without shards, a checkpoint that is not one or is another family's, an rl
reward path or signature, group size < 2, HiCo on a family without it, use_gpu on a cluster with no
GPUs) is checked here or when the config loads, before any worker starts; `--check` stops there and
prints the resolved config and the resources the stage would ask for. Re-running with the same
`run_name` and `storage` resumes from the last checkpoint (epoch and curriculum stage restored).
Per-epoch evaluation reads the validation rows (`data.val_split`, or a slice carved out of train) and
picks `best`; Ray Train keeps the best `keep_checkpoints` by `checkpoint_metric` plus the latest.
The export is then evaluated on `data.eval_split` (test) for the report, in a Ray task with one
worker's resources (its GPU when `use_gpu`), not in the driver, which on a cluster sits on a head
node with no CPUs for Ray work.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmreason import console, storage
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import ConfigError, load_config
from mmreason.data.cinepile import matches_filters
from mmreason.data.reader import shard_entries
from mmreason.data.shards import verify_shards
from mmreason.data.schema import EXAMPLE_SCHEMA
from mmreason.data.selection import carved_validation, held_out_rows, validation_group, validation_rows
from mmreason.eval.runner import evaluate
from mmreason.hardware import local_device, require_gpus, torch_dtype
from mmreason.kv.accounting import KVMeter
from mmreason.models import build_tiny, check_checkpoint, get_spec, load_backbone
from mmreason.train.config import TrainConfig
from mmreason.train.rewards import Rewards
from mmreason.train.stages.dare import ROUTER_FILE
from pipelines import init_ray

REPO = Path(__file__).resolve().parents[1]


def resolve_locations(cfg: TrainConfig) -> None:
    """Every path setting as workers elsewhere (another cwd, another node) can use it: local paths
    absolute, s3:// / gs:// URIs normalised; anything else is an error naming the setting."""
    cfg.storage = storage.check_location(cfg.storage, "storage")
    cfg.data.path = storage.check_location(cfg.data.path, "data.path")
    if cfg.data.eval_path is not None:
        cfg.data.eval_path = storage.check_location(cfg.data.eval_path, "data.eval_path")
    if cfg.init_from is not None:
        cfg.init_from = storage.check_location(cfg.init_from, "init_from")
    if cfg.model.checkpoint is not None and "://" in cfg.model.checkpoint:  # else a local path or a hub id
        cfg.model.checkpoint = storage.check_location(cfg.model.checkpoint, "model.checkpoint")


def resolve_model_path(cfg: TrainConfig) -> str:
    """The checkpoint this stage starts from (a local dir, a URI, or a hub id), checked before any
    worker starts; a tiny backbone without one is built once into the run's `init`."""
    try:
        spec = get_spec(cfg.model.backbone)
    except ValueError as exc:
        raise ConfigError(f"model.backbone: {exc}") from None
    check_codebook_rows(cfg)
    if cfg.init_from is not None:
        check_checkpoint(cfg.model.backbone, cfg.init_from)
        return cfg.init_from if storage.is_remote(cfg.init_from) else str(Path(cfg.init_from).resolve())
    if cfg.model.checkpoint is not None:
        if spec.tiny or storage.is_remote(cfg.model.checkpoint) or Path(cfg.model.checkpoint).exists():
            check_checkpoint(cfg.model.backbone, cfg.model.checkpoint)
            remote = storage.is_remote(cfg.model.checkpoint)
            return cfg.model.checkpoint if remote else str(Path(cfg.model.checkpoint).resolve())
        return cfg.model.checkpoint  # a hub id for a real backbone
    if spec.builder is not None:
        raise ConfigError(f"model.checkpoint: {cfg.model.backbone} is built locally; write it once with "
                          f"`mmreason models build {cfg.model.backbone} DIR` and set model.checkpoint=DIR")
    if not spec.tiny:
        raise ConfigError(f"model.checkpoint: {cfg.model.backbone} needs a checkpoint path or hub id")
    if cfg.video.use_hico and spec.family.name != "phi4mm":
        raise ConfigError(f"video.use_hico: HiCo frame merging is implemented for the phi4mm family, not "
                          f"{cfg.model.backbone} ({spec.family.name})")
    init = storage.join(cfg.run_location, "init")
    if not storage.exists(storage.join(init, "config.json")):
        with tempfile.TemporaryDirectory() as tmp:  # built whole, then put in place
            built = build_tiny(cfg.model.backbone, Path(tmp) / "init", seed=cfg.seed)
            if cfg.model.codebook_rows:
                fit_tiny_codebook(cfg, built)
            if storage.is_remote(init):
                storage.upload_dir(built, init)
            else:
                Path(init).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(built, init)
    return init


def check_codebook_rows(cfg: TrainConfig) -> None:
    """`model.codebook_rows` needs a fresh tiny backbone of the anole family."""
    if cfg.model.tokenizer_steps < 0:
        raise ConfigError(f"model.tokenizer_steps: {cfg.model.tokenizer_steps} < 0")
    if cfg.model.tokenizer_steps and not cfg.model.codebook_rows:
        raise ConfigError("model.tokenizer_steps: the tokenizer trains on the images of model.codebook_rows "
                          "training rows; set model.codebook_rows too")
    if not cfg.model.codebook_rows:
        return
    family = get_spec(cfg.model.backbone).family.name
    if family != "anole":
        raise ConfigError(f"model.codebook_rows: only an anole-family backbone has a VQ codebook to fit, not "
                          f"{cfg.model.backbone}")
    if cfg.init_from is not None or cfg.model.checkpoint is not None:
        raise ConfigError("model.codebook_rows: the codebook is fitted only for a fresh tiny backbone; this stage "
                          "starts from " + (cfg.init_from or cfg.model.checkpoint) + " (set model.codebook_rows=0)")


def fit_tiny_codebook(cfg: TrainConfig, checkpoint: Path) -> dict[str, float]:
    """Fit the fresh tiny-anole's VQ codebook at `checkpoint` to the images of `model.codebook_rows`
    training rows (prompt and step images) — k-means, then `model.tokenizer_steps` of tokenizer
    training — and save it there."""
    from mmreason.data.selection import training_rows

    rows = training_rows(cfg.data, cfg.model.codebook_rows)
    images = [im for row in rows for im in (*row["images"], *(row.get("step_images") or []))]
    if not images:
        raise ConfigError(f"model.codebook_rows: the training rows of {cfg.data.path} hold no images to fit to")
    family = load_backbone(cfg.model.backbone, checkpoint)
    stats = family.fit_codebook(images, seed=cfg.seed)
    print(f"tiny-anole codebook fitted to {len(images)} images of {len(rows)} rows: {int(stats['codes_used'])} codes "
          f"used, latent residual {stats['residual_before']:.3f} -> {stats['residual_after']:.3f}", flush=True)
    if cfg.model.tokenizer_steps:
        trained = family.train_tokenizer(images, cfg.model.tokenizer_steps, seed=cfg.seed)
        print(f"tiny-anole tokenizer trained {cfg.model.tokenizer_steps} steps: reconstruction mse "
              f"{trained['mse_first']:.3f} -> {trained['mse_last']:.3f}, {int(trained['codes_used'])} codes used",
              flush=True)
        stats = {**stats, **{f"tokenizer_{k}": v for k, v in trained.items()}}
    family.save(checkpoint)
    return stats


def train_shards(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The manifest entries of the training shards; no shards for a task is an error naming it."""
    entries = []
    for task in cfg.data.tasks:
        found = shard_entries(cfg.data.path, split="train", task=task, sizes=cfg.data.sizes)
        if not found:
            raise FileNotFoundError(f"data.path {cfg.data.path} has no train shards for task {task!r}"
                                    + (f" and sizes {cfg.data.sizes}" if cfg.data.sizes else ""))
        entries += found
    verify_shards(cfg.data.path, entries)  # a truncated or foreign shard is named before Ray starts
    return entries


def check_visual_thoughts(cfg: TrainConfig) -> None:
    """MVoT's visual thoughts need a family that writes images and rows that carry step images."""
    from mmreason.models.base import Family

    family = get_spec(cfg.model.backbone).family
    if family.drawn_images is Family.drawn_images:
        raise ConfigError(f"visual_thoughts.enabled: the {family.name} family ({cfg.model.backbone}) cannot write "
                          f"images; MVoT's visual thoughts need an anole-family backbone (tiny-anole, anole-7b)")
    rows = held_out_rows(cfg.data, 1, cfg.video.num_frames)
    if rows and not rows[0].get("step_images"):
        raise ConfigError(f"visual_thoughts.enabled: rows in {cfg.data.path} have no step_images "
                          f"(render the dataset with step_images=true)")


def train_dataset(cfg: TrainConfig) -> tuple[Any, int]:
    """A Ray Dataset over the training shards (lazy unless filtered) and its row count (from the
    manifest unless filtered). Groups carved out of train as validation rows (a dataset without
    `data.val_split`, when the stage evaluates each epoch or its export on them — a sweep's trial)
    are left out."""
    import ray.data

    entries = train_shards(cfg)
    fs, root = storage.filesystem(cfg.data.path)  # a local dir, or a bucket prefix read through pyarrow
    ds = ray.data.read_parquet([f"{root}/{e['path']}" for e in entries], filesystem=fs, schema=EXAMPLE_SCHEMA)
    n_rows = sum(e["rows"] for e in entries)
    filtered = cfg.data.hard_split is not None or cfg.data.visual_reliance is not None
    if filtered:
        hard, visual = cfg.data.hard_split, cfg.data.visual_reliance
        ds = ds.filter(lambda row: matches_filters(json.loads(row["meta"]), hard, visual))
    reads_validation = cfg.eval.epoch_examples or cfg.data.evaluate_on == "val_split"
    held = carved_validation(cfg.data) if reads_validation else frozenset()
    if held:  # before max_train_rows: the validation slice does not depend on it
        ds, filtered = ds.filter(lambda row: validation_group(row) not in held), True
    if cfg.data.max_train_rows is not None and (filtered or cfg.data.max_train_rows < n_rows):
        ds, n_rows = ds.limit(cfg.data.max_train_rows), min(n_rows, cfg.data.max_train_rows)
    if filtered:
        ds = ds.materialize()  # read and filtered once: counted here, cut into batches by `batch_blocks`
        n_rows = ds.count()  # the manifest's counts are before the filters
        if n_rows == 0:
            raise ConfigError(f"no training rows in {cfg.data.path} pass data.hard_split={cfg.data.hard_split}, "
                              f"data.visual_reliance={cfg.data.visual_reliance} outside the validation slice")
    return ds, n_rows


def batch_blocks(ds: Any, n_rows: int, n_batches: int, batch_size: int) -> Any:
    """The rows an epoch uses (`n_batches` × `batch_size`: every worker takes the same number of
    whole batches, so the last < workers × batch rows never train) in blocks of one batch each.
    Ray Train splits the dataset into equal shards each epoch; a cut inside a block costs a
    zero-CPU Ray task, which on a machine whose CPUs the workers hold waits for a fresh worker
    process — 2.2 s of a 9.5 s epoch, measured on 2 cores. On block boundaries it costs nothing.
    Materialized now, before the workers' placement group takes every CPU of a small machine (2
    workers × 1 CPU on 2 cores): streaming reads scheduled after that wait forever (seen here). The
    rows then sit in Ray's object store (spilled to disk when large)."""
    used = n_batches * batch_size
    return (ds.limit(used) if used < n_rows else ds).repartition(n_batches).materialize()


def stage_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one worker (and the evaluation task) asks Ray for."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}


def check_gpus(cfg: TrainConfig) -> None:
    """`use_gpu` on a cluster without enough GPUs (now, or on a node type its autoscaler can add)
    fails here, naming it, before any worker starts."""
    from pipelines import cluster_gpus

    now, scalable = cluster_gpus()
    require_gpus(cfg.use_gpu, cfg.gpus_per_worker, now, scalable=scalable)


def deepspeed_file(cfg: TrainConfig) -> Path:
    path = Path(cfg.deepspeed) if Path(cfg.deepspeed).is_absolute() else (REPO / cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"deepspeed: config file not found: {cfg.deepspeed}")
    return path


def epoch_geometry(cfg: TrainConfig, n_rows: int) -> int:
    """Optimizer steps per epoch: every worker takes the same number of whole windows of
    grad_accum micro-batches."""
    steps = n_rows // (cfg.workers * cfg.optim.batch_size * cfg.grad_accum)
    if steps < 1:
        raise ConfigError(f"{n_rows} training rows are fewer than workers × optim.batch_size × grad_accum "
                          f"({cfg.workers} × {cfg.optim.batch_size} × {cfg.grad_accum})")
    return steps


def fit(cfg: TrainConfig, model_path: str, mlflow_run_id: str | None = None,
        callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the stage on Ray Train; returns the final worker metrics. `callbacks`: Ray Train
    `UserCallback`s (e.g. Tune's `TuneReportCallback`, which a stage sweep passes for ASHA)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmreason.tracking import tracking_uri
    from mmreason.train.loop import deepspeed_config
    from mmreason.train.worker import train_loop_per_worker

    # read before Ray starts, and handed to the workers as content: a path in this job's working
    # directory need not exist on another node (nor, for a moment after ray.init, here)
    ds_json = json.loads(deepspeed_file(cfg).read_text())
    deepspeed_config(cfg, ds_json, cfg.workers)  # a file that sets what the stage config owns fails here
    init_ray()
    check_gpus(cfg)
    ds, n_rows = train_dataset(cfg)
    steps_per_epoch = epoch_geometry(cfg, n_rows)
    micro_batches = cfg.workers * steps_per_epoch * cfg.grad_accum
    ds = batch_blocks(ds, n_rows, micro_batches, cfg.optim.batch_size)
    fit_rows = []  # the dare stage's knockout measurement: the first rows of the training set
    if cfg.stage == "dare" and cfg.dare.router_fit == "knockout":
        fit_rows = ds.take_batch(min(cfg.dare.fit_rows, micro_batches * cfg.optim.batch_size),
                                 batch_format="pyarrow").to_pylist()
    storage_path, storage_fs = storage.ray_storage(cfg.storage)
    with epoch_progress(cfg) as progress_callbacks:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"train": asdict(cfg), "model_path": model_path, "steps_per_epoch": steps_per_epoch,
                               "deepspeed_config": ds_json, "mlflow_uri": tracking_uri(),
                               "mlflow_run_id": mlflow_run_id, "dare_fit_rows": fit_rows,
                               "run_location": cfg.run_location},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker=stage_resources(cfg)),
            run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                           checkpoint_config=checkpoint_config(cfg),
                                           failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                           callbacks=[*callbacks, *progress_callbacks]),
            datasets={"train": ds},
        )
        result = trainer.fit()
    return dict(result.return_value or {}) | {"train_rows": n_rows, "steps_per_epoch": steps_per_epoch}


@contextmanager
def epoch_progress(cfg: TrainConfig) -> Iterator[list[Any]]:
    """The console's epoch bar (epoch, loss, validation accuracy, ETA) while the trainer given the
    callbacks this yields fits, when a job's console session is open here (else no callbacks). Ray
    Train runs callbacks in its controller actor, not in this process: the callback puts rank 0's
    metrics of each epoch on a Ray queue, which a thread here reads. Epoch level only: the loss per
    step stays with the workers (and MLflow)."""
    if not console.active():
        yield []
        return
    import threading

    import ray
    import ray.train
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # no CPU: the workers may hold every one; on this process's node, not on a worker node whose
    # loss (a preempted spot node) would take the queue with it and, through the callback, fail the run
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    class EpochReporter(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics:
                return
            try:
                queue.put({k: metrics[0].get(k) for k in ("epoch", "loss", "eval_accuracy")}, timeout=10)
            except Exception as exc:  # the bar is only a display: training goes on without it
                print(f"epoch progress: not shown ({type(exc).__name__}: {exc})", file=sys.stderr)

    bar = console.progress(cfg.optim.epochs, "epoch")
    stop = threading.Event()

    def show(m: dict[str, Any]) -> None:
        if bar.done == 0 and m["epoch"]:
            bar.start = bar.done = m["epoch"]  # resumed: the ETA counts from here
        bar.set(m["epoch"] + 1, loss=m["loss"], val_acc=m["eval_accuracy"])

    def drain() -> None:
        try:
            while not stop.is_set():
                try:
                    show(queue.get(timeout=0.5))
                except Empty:
                    continue
            while not queue.empty():
                show(queue.get_nowait())
        except ray.exceptions.RayError:  # the queue's actor is gone (its node with it): no more epochs to show
            return

    thread = threading.Thread(target=drain, name="epoch-progress", daemon=True)
    thread.start()
    try:
        yield [EpochReporter()]
    finally:
        stop.set()
        thread.join(timeout=10)
        bar.close()
        queue.shutdown()


def checkpoint_config(cfg: TrainConfig) -> Any:
    """Ray Train keeps the best `keep_checkpoints` by `checkpoint_score`, and never deletes the latest
    (Ray 2.60's checkpoint manager leaves it out of deletion and restarts workers from it), so a
    resume continues where the run stopped while the best-ranked ones stay on disk beside it."""
    import ray.train

    metric, mode = cfg.checkpoint_score
    return ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=metric,
                                      checkpoint_score_order=mode)


def evaluate_export(cfg: TrainConfig, export: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict]]]:
    """All configured eval modes on the exported model (a local dir or a URI), in `precision` on
    this process's device, with its KV cache measured (and, for the dare stage, pruned by the
    trained router; for the cosre stage, compressed by its press), on `data.eval_split` — the
    reported numbers, which say their split. Returns (results, predictions) per mode.
    `evaluate_on_worker` runs it where the stage's hardware is."""
    local = storage.local_copy(str(export))
    family = load_backbone(cfg.model.backbone, local, dtype=torch_dtype(cfg.precision))
    family.model.to(local_device(cfg.use_gpu))
    family.video = cfg.video
    press = (cfg.dare.press(str(Path(local) / ROUTER_FILE)) if cfg.stage == "dare"
             else cfg.cosre if cfg.stage == "cosre" else None)
    rows = held_out_rows(cfg.data, cfg.eval.max_examples, cfg.video.num_frames)
    results, predictions = {}, {}
    for mode, settings in cfg.eval.modes.items():
        n_steps = cfg.coconut.max_latent_stage if mode == "coconut" else 0  # rl's coconut mode samples the same
        t0 = time.perf_counter()
        with (press(family) if press else nullcontext()) as session, KVMeter(family.model, session) as meter:
            res = evaluate(family, rows, mode, settings, n_latent_steps=n_steps, c_thought=cfg.coconut.c_thought,
                           batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
        kv = {k: v for k, v in meter.summary().items() if k.startswith(("kv_fraction", "retained_", "kv_bytes_p"))
              and not isinstance(v, list)}
        predictions[mode] = res.predictions
        results[mode] = {"split": cfg.data.evaluated_split, "accuracy": res.accuracy, "tokens_per_answer": res.tokens_per_answer,
                         "latents_per_answer": res.latents_per_answer, "n": res.n, "accuracy_by_size": res.by("size"),
                         "seconds": time.perf_counter() - t0, **kv,
                         **({"direct_answer": res.direct_answer} if res.direct_answer is not None else {})}
    return results, predictions


def evaluate_on_worker(cfg: TrainConfig, export: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict]]]:
    """`evaluate_export` in a Ray task with one training worker's resources (its GPU when `use_gpu`)."""
    import ray

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = stage_resources(cfg)
    # outside any placement group: inside a Tune trial (a stage sweep) the task would otherwise be
    # placed in the trial's own, which holds a fraction of a CPU, and never start
    task = ray.remote(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0))(_evaluate_task).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(asdict(cfg), export))


def _evaluate_task(cfg_dict: dict[str, Any], export: str) -> tuple[dict, dict]:
    import torch

    from mmreason.config import from_dict

    cfg = from_dict(TrainConfig, cfg_dict)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    return evaluate_export(cfg, export)


def write_eval(results: dict[str, dict[str, Any]], predictions: dict[str, list[dict]], out_dir: Path) -> None:
    """results.json and predictions-MODE.jsonl into a local directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for mode, preds in predictions.items():
        (out_dir / f"predictions-{mode}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))


def prepare_stage(cfg: TrainConfig) -> str:
    """Every check that needs no Ray: paths and URIs, the starting checkpoint, the shards, visual
    thoughts, rl rewards on a real row. Returns the starting checkpoint (a tiny one is built)."""
    resolve_locations(cfg)
    train_shards(cfg)  # the data first: a bad shard is named before a tiny backbone is built
    model_path = resolve_model_path(cfg)
    deepspeed_file(cfg)
    if cfg.visual_thoughts.enabled:
        check_visual_thoughts(cfg)
    if cfg.eval.epoch_examples or cfg.data.evaluate_on == "val_split":  # no validation rows (nor train groups
        validation_rows(cfg.data, 1, cfg.video.num_frames)               # to carve them from) fails here
    if cfg.stage == "rl":  # the rewards on a real row: bad settings fail here, not in a worker
        rows = held_out_rows(cfg.data, 1, cfg.video.num_frames)
        if rows:
            Rewards(cfg.rl.rewards).dry_run(rows[0], cfg.rl.sampling.max_new_tokens)
    return model_path


def run_stage(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Check, train, export, evaluate, and track one stage (`callbacks`: see `fit`)."""
    import mlflow

    from mmreason.tracking import log_export, stage_run

    model_path = prepare_stage(cfg)
    with stage_run(cfg.experiment, cfg.run_name, asdict(cfg), tags={"stage": cfg.stage}) as run:
        metrics = fit(cfg, model_path, run.info.run_id, callbacks)
        export = storage.join(cfg.run_location, "export")
        results, predictions = evaluate_on_worker(cfg, export)
        for mode, res in results.items():
            mlflow.log_metrics({f"{mode}_{key}": value for key, value in res.items()
                                if isinstance(value, (int, float)) and key not in ("n", "latents_per_answer")})
        eval_dir = storage.join(cfg.run_location, "eval")
        with tempfile.TemporaryDirectory() as tmp:
            write_eval(results, predictions, Path(tmp))
            mlflow.log_artifacts(tmp, artifact_path="eval")
            if storage.is_remote(eval_dir):
                storage.upload_dir(Path(tmp), eval_dir)
            else:
                shutil.copytree(tmp, eval_dir, dirs_exist_ok=True)
        # an MLflow model that points at the export: the weights stay where they are
        log_export(export, cfg.run_name, {"stage": cfg.stage, "backbone": cfg.model.backbone,
                                          "precision": cfg.precision}, model_type=f"mmreason-{cfg.stage}")
        return {"stage": cfg.stage, "run_dir": cfg.run_location, "export": export, "train": metrics,
                "eval": results, "mlflow_run_id": run.info.run_id}


def check_stage(cfg: TrainConfig) -> dict[str, Any]:
    """`--check`: validate the config and inputs, and say what the stage would ask for; starts
    nothing but a Ray connection (to count the cluster's GPUs). A tiny backbone is not built."""
    import ray

    resolve_locations(cfg)
    if cfg.init_from is not None or cfg.model.checkpoint is not None:
        resolve_model_path(cfg)
    else:
        get_spec(cfg.model.backbone)
        check_codebook_rows(cfg)
    entries = train_shards(cfg)
    from mmreason.train.loop import deepspeed_config

    ds = deepspeed_config(cfg, deepspeed_file(cfg), cfg.workers)
    if cfg.visual_thoughts.enabled:
        check_visual_thoughts(cfg)
    if cfg.eval.epoch_examples:
        validation_rows(cfg.data, 1, cfg.video.num_frames)
    init_ray()
    check_gpus(cfg)
    n_rows = sum(e["rows"] for e in entries)
    if cfg.data.max_train_rows is not None:
        n_rows = min(n_rows, cfg.data.max_train_rows)
    return {"config": asdict(cfg), "run": cfg.run_location,
            "resources": {"workers": cfg.workers, "per_worker": stage_resources(cfg),
                          "total": {k: v * cfg.workers for k, v in stage_resources(cfg).items()},
                          "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}},
            "deepspeed": ds, "train_rows": n_rows,
            "global_batch": cfg.optim.batch_size * cfg.grad_accum * cfg.workers,
            "steps_per_epoch": epoch_geometry(cfg, n_rows)}


def eval_summary(results: dict[str, dict[str, Any]]) -> str:
    """One line: each eval mode's accuracy on the held-out split (a step's done line)."""
    return ", ".join(f"{mode} accuracy {r['accuracy']:.3f}" for mode, r in results.items()) + (
        f" on {next(iter(results.values()))['split']}" if results else "")


def results_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'mode':<10}{'split':>6}{'accuracy':>10}{'tokens/answer':>15}{'latents':>9}{'n':>6}"]
    for mode, r in results.items():
        lines.append(f"{mode:<10}{r['split']:>6}{r['accuracy']:>10.3f}{r['tokens_per_answer']:>15.1f}"
                     f"{r['latents_per_answer']:>9}{r['n']:>6}")
    return "\n".join(lines)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m jobs.train", __doc__, argv)
    if args.config is None:
        raise ConfigError("give a stage config, e.g. configs/train/cot-maze.yaml")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.check:
        print_check(check_stage(cfg))
        return 0
    resolve_locations(cfg)
    train_shards(cfg)  # a bad setting or shard is named before the console makes the run's log folder
    with console.session(cfg.run_location, "train", args.verbose):
        with console.step(f"train: {cfg.stage} ({cfg.run_name})") as step:
            out = run_stage(cfg)
            step.done(eval_summary(out["eval"]))
        console.echo(results_table(out["eval"]))
        console.echo(f"export: {out['export']}   MLflow run: {out['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
