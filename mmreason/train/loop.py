"""The one training loop every stage runs (recipes: `mmreason.train.stages`), free of Ray: the Ray
Train worker (`mmreason.train.worker`) and a plain script on a GPU box (`benchmarks/gpu_smoke.py`)
call `run_loop` with a `Worker` that says where it runs and how batches come in and checkpoints go out.

Top to bottom: the backbone in `precision` on the worker's device (activation checkpointing if
asked) → the recipe (it decides what trains) → `deepspeed.initialize` with torch AdamW and the
precision, micro-batch and accumulation written into the DeepSpeed config → restore the last
checkpoint → per epoch: optimizer steps over windows of `grad_accum` micro-batches (the recipe's
`train_step`), continual backprop after each, then on rank 0 the recipe's metrics and an evaluation
of the validation rows (`data.val_split`; ZeRO-3: of a gathered copy) that keeps the best export; a
checkpoint reported by every worker, ranked by `checkpoint_metric` → the final export (ZeRO-3: 16-bit
weights gathered). The test split (`data.eval_split`) is not read here: it is for the final report.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from mmreason.config import ConfigError
from mmreason.hardware import deepspeed_precision, torch_dtype
from mmreason.train.config import TrainConfig
from mmreason.train.continual_backprop import STATE_FILE as CBP_STATE
from mmreason.train.stages import Recipe, StageEnv, build_recipe, needs_reference

STATE_TAG = "state"


class Worker(Protocol):
    """Where the loop runs: rank, world size, device, this worker's micro-batches, checkpoints, logging."""

    rank: int
    world: int
    device: torch.device

    def has_checkpoint(self) -> bool: ...

    def restore(self) -> AbstractContextManager[Path]:
        """The last checkpoint as a local directory (only called when `has_checkpoint()`)."""

    def batches(self, epoch: int) -> Iterator[list[dict]]:
        """This worker's micro-batches of rows for `epoch` (the same number on every worker)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Metrics to the tracking run (rank 0; elsewhere a no-op)."""


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of `base` (per optimizer step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def deepspeed_config(cfg: TrainConfig, source: str | Path | dict[str, Any], world: int) -> dict[str, Any]:
    """The stage's DeepSpeed config: the JSON file (ZeRO stage, offload, clipping; `source` is its path
    or its content) plus the batch geometry and precision from the stage config, which the file must
    not set itself."""
    path = "the DeepSpeed config" if isinstance(source, dict) else source
    ds = dict(source) if isinstance(source, dict) else json.loads(Path(source).read_text())
    clash = sorted({"bf16", "fp16", "train_batch_size", "train_micro_batch_size_per_gpu",
                    "gradient_accumulation_steps"} & set(ds))
    if clash:
        raise ConfigError(f"deepspeed: {path} sets {', '.join(clash)}; these come from the stage config "
                          f"(precision, optim.batch_size, grad_accum, workers)")
    b, accum = cfg.optim.batch_size, cfg.grad_accum
    ds.update(train_micro_batch_size_per_gpu=b, gradient_accumulation_steps=accum, train_batch_size=b * accum * world,
              **deepspeed_precision(cfg.precision))
    return ds


def register_unhooked_weights(model: torch.nn.Module) -> int:
    """ZeRO-3 gathers a module's partitioned weights when that module's forward runs. torch's
    `nn.MultiheadAttention` (Phi-4-MM's vision pooling head) reads its `out_proj` weight and bias
    in its own forward without calling `out_proj`, so they would stay partitioned there ("mat2 must
    be a matrix"): register them with the attention module (DeepSpeed's external parameters). Returns
    how many were registered."""
    register_external_parameter = training_deepspeed().zero.register_external_parameter
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            for param in (module.out_proj.weight, module.out_proj.bias):
                if param is not None:
                    register_external_parameter(module, param)
                    count += 1
    return count


def training_deepspeed() -> Any:
    """`deepspeed`, with its CPU shared-memory all-reduce op marked unavailable. DeepSpeed compiles
    that op at the first `initialize` on each machine and venv (45 s on 2 cores, in every worker's
    start-up on a fresh node), yet only its tensor-parallel inference all-reduce uses it: ZeRO
    training talks through torch.distributed (gloo on CPU, NCCL on GPUs) either way."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # ShareMemCommBuilder.NAME
    return deepspeed


def load_family(cfg: TrainConfig, path: str, device: torch.device, trainable: bool = True) -> Any:
    """The backbone in the stage's precision on `device`; a frozen copy when not `trainable`."""
    from mmreason.models import load_backbone

    family = load_backbone(cfg.model.backbone, path, dtype=torch_dtype(cfg.precision))
    family.video = cfg.video
    family.model.to(device)
    if not trainable:
        family.model.eval().requires_grad_(False)
    elif cfg.activation_checkpointing:
        if not family.model.supports_gradient_checkpointing:
            raise ConfigError(f"activation_checkpointing: {type(family.model).__name__} does not support it")
        family.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return family


def run_loop(cfg: TrainConfig, model_path: str, worker: Worker, deepspeed: str | Path | dict, steps_per_epoch: int,
             run_location: str, fit_rows: list[dict] = (), eval_rows: list[dict] | None = None) -> dict[str, Any]:
    """Train one stage on this worker; `steps_per_epoch` optimizer steps, each over `grad_accum`
    micro-batches. Rows for the per-epoch evaluation: `eval_rows`, else `eval.epoch_examples` of the
    config's validation rows (`validation_rows`). Returns the last epoch's metrics and the best
    evaluation accuracy."""
    from mmreason.data.selection import validation_rows
    from mmreason.train.continual_backprop import ContinualBackprop

    rank, world, device = worker.rank, worker.world, worker.device
    torch.manual_seed(cfg.seed)
    family = load_family(cfg, model_path, device)
    reference = load_family(cfg, model_path, device, trainable=False) if needs_reference(cfg) else None
    env = StageEnv(model_path, rank, world, device, torch_dtype(cfg.precision))
    recipe = build_recipe(cfg, family, env, reference)
    # before deepspeed.initialize: it hooks the MLPs of the model DeepSpeed then wraps
    cbp = ContinualBackprop(family.model, cfg.continual_backprop, cfg.seed) if cfg.continual_backprop.enabled else None
    resumed = worker.has_checkpoint()
    fit_metrics = recipe.prepare(resumed, list(fit_rows))

    ds_config = deepspeed_config(cfg, deepspeed, world)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if zero_stage == 3:
        register_unhooked_weights(recipe.module)
    trainable = [p for p in recipe.module.parameters() if p.requires_grad]  # Anole's VQ-VAE stays frozen
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    engine, *_ = training_deepspeed().initialize(model=recipe.module, optimizer=optimizer, config=ds_config)
    if cbp:
        cbp.bind(engine.optimizer)
        from mmreason import storage

        start = storage.local_copy(model_path) if storage.is_remote(model_path) else Path(model_path)
        carried = start / CBP_STATE  # the previous dataset's run, in a sequence
        if carried.is_file():
            cbp.load_state_dict(torch.load(carried))

    total_steps = steps_per_epoch * cfg.optim.epochs
    start_epoch, best = 0, -1.0
    if resumed:  # same run name and storage
        with worker.restore() as d:
            engine.load_checkpoint(str(d), tag=STATE_TAG)
            progress = json.loads((Path(d) / "progress.json").read_text())
            if cbp and (Path(d) / CBP_STATE).is_file():
                cbp.load_state_dict(torch.load(Path(d) / CBP_STATE))
        start_epoch, best = progress["epoch"] + 1, progress["best"]
    # ZeRO-3: a forward is a collective (each layer's weights are gathered from every rank), so the
    # recipe's own held-out forwards (dare's keep rates) run on every rank, on the same rows
    if (rank != 0 and zero_stage < 3) or not cfg.eval.epoch_examples:
        eval_rows = []
    elif eval_rows is None:
        eval_rows = validation_rows(cfg.data, cfg.eval.epoch_examples, cfg.video.num_frames)
    else:
        eval_rows = eval_rows[: cfg.eval.epoch_examples]
    global_batch = cfg.optim.batch_size * cfg.grad_accum * world
    metrics: dict[str, Any] = {}
    hooks = ExitStack()
    hooks.enter_context(recipe.session())

    for epoch in range(start_epoch, cfg.optim.epochs):
        recipe.begin_epoch(engine, epoch, start_epoch)
        engine.train()
        t0, waited, seen, steps = time.perf_counter(), 0.0, 0, []
        micro = worker.batches(epoch)
        for step in range(steps_per_epoch):
            t_wait = time.perf_counter()
            window = [rows for rows in (next(micro, None) for _ in range(cfg.grad_accum)) if rows]
            waited += time.perf_counter() - t_wait
            if len(window) < cfg.grad_accum:
                break
            global_step = epoch * steps_per_epoch + step
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(global_step, total_steps, cfg.optim.lr, cfg.optim.warmup_steps)
            steps.append(recipe.train_step(engine, window, global_step, total_steps))
            if cbp:
                cbp.after_step()
            seen += sum(len(rows) for rows in window) * recipe.rows_per_prompt()
            if recipe.metric_prefix:
                worker.log({recipe.metric_prefix + k: v for k, v in steps[-1].items()}, global_step)
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "stage": cfg.coconut.stage(epoch) if cfg.stage == "coconut" else 0,
                   "lr": engine.optimizer.param_groups[0]["lr"], "samples_per_s": seen * world / max(seconds, 1e-9),
                   "global_batch": global_batch, "data_wait_s": waited, **fit_metrics,
                   **epoch_means(steps, recipe.metric_prefix)}
        first_only, fit_metrics = fit_metrics, {}  # reported with the first epoch
        if cbp:
            metrics["cbp_replaced"] = cbp.replaced
        if eval_rows:
            metrics.update(recipe.epoch_metrics(eval_rows))
            result = evaluate_epoch(engine, recipe, eval_rows, epoch, zero_stage, rank, run_location, best)
            if result is not None:
                metrics.update(result)
                best = max(best, result["eval_accuracy"])
        if rank == 0:  # Ray Train ranks checkpoints by rank 0's metrics
            check_checkpoint_metric(cfg, metrics, first_only)
        per_step = recipe.metric_prefix  # those went to the tracking run every step
        worker.log({k: float(v) for k, v in metrics.items() if not (per_step and k.startswith(per_step))}, epoch)
        cbp_state = cbp.state_dict() if cbp else None  # on every rank: it averages utilities over them
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=STATE_TAG)
            if rank == 0:
                (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": epoch, "best": best}))
                if cbp_state:
                    torch.save(cbp_state, Path(tmp) / CBP_STATE)
            worker.report(metrics, Path(tmp))

    hooks.close()
    carried = {CBP_STATE: cbp.state_dict()} if cbp else None  # every rank: a collective; the next dataset starts here
    with gathered(engine, zero_stage, rank) as ready:
        if ready:
            publish(recipe, run_location, "export", extra=carried)
    return {**metrics, "best_eval_accuracy": best}


def check_checkpoint_metric(cfg: TrainConfig, metrics: dict[str, Any], once: dict[str, Any]) -> None:
    """The metric Ray Train ranks checkpoints by must come with every epoch's report: one missing
    would rank that checkpoint last (Ray logs it and scores -inf). `once`: metrics reported with
    the first epoch only."""
    name, _ = cfg.checkpoint_score
    if name not in metrics or name in once:
        every = sorted(k for k in metrics if k not in once)
        raise ConfigError(f"checkpoint_metric: {name!r} is not reported every epoch by the {cfg.stage} stage "
                          f"(it reports: {', '.join(every)})")


def epoch_means(steps: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """The epoch's step metrics: means (seconds summed), under `prefix` except the loss."""
    out = {}
    for key in steps[0] if steps else ():
        total = sum(s[key] for s in steps)
        name = key if key == "loss" or key.endswith("seconds") else prefix + key
        out[name] = total if key.endswith("seconds") else total / len(steps)
    return out


class gathered(AbstractContextManager):
    """Under ZeRO-3 every rank gathers the full weights (a collective); `ready` is true on rank 0."""

    def __init__(self, engine: Any, zero_stage: int, rank: int):
        self.engine, self.zero_stage, self.rank, self.stack = engine, zero_stage, rank, ExitStack()

    def __enter__(self) -> bool:
        if self.zero_stage == 3:
            import deepspeed

            self.stack.enter_context(deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                                                       modifier_rank=None))
        return self.rank == 0

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


def evaluate_epoch(engine: Any, recipe: Recipe, rows: list[dict], epoch: int, zero_stage: int, rank: int,
                   run_location: str, best: float) -> dict[str, float] | None:
    """Rank 0 decodes `rows` in the recipe's eval mode; a new best accuracy is exported as `best`.
    Under ZeRO-3 the weights are partitioned and a forward on one rank would wait for the others:
    they are gathered into a local export that rank 0 loads back and evaluates (same dtype, device)."""
    from mmreason.eval.runner import evaluate

    cfg, plan = recipe.cfg, recipe.eval_plan(epoch)
    with tempfile.TemporaryDirectory() as tmp:
        family, export_dir = recipe.family, None
        if zero_stage == 3:
            export_dir = Path(tmp) / "epoch"
            with gathered(engine, zero_stage, rank) as ready:
                if ready:
                    write_export(recipe, export_dir)
            if rank != 0 or not rows:
                return None
            family = load_family(cfg, str(export_dir), recipe.env.device, trainable=False)
        if rank != 0 or not rows:
            return None
        with recipe.eval_session(family, export_dir):
            result = evaluate(family, rows, plan.mode, plan.settings, n_latent_steps=plan.n_latent_steps,
                              c_thought=cfg.coconut.c_thought, batch_size=cfg.eval.batch_size)
        if result.accuracy > best:
            if export_dir is not None:
                publish_dir(export_dir, run_location, "best")
            else:
                publish(recipe, run_location, "best")
    return {"eval_accuracy": result.accuracy, "eval_tokens_per_answer": result.tokens_per_answer}


def write_export(recipe: Recipe, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """HF format (safetensors) that `from_pretrained` loads, with the tokenizer and processor and the
    recipe's own files (the dare router); `extra`: file name → object saved with torch.save. Caller
    gathers ZeRO-3."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe.family.save(out_dir)
    recipe.export_extras(out_dir)
    for name, obj in (extra or {}).items():
        torch.save(obj, out_dir / name)


def publish(recipe: Recipe, run_location: str, name: str, extra: dict[str, Any] | None = None) -> None:
    """Write the model as `run_location/name`, replacing what was there only once it is complete."""
    with tempfile.TemporaryDirectory() as tmp:
        write_export(recipe, Path(tmp) / name, extra)
        publish_dir(Path(tmp) / name, run_location, name)


def publish_dir(local: Path, run_location: str, name: str) -> None:
    """Copy a finished local export to `run_location/name` (a local dir or an s3:// / gs:// prefix):
    locally beside it, then swapped in by rename; to object storage file by file, the weights last
    but one and `config.json` (what marks a checkpoint) last."""
    from mmreason import storage

    target = storage.join(run_location, name)
    if storage.is_remote(target):
        storage.remove(target)
        storage.upload_dir(local, target)
        return
    target_path = Path(target)
    staging = target_path.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(local, staging)
    if target_path.exists():
        shutil.rmtree(target_path)
    staging.rename(target_path)


class LocalWorker:
    """`Worker` for one process without Ray (tests, `benchmarks/gpu_smoke.py`, a notebook): rows held
    in memory and cut into micro-batches (shuffled per epoch), checkpoints in `checkpoint_root`
    (the latest kept), metrics collected in `logged`. DeepSpeed then runs single-process
    (`single_process_env` sets what torch.distributed needs)."""

    rank, world = 0, 1

    def __init__(self, rows: list[dict], batch_size: int, device: torch.device, checkpoint_root: Path,
                 seed: int = 0, shuffle: bool = True):
        self.rows, self.batch_size, self.device = rows, batch_size, device
        self.checkpoint_root, self.seed, self.shuffle = Path(checkpoint_root), seed, shuffle
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.reported: list[dict[str, Any]] = []

    def has_checkpoint(self) -> bool:
        return (self.checkpoint_root / "latest").is_dir()

    def restore(self) -> AbstractContextManager[Path]:
        from contextlib import nullcontext

        return nullcontext(self.checkpoint_root / "latest")

    def batches(self, epoch: int) -> Iterator[list[dict]]:
        import random

        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
            yield [self.rows[j] for j in order[i : i + self.batch_size]]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        latest = self.checkpoint_root / "latest"
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(checkpoint_dir, latest)
        self.reported.append(dict(metrics))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


def single_process_env(device: torch.device) -> None:
    """What torch.distributed (and so DeepSpeed) needs to run as a group of one, where unset."""
    import os
    import socket

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(device.index or 0),
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
