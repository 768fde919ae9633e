"""The config of one training stage (`cot`, `coconut`, `rl`, `dare`, `cosre`): one dataclass tree, loaded by
`mmreason.config.load_config` from `configs/train/*.yaml` plus `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmreason.config import ConfigError
from mmreason.data.selection import DataConfig
from mmreason.eval.runner import EvalConfig
from mmreason.hardware import torch_dtype
from mmreason.kv.cosre import CosrePress
from mmreason.latent.coconut import CurriculumSchedule
from mmreason.models import ModelConfig
from mmreason.models.base import VideoInput
from mmreason.train.continual_backprop import ContinualBackpropConfig
from mmreason.train.stages.dare import DareStageConfig
from mmreason.train.stages.rl import RLConfig

STAGES = ("cot", "coconut", "rl", "dare", "cosre")
"""`mmreason.train.stages.RECIPES` holds one recipe per name."""
EVAL_METRICS = ("eval_accuracy", "eval_tokens_per_answer")
"""What the per-epoch evaluation of data.val_split adds, when eval.epoch_examples > 0."""


@dataclass
class VisualThoughts:
    """MVoT (arXiv 2501.07542): the model draws the state after each reasoning step."""

    enabled: bool = False
    """Train on interleaved text + image thoughts: each step followed by its `step_images` entry as
    image-code tokens (anole family; rows rendered with step images)."""
    discrepancy_weight: float = 1.0
    """Weight of the visual-token discrepancy loss (expected codebook distance) next to cross-entropy."""

    def __post_init__(self) -> None:
        if self.discrepancy_weight < 0:
            raise ConfigError(f"visual_thoughts.discrepancy_weight must be >= 0, got {self.discrepancy_weight}")


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    """Rows per worker per step."""
    epochs: int = 6
    warmup_steps: int = 20


@dataclass
class TrainConfig:
    stage: Literal["cot", "coconut", "rl", "dare", "cosre"] = "cot"
    run_name: str = "quickstart-cot"
    """Runs with the same name and storage resume from the last checkpoint."""
    storage: str = "runs/train"
    init_from: str | None = None
    """A checkpoint dir of an earlier stage to start from (coconut, rl, dare and cosre start from a cot export)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    coconut: CurriculumSchedule = field(default_factory=CurriculumSchedule)
    reset_optimizer: bool = True
    """CoCoNuT: fresh optimizer state when the curriculum stage changes."""
    rl: RLConfig = field(default_factory=RLConfig)
    """The rl stage: GRPO (group size, rewards by dotted path, sampling, clip, KL)."""
    dare: DareStageConfig = field(default_factory=DareStageConfig)
    """The dare stage: per-modality KV routers (targets, router layer, ratio loss, temperature)."""
    cosre: CosrePress = field(default_factory=CosrePress)
    """The cosre stage: the CoSRe press (`mmreason.kv.cosre`) the model is fine-tuned under, its cache
    compressed as decoding compresses it (`mmreason.kv.training`); evaluation decodes under it too."""
    distill: float = 0.0
    """dare and cosre stages: weight of KL(starting model ‖ trained model) on the answer's tokens, the
    starting model reading the whole cache and the trained one the compressed cache (0 = off)."""
    visual_thoughts: VisualThoughts = field(default_factory=VisualThoughts)
    """cot / coconut on an anole-family backbone: MVoT's interleaved visual thoughts."""
    continual_backprop: ContinualBackpropConfig = field(default_factory=ContinualBackpropConfig)
    """Continual backprop on the MLP units, in any stage (off by default)."""
    video: VideoInput = field(default_factory=VideoInput)
    """How video questions' frames enter the model (num_frames, use_hico)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    """Each worker takes `gpus_per_worker` GPUs (Ray Train sets CUDA_VISIBLE_DEVICES and NCCL); the model,
    every batch and the evaluation run there. Refused before any worker starts where the cluster has none."""
    gpus_per_worker: float = 1.0
    """GPUs per worker when `use_gpu` (one per worker is the usual DeepSpeed layout)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter precision: written into the DeepSpeed config (bf16 / fp16 with loss scaling; master weights
    and optimizer state stay fp32) and used to load the model and to generate in evaluation."""
    grad_accum: int = 1
    """Micro-batches (of `optim.batch_size` rows) per optimizer step; the global batch is
    optim.batch_size × grad_accum × workers (logged as `global_batch`)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (transformers' gradient
    checkpointing): memory for compute, for the 7B backbones."""
    deepspeed: str = "configs/deepspeed/zero2.json"
    max_failures: int = 0
    """Worker failures after which Ray Train still restarts the workers from the last checkpoint
    (-1: always). A node drained for preemption (spot reclaim, autoscaler) is retried regardless."""
    keep_checkpoints: int = 2
    """Ray Train keeps the best this many checkpoints by `checkpoint_metric`, and the latest one always
    (a resume starts there); the `best` export is kept apart."""
    checkpoint_metric: str | None = None
    """The per-epoch metric that ranks checkpoints (`loss`, `eval_accuracy`, …); null: `eval_accuracy`
    (on data.val_split) when eval.epoch_examples > 0, else `epoch` (the latest are kept)."""
    checkpoint_mode: Literal["max", "min"] = "max"
    """Whether a higher (`max`: accuracy) or a lower (`min`: loss) `checkpoint_metric` is better."""
    seed: int = 0
    experiment: str = "mmreason"
    """MLflow experiment."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage: unknown stage {self.stage!r} (known: {', '.join(STAGES)})")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.checkpoint_metric is None and self.checkpoint_mode != "max":
            raise ConfigError("checkpoint_mode: min needs a checkpoint_metric (the default ranks by eval_accuracy, "
                              "or by epoch without per-epoch evaluation: higher is better)")
        if self.checkpoint_metric in EVAL_METRICS and not self.eval.epoch_examples:
            raise ConfigError(f"checkpoint_metric: {self.checkpoint_metric} comes from the per-epoch evaluation, "
                              f"which eval.epoch_examples=0 turns off")
        if self.checkpoint_metric == "cbp_replaced" and not self.continual_backprop.enabled:
            raise ConfigError("checkpoint_metric: cbp_replaced is reported with continual_backprop.enabled only")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= -1, got {self.max_failures}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.optim.epochs < 1 or self.optim.batch_size < 1:
            raise ConfigError("optim.epochs and optim.batch_size must be >= 1")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        torch_dtype(self.precision)
        if self.activation_checkpointing and self.stage in ("coconut", "cosre"):
            raise ConfigError(f"activation_checkpointing: the {self.stage} stage runs its rows over a KV cache in several "
                              f"forwards (latent passes / the compressed cache), and a recomputed layer would write that "
                              f"cache a second time; it is supported in the cot, dare and rl stages")
        if self.grad_accum > 1 and self.stage == "rl" and self.rl.updates_per_batch > 1:
            raise ConfigError("grad_accum: with rl.updates_per_batch > 1 every PPO update is its own optimizer step; "
                              "accumulate prompts (grad_accum > 1) only with updates_per_batch = 1")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError(f"gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.stage == "cosre" and self.cosre.keeps_everything():
            raise ConfigError("cosre: these settings keep every cache entry (keep_h = keep_w = block, no "
                              "base_delta, no slots): the cosre stage would be a plain cot stage")
        if self.distill < 0:
            raise ConfigError(f"distill must be >= 0, got {self.distill}")
        if self.distill and self.stage not in ("dare", "cosre"):
            raise ConfigError(f"distill: the dare and cosre stages distil the model reading the whole cache into "
                              f"the one reading the compressed cache; stage {self.stage!r} compresses nothing")
        if self.visual_thoughts.enabled and self.stage not in ("cot", "coconut"):
            raise ConfigError(f"visual_thoughts: MVoT's visual thoughts are trained in the cot and coconut stages, "
                              f"not {self.stage}")
        if self.coconut.thought != "latent" and self.stage != "coconut":
            raise ConfigError(f"coconut.thought: the coconut stage sets a model's thought kind; stage {self.stage!r} "
                              f"reads it from its starting checkpoint (init_from)")

    @property
    def checkpoint_score(self) -> tuple[str, str]:
        """(metric, "max" | "min") that Ray Train ranks this stage's checkpoints by."""
        if self.checkpoint_metric is not None:
            return self.checkpoint_metric, self.checkpoint_mode
        return ("eval_accuracy" if self.eval.epoch_examples else "epoch"), "max"

    @property
    def run_location(self) -> str:
        """Where this run's checkpoints, `best`, `export` and `eval` go: `storage`/`run_name`, a local
        absolute path or an s3:// / gs:// URI."""
        from mmreason import storage

        if storage.is_remote(self.storage):
            return storage.join(self.storage, self.run_name)
        return str(Path(self.storage).resolve() / self.run_name)

    @property
    def run_dir(self) -> Path:
        """`run_location` as a local path (storage on a local or mounted file system)."""
        from mmreason import storage

        if storage.is_remote(self.storage):
            raise ConfigError(f"storage {self.storage} is not a local path; use run_location")
        return Path(self.run_location)
