"""What a stage recipe is: its batches and its loss. The shared loop (`mmreason.train.loop`) owns the
rest — device, precision, gradient accumulation, checkpoints, evaluation, reporting — and calls a
recipe at four points: which module DeepSpeed wraps, what to set up before the first step, one
optimizer step over a window of micro-batches, and how to evaluate after an epoch.

Adding a stage = one module here with a `Recipe` subclass, a line in `stages.RECIPES`, a config, a
test. A recipe never touches Ray: a GPU box can run the loop in a plain script (`benchmarks/gpu_smoke.py`).
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmreason.latent.coconut import GenerationSettings
    from mmreason.models.base import Family
    from mmreason.train.config import TrainConfig


@dataclass
class StageEnv:
    """Where a recipe runs: this worker's rank among `world`, its device and parameter dtype, and the
    checkpoint the stage starts from (a local directory)."""

    model_path: str
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


@dataclass
class EvalPlan:
    """How the loop evaluates after an epoch: the mode, its latent steps and generation settings."""

    mode: str
    n_latent_steps: int
    settings: "GenerationSettings"


class Recipe:
    """One training stage's batch and loss logic (subclasses: `SFT`, `Dare`, `Cosre`, `RL`)."""

    metric_prefix = ""
    """Step metrics other than "loss" are reported under this prefix; a non-empty one (rl_) also logs
    them to MLflow every step."""

    def __init__(self, cfg: "TrainConfig", family: "Family", env: StageEnv):
        self.cfg, self.family, self.env = cfg, family, env
        self.rng = random.Random(cfg.seed * 1000 + env.rank)
        self.epoch = 0

    @property
    def module(self) -> torch.nn.Module:
        """What DeepSpeed wraps and checkpoints (the backbone; the dare stage adds its router)."""
        return self.family.model

    def prepare(self, resumed: bool, fit_rows: list[dict]) -> dict[str, float]:
        """One-off work before the optimizer exists (it fixes which parameters train); metrics of it."""
        return {}

    def session(self) -> AbstractContextManager[Any]:
        """Hooks on while the stage trains (the dare stage's press)."""
        return nullcontext()

    def begin_epoch(self, engine: Any, epoch: int, start_epoch: int) -> None:
        """Called before each epoch's first step."""
        self.epoch = epoch

    def train_step(self, engine: Any, window: list[list[dict]], step: int, total: int) -> dict[str, float]:
        """One optimizer step over `window` (grad_accum micro-batches of rows): every micro-batch's
        `engine.backward` then `engine.step` (DeepSpeed steps the optimizer on the last). Returns the
        step's metrics, "loss" among them."""
        raise NotImplementedError

    def rows_per_prompt(self) -> int:
        """Sequences trained per dataset row (GRPO samples a group per prompt); for samples/s."""
        return 1

    def epoch_metrics(self, eval_rows: list[dict]) -> dict[str, float]:
        """Extra metrics after an epoch, on rank 0 (the held-out rows are given)."""
        return {}

    def eval_plan(self, epoch: int) -> EvalPlan:
        cfg = self.cfg
        settings = cfg.eval.modes.get("cot") or next(iter(cfg.eval.modes.values()))
        return EvalPlan("cot", 0, settings)

    def eval_session(self, family: "Family", export_dir: Path | None = None) -> AbstractContextManager[Any]:
        """What `family` decodes under in evaluation (a press for the dare and cosre stages); `export_dir`:
        where `family` was loaded from when it is not the training model (ZeRO-3 evaluates a gathered copy)."""
        return nullcontext()

    def export_extras(self, out_dir: Path) -> None:
        """Files the export carries next to the backbone (rank 0)."""


def mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    """Every worker's step metrics averaged (same keys on every worker: same config)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))
