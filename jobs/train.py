"""Train one stage on Ray Train + DeepSpeed, then evaluate it.

    python -m jobs.train CONFIG.yaml [key=value ...]
    python -m jobs.train configs/train/cot-maze.yaml workers=2 optim.epochs=4

Everything a user can get wrong (backbone, stage, dataset without shards, a checkpoint that is not
one or is another family's, an rl reward path or signature, group size < 2, HiCo on a family without
it) is checked here or when the config loads, before any worker starts. Re-running with the same
`run_name` and `storage` resumes from the last checkpoint (epoch and curriculum stage restored).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from mmreason.cli_args import job_main, parse_job_args
from mmreason.config import ConfigError, load_config
from mmreason.data.cinepile import matches_filters
from mmreason.data.reader import shard_entries
from mmreason.data.schema import EXAMPLE_SCHEMA
from mmreason.eval.runner import evaluate
from mmreason.kv.accounting import KVMeter
from mmreason.models import build_tiny, check_checkpoint, get_spec, load_backbone
from mmreason.train.config import TrainConfig
from mmreason.train.dare_stage import ROUTER_FILE
from mmreason.train.rewards import Rewards
from mmreason.train.worker import held_out_rows
from pipelines import init_ray

REPO = Path(__file__).resolve().parents[1]


def resolve_model_path(cfg: TrainConfig) -> str:
    """The checkpoint this stage starts from, checked before any worker starts."""
    try:
        spec = get_spec(cfg.model.backbone)
    except ValueError as exc:
        raise ConfigError(f"model.backbone: {exc}") from None
    if cfg.init_from is not None:
        check_checkpoint(cfg.model.backbone, cfg.init_from)
        return str(Path(cfg.init_from).resolve())
    if cfg.model.checkpoint is not None:
        if spec.tiny or Path(cfg.model.checkpoint).exists():
            check_checkpoint(cfg.model.backbone, cfg.model.checkpoint)
            return str(Path(cfg.model.checkpoint).resolve())
        return cfg.model.checkpoint  # a hub id for a real backbone
    if not spec.tiny:
        raise ConfigError(f"model.checkpoint: {cfg.model.backbone} needs a checkpoint path or hub id")
    if cfg.video.use_hico and spec.family.name != "phi4mm":
        raise ConfigError(f"video.use_hico: HiCo frame merging is implemented for the phi4mm family, not "
                          f"{cfg.model.backbone} ({spec.family.name})")
    init = cfg.run_dir / "init"
    if not (init / "config.json").is_file():
        build_tiny(cfg.model.backbone, init, seed=cfg.seed)
    return str(init)


def train_shards(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The manifest entries of the training shards; no shards for a task is an error naming it."""
    entries = []
    for task in cfg.data.tasks:
        found = shard_entries(cfg.data.path, split="train", task=task, sizes=cfg.data.sizes)
        if not found:
            raise FileNotFoundError(f"data.path {cfg.data.path} has no train shards for task {task!r}"
                                    + (f" and sizes {cfg.data.sizes}" if cfg.data.sizes else ""))
        entries += found
    return entries


def check_visual_thoughts(cfg: TrainConfig) -> None:
    """MVoT's visual thoughts need a family that writes images and rows that carry step images."""
    from mmreason.models.base import Family

    family = get_spec(cfg.model.backbone).family
    if family.drawn_images is Family.drawn_images:
        raise ConfigError(f"visual_thoughts.enabled: the {family.name} family ({cfg.model.backbone}) cannot write "
                          f"images; MVoT's visual thoughts need an anole-family backbone (tiny-anole, anole-7b)")
    rows = held_out_rows(cfg, 1)
    if rows and not rows[0].get("step_images"):
        raise ConfigError(f"visual_thoughts.enabled: rows in {cfg.data.path} have no step_images "
                          f"(render the dataset with step_images=true)")


def train_dataset(cfg: TrainConfig) -> tuple[Any, int]:
    """A Ray Dataset over the training shards (lazy unless filtered) and its row count (from the
    manifest unless filtered)."""
    import ray.data

    entries = train_shards(cfg)
    ds = ray.data.read_parquet([str(Path(cfg.data.path) / e["path"]) for e in entries], schema=EXAMPLE_SCHEMA)
    n_rows = sum(e["rows"] for e in entries)
    filtered = cfg.data.hard_split is not None or cfg.data.visual_reliance is not None
    if filtered:
        hard, visual = cfg.data.hard_split, cfg.data.visual_reliance
        ds = ds.filter(lambda row: matches_filters(json.loads(row["meta"]), hard, visual))
    if cfg.data.max_train_rows is not None and (filtered or cfg.data.max_train_rows < n_rows):
        ds, n_rows = ds.limit(cfg.data.max_train_rows), min(n_rows, cfg.data.max_train_rows)
    if filtered:
        ds = ds.materialize()  # read and filtered once: counted here, cut into batches by `batch_blocks`
        n_rows = ds.count()  # the manifest's counts are before the filters
        if n_rows == 0:
            raise ConfigError(f"no training rows in {cfg.data.path} pass data.hard_split={cfg.data.hard_split}, "
                              f"data.visual_reliance={cfg.data.visual_reliance}")
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


def fit(cfg: TrainConfig, model_path: str, mlflow_run_id: str | None = None,
        callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the stage on Ray Train; returns the final worker metrics. `callbacks`: Ray Train
    `UserCallback`s (e.g. Tune's `TuneReportCallback`, which a stage sweep passes for ASHA)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmreason.tracking import tracking_uri
    from mmreason.train.worker import train_loop_per_worker

    init_ray()
    ds, n_rows = train_dataset(cfg)
    steps_per_epoch = n_rows // (cfg.workers * cfg.optim.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"{n_rows} training rows are fewer than workers × optim.batch_size "
                          f"({cfg.workers} × {cfg.optim.batch_size})")
    ds = batch_blocks(ds, n_rows, cfg.workers * steps_per_epoch, cfg.optim.batch_size)
    fit_rows = []  # the dare stage's knockout measurement: the first rows of the training set
    if cfg.stage == "dare" and cfg.dare.router_fit == "knockout":
        fit_rows = ds.take_batch(min(cfg.dare.fit_rows, cfg.workers * steps_per_epoch * cfg.optim.batch_size),
                                 batch_format="pyarrow").to_pylist()
    ds_config = Path(cfg.deepspeed) if Path(cfg.deepspeed).is_absolute() else (REPO / cfg.deepspeed)
    if not ds_config.is_file():
        raise ConfigError(f"deepspeed: config file not found: {cfg.deepspeed}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "model_path": model_path, "steps_per_epoch": steps_per_epoch,
                           "deepspeed_config": str(ds_config), "mlflow_uri": tracking_uri(),
                           "mlflow_run_id": mlflow_run_id, "dare_fit_rows": fit_rows},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=str(Path(cfg.storage).resolve()),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       callbacks=list(callbacks)),
        datasets={"train": ds},
    )
    result = trainer.fit()
    return dict(result.return_value or {}) | {"train_rows": n_rows, "steps_per_epoch": steps_per_epoch}


def evaluate_export(cfg: TrainConfig, export_dir: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """All configured eval modes on the exported model, with its KV cache measured (and, for the
    dare stage, pruned by the trained router; for the cosre stage, compressed by its press);
    predictions to JSONL per mode."""
    family = load_backbone(cfg.model.backbone, export_dir)
    family.video = cfg.video
    press = (cfg.dare.press(str(export_dir / ROUTER_FILE)) if cfg.stage == "dare"
             else cfg.cosre if cfg.stage == "cosre" else None)
    rows = held_out_rows(cfg, cfg.eval.max_examples)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode, settings in cfg.eval.modes.items():
        n_steps = cfg.coconut.max_latent_stage if mode == "coconut" else 0  # rl's coconut mode samples the same
        t0 = time.perf_counter()
        with (press(family) if press else nullcontext()) as session, KVMeter(family.model, session) as meter:
            res = evaluate(family, rows, mode, settings, n_latent_steps=n_steps, c_thought=cfg.coconut.c_thought,
                           batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
        kv = {k: v for k, v in meter.summary().items() if k.startswith(("kv_fraction", "retained_", "kv_bytes_p"))
              and not isinstance(v, list)}
        with open(out_dir / f"predictions-{mode}.jsonl", "w") as fh:
            for p in res.predictions:
                fh.write(json.dumps(p) + "\n")
        results[mode] = {"accuracy": res.accuracy, "tokens_per_answer": res.tokens_per_answer,
                         "latents_per_answer": res.latents_per_answer, "n": res.n, "accuracy_by_size": res.by("size"),
                         "seconds": time.perf_counter() - t0, **kv}
    return results


def run_stage(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Check, train, export, evaluate, and track one stage (`callbacks`: see `fit`)."""
    import mlflow

    from mmreason.tracking import stage_run

    # workers run elsewhere (another cwd, another node): hand them absolute paths
    cfg.data.path = str(Path(cfg.data.path).resolve())
    cfg.storage = str(Path(cfg.storage).resolve())
    model_path = resolve_model_path(cfg)
    train_shards(cfg)
    if cfg.visual_thoughts.enabled:
        check_visual_thoughts(cfg)
    if cfg.stage == "rl":  # the rewards on a real row: bad settings fail here, not in a worker
        rows = held_out_rows(cfg, 1)
        if rows:
            Rewards(cfg.rl.rewards).dry_run(rows[0], cfg.rl.sampling.max_new_tokens)
    with stage_run(cfg.experiment, cfg.run_name, asdict(cfg), tags={"stage": cfg.stage}) as run:
        metrics = fit(cfg, model_path, run.info.run_id, callbacks)
        export = cfg.run_dir / "export"
        results = evaluate_export(cfg, export, cfg.run_dir / "eval")
        for mode, res in results.items():
            mlflow.log_metrics({f"{mode}_{key}": value for key, value in res.items()
                                if isinstance(value, (int, float)) and key not in ("n", "latents_per_answer")})
        (cfg.run_dir / "eval" / "results.json").write_text(json.dumps(results, indent=2))
        mlflow.log_artifacts(str(cfg.run_dir / "eval"), artifact_path="eval")
        mlflow.log_artifacts(str(export), artifact_path="model")
        return {"stage": cfg.stage, "run_dir": str(cfg.run_dir), "export": str(export), "train": metrics,
                "eval": results, "mlflow_run_id": run.info.run_id}


def results_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'mode':<10}{'accuracy':>10}{'tokens/answer':>15}{'latents':>9}{'n':>6}"]
    for mode, r in results.items():
        lines.append(f"{mode:<10}{r['accuracy']:>10.3f}{r['tokens_per_answer']:>15.1f}{r['latents_per_answer']:>9}{r['n']:>6}")
    return "\n".join(lines)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m jobs.train", __doc__, argv)
    if args.config is None:
        raise ConfigError("give a stage config, e.g. configs/train/cot-maze.yaml")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    out = run_stage(cfg)
    print(results_table(out["eval"]))
    print(f"export: {out['export']}   MLflow run: {out['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
