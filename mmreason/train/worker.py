"""The Ray Train worker loop: one stage (cot, coconut, rl, dare or cosre) with DeepSpeed inside each
worker.

Read top to bottom: load the backbone → `deepspeed.initialize` with torch AdamW → restore the last
Ray Train checkpoint if there is one (epoch, curriculum stage, optimizer, continual-backprop state)
→ per epoch: the CoCoNuT stage, a fixed number of steps on this worker's shard of the Parquet
dataset (equal on every worker) — a supervised step (for `dare` under the router's press, plus its
ratio loss, `mmreason.train.dare_stage`; for `cosre` over the cache its press compresses,
`mmreason.kv.training`), or for `rl` a GRPO step (sample, score, update;
`mmreason.train.grpo`), then continual backprop when enabled — evaluation on rank 0, a
checkpoint reported by every worker, MLflow metrics from rank 0 (rl: every step, reward components
apart). Video questions get their clip's frames joined in here, from the dataset's clip shards.
This and `jobs/train.py` are the only places that touch Ray Train and DeepSpeed.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch

from mmreason.config import from_dict
from mmreason.kv.training import compressed_forward, distillation
from mmreason.latent.coconut import latent_forward
from mmreason.train.config import TrainConfig
from mmreason.train.continual_backprop import STATE_FILE as CBP_STATE
from mmreason.train.dare_stage import (ROUTER_FILE, build_trainee, dare_loss, fit_router_by_knockout,
                                       held_out_keep_rates, save_router, set_batch, set_temperature)

STATE_TAG = "state"


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def encode_batch(family: Any, rows: list[dict], cfg: TrainConfig, epoch: int, rng: random.Random) -> dict:
    """Rows → a padded training batch at this epoch's curriculum stage."""
    items, sched = [], cfg.coconut
    for row in rows:
        stage = sched.row_stage(epoch, rng) if cfg.stage == "coconut" else 0
        target = "latent" if stage > 0 else "cot"
        items.append(family.encode(row, target, sched.latent_steps(stage), sched.c_thought,
                                   visual_thoughts=cfg.visual_thoughts.enabled,
                                   replaced_steps=sched.replaced_steps(stage, len(row["steps"]))))
    return family.collate(items, align_latents=True)


def export_model(family: Any, out_dir: Path, router: Any = None) -> None:
    """HF format (safetensors) that `from_pretrained` loads, plus the dare stage's router if any;
    caller gathers ZeRO-3 shards first."""
    family.model.save_pretrained(out_dir, safe_serialization=True)
    family.tokenizer.save_pretrained(out_dir)
    if router is not None:
        save_router(router, out_dir / ROUTER_FILE)


def training_deepspeed() -> Any:
    """`deepspeed`, with its CPU shared-memory all-reduce op marked unavailable. DeepSpeed compiles
    that op at the first `initialize` on each machine and venv (45 s on 2 cores, in every worker's
    start-up on a fresh node), yet only its tensor-parallel inference all-reduce uses it: ZeRO
    training talks through torch.distributed (gloo on CPU) either way."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # ShareMemCommBuilder.NAME
    return deepspeed


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from mmreason.data.cinepile import ClipCache, video_rows
    from mmreason.eval.runner import evaluate
    from mmreason.models import load_backbone
    from mmreason.train.continual_backprop import ContinualBackprop
    from mmreason.train.grpo import grpo_step
    from mmreason.train.rewards import Rewards

    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    family = load_backbone(cfg.model.backbone, config["model_path"])
    family.video = cfg.video
    # before deepspeed.initialize: it hooks the MLPs of the model DeepSpeed then wraps
    cbp = ContinualBackprop(family.model, cfg.continual_backprop, cfg.seed) if cfg.continual_backprop.enabled else None
    rl = cfg.stage == "rl"
    rewards = Rewards(cfg.rl.rewards) if rl else None
    reference = None
    if (rl and cfg.rl.kl_coef > 0) or cfg.distill:  # the frozen starting model: KL(π‖π_ref), or the teacher
        reference = load_backbone(cfg.model.backbone, config["model_path"])
        reference.video = cfg.video
        reference.model.eval().requires_grad_(False)
    n_latent_steps = cfg.coconut.max_latent_stage if rl and cfg.rl.mode == "coconut" else 0
    # dare: the routers train under a DarePress whose hooks stay on for the whole loop
    module, press = build_trainee(family, cfg.dare) if cfg.stage == "dare" else (family.model, None)
    router = press.router if press else None
    cosre = cfg.cosre if cfg.stage == "cosre" else None  # applied per batch by compressed_forward
    checkpoint = ray.train.get_checkpoint()
    clips = ClipCache(cfg.data.path)
    fit_metrics: dict[str, float] = {}
    if press and cfg.dare.router_fit == "knockout":  # fitted once; a resumed run loads it with the state
        if not checkpoint:
            fit_rows = video_rows(config["dare_fit_rows"], clips, cfg.video.num_frames)
            fit_metrics = fit_router_by_knockout(family, router, fit_rows, cfg.dare, rank, world, cfg.seed)
        router.requires_grad_(False)
    sampler = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    ds_config = json.loads(Path(config["deepspeed_config"]).read_text())
    ds_config.update(train_micro_batch_size_per_gpu=cfg.optim.batch_size, gradient_accumulation_steps=1,
                     train_batch_size=cfg.optim.batch_size * world)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    trainable = [p for p in module.parameters() if p.requires_grad]  # Anole's VQ-VAE stays frozen
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    engine, optimizer, _, _ = training_deepspeed().initialize(model=module, optimizer=optimizer, config=ds_config)
    if cbp:
        cbp.bind(engine.optimizer)
        carried = Path(config["model_path"]) / CBP_STATE  # the previous dataset's run, in a sequence
        if carried.is_file():
            cbp.load_state_dict(torch.load(carried))

    steps_per_epoch = config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.optim.epochs
    start_epoch, best = 0, -1.0
    if checkpoint:  # resume: same run name and storage
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=STATE_TAG)
            progress = json.loads((Path(d) / "progress.json").read_text())
            if cbp and (Path(d) / CBP_STATE).is_file():
                cbp.load_state_dict(torch.load(Path(d) / CBP_STATE))
        start_epoch, best = progress["epoch"] + 1, progress["best"]

    mlflow = MlflowClient(config["mlflow_uri"]) if rank == 0 and config.get("mlflow_run_id") else None
    eval_rows = held_out_rows(cfg, cfg.eval.epoch_examples) if rank == 0 else []
    shard = ray.train.get_dataset_shard("train")
    rng = random.Random(cfg.seed * 1000 + rank)
    run_dir = cfg.run_dir
    metrics: dict[str, Any] = {}
    hooks = ExitStack()
    if press:
        hooks.enter_context(press(family))

    for epoch in range(start_epoch, cfg.optim.epochs):
        stage = cfg.coconut.stage(epoch) if cfg.stage == "coconut" else 0
        if cfg.stage == "coconut" and cfg.reset_optimizer and epoch > start_epoch and stage != cfg.coconut.stage(epoch - 1):
            _reset_optimizer_state(engine)
        engine.train()
        t0, seen, losses, rl_steps, ratios, discrepancies, kls = time.perf_counter(), 0, [], [], [], [], []
        batches = shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="pyarrow", drop_last=True,
                                     local_shuffle_buffer_size=4 * cfg.optim.batch_size, local_shuffle_seed=epoch)
        iterator, waited = iter(batches), 0.0  # seconds blocked on the dataset shard
        for step in range(steps_per_epoch):  # equal step counts on every worker
            t_wait = time.perf_counter()
            table = next(iterator, None)
            waited += time.perf_counter() - t_wait
            if table is None:
                break
            global_step = epoch * steps_per_epoch + step
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(global_step, total_steps, cfg.optim.lr, cfg.optim.warmup_steps)
            rows = video_rows(table.to_pylist(), clips, cfg.video.num_frames)
            if rl:
                step_metrics = _mean_over_workers(grpo_step(engine, family, rows, cfg.rl, rewards, sampler, reference,
                                                            n_latent_steps, cfg.coconut.c_thought))
                rl_steps.append(step_metrics)
                losses.append(step_metrics["loss"])
                if mlflow:
                    mlflow.log_batch(config["mlflow_run_id"], metrics=[
                        Metric(f"rl_{k}", float(v), int(time.time() * 1000), global_step) for k, v in step_metrics.items()])
            else:
                batch = encode_batch(family, rows, cfg, epoch, rng)
                if press:
                    set_temperature(press, cfg.dare, global_step, total_steps)
                    set_batch(press, batch)
                if cosre:
                    loss, logits = compressed_forward(family, batch, cosre, cosre.every)
                else:
                    loss, logits = latent_forward(family, batch)
                if cfg.distill:  # the starting model reads the whole cache
                    with torch.no_grad():
                        _, teacher_logits = latent_forward(reference, batch)
                    kl = distillation(logits, teacher_logits, batch["labels"])
                    loss = loss + cfg.distill * kl
                    kls.append(kl.item())
                if cfg.visual_thoughts.enabled:  # MVoT: near-miss image codes cost less than far ones
                    discrepancy = family.visual_token_discrepancy(logits, batch["labels"])
                    loss = loss + cfg.visual_thoughts.discrepancy_weight * discrepancy
                    discrepancies.append(discrepancy.item())
                if press:
                    loss, parts = dare_loss(press, loss, cfg.dare)
                    ratios.append(parts)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            if cbp:
                cbp.after_step()
            seen += table.num_rows * (cfg.rl.group_size if rl else 1)
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "stage": stage, "loss": sum(losses) / max(1, len(losses)),
                   "lr": engine.optimizer.param_groups[0]["lr"], "samples_per_s": seen * world / max(seconds, 1e-9),
                   "data_wait_s": waited, **fit_metrics}
        fit_metrics = {}  # reported with the first epoch
        if rl_steps:  # epoch means of the per-step rl metrics; seconds summed
            for key in rl_steps[0]:
                total = sum(m[key] for m in rl_steps)
                metrics[key if key.endswith("seconds") else f"rl_{key}"] = total if key.endswith("seconds") else total / len(rl_steps)
        if kls:
            metrics["distill_kl"] = sum(kls) / len(kls)
        if discrepancies:
            metrics["visual_discrepancy"] = sum(discrepancies) / len(discrepancies)
        if cbp:
            metrics["cbp_replaced"] = cbp.replaced
        if press and rank == 0 and eval_rows:
            for key in (ratios[0] if ratios else {}):  # ratio, importance
                metrics[f"dare_{key}_loss"] = sum(p[key] for p in ratios) / len(ratios)
            batches = [family.collate([family.encode(r) for r in eval_rows[i : i + cfg.eval.batch_size]])
                       for i in range(0, len(eval_rows), cfg.eval.batch_size)]
            rates = held_out_keep_rates(family, press, batches)
            metrics.update({"dare_keep_text": rates["text"], "dare_keep_vision": rates["vision"]})
            router.eval()  # evaluation below decodes with the cache pruned by top-k
        if rank == 0 and eval_rows and zero_stage < 3:
            mode = cfg.rl.mode if rl else "coconut" if stage > 0 else "cot"
            n_steps = n_latent_steps if rl else cfg.coconut.latent_steps(stage)
            settings = cfg.eval.modes.get(mode) or cfg.eval.modes.get("cot") or next(iter(cfg.eval.modes.values()))
            with cosre(family) if cosre else nullcontext():
                result = evaluate(family, eval_rows, mode, settings, n_latent_steps=n_steps,
                                  c_thought=cfg.coconut.c_thought, batch_size=cfg.eval.batch_size)
            metrics.update({"eval_accuracy": result.accuracy, "eval_tokens_per_answer": result.tokens_per_answer})
            if result.accuracy > best:
                best = result.accuracy
                export_model(family, run_dir / "best", router)
        if mlflow:
            for key, value in metrics.items():
                if not key.startswith("rl_"):  # rl_* went to MLflow every step
                    mlflow.log_metric(config["mlflow_run_id"], key, float(value), step=epoch)
        cbp_state = cbp.state_dict() if cbp else None  # on every rank: it averages utilities over them
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=STATE_TAG)
            if rank == 0:
                (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": epoch, "stage": stage, "best": best}))
                if cbp_state:
                    torch.save(cbp_state, Path(tmp) / CBP_STATE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    hooks.close()
    _export_final(engine, family, zero_stage, rank, run_dir / "export", router)
    if cbp:
        cbp_state = cbp.state_dict()
        if rank == 0:  # the next dataset of a sequence starts from this export and carries on
            torch.save(cbp_state, run_dir / "export" / CBP_STATE)
    return {**metrics, "best_eval_accuracy": best}


def held_out_rows(cfg: TrainConfig, limit: int | None) -> list[dict]:
    """Up to `limit` rows of the eval split (from `data.eval_path`, else `data.path`) for the
    configured tasks, sizes and CinePile filters, interleaved across tasks and sizes so a cut keeps
    every one of them; video questions come with their frames."""
    from mmreason.data.cinepile import matches_filters, video_rows
    from mmreason.data.reader import read_table

    root = cfg.data.eval_path or cfg.data.path
    groups: dict[tuple, list[dict]] = {}
    for row in read_table(root, split=cfg.data.eval_split).to_pylist():
        meta = json.loads(row["meta"])
        size = meta.get("size")
        if row["task"] in cfg.data.tasks and (cfg.data.sizes is None or size in cfg.data.sizes) \
                and matches_filters(meta, cfg.data.hard_split, cfg.data.visual_reliance):
            groups.setdefault((row["task"], size), []).append(row)
    interleaved = [row for batch in zip_longest(*groups.values()) for row in batch if row is not None]
    return video_rows(interleaved if limit is None else interleaved[:limit], root, cfg.video.num_frames)


def _mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    """Every worker's step metrics averaged (same keys on every worker: same config)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def _reset_optimizer_state(engine: Any) -> None:
    """CoCoNuT resets the optimizer between curriculum stages; clear AdamW's moments in place."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.state = defaultdict(dict)


def _export_final(engine: Any, family: Any, zero_stage: int, rank: int, out_dir: Path, router: Any = None) -> None:
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                export_model(family, out_dir, router)
    elif rank == 0:
        export_model(family, out_dir, router)
