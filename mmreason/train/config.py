"""The config of one training stage (`cot`, `coconut`, `rl`, `dare`, `cosre`): one dataclass tree, loaded by
`mmreason.config.load_config` from `configs/train/*.yaml` plus `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmreason.config import ConfigError
from mmreason.eval.runner import EvalConfig
from mmreason.kv.cosre import CosrePress
from mmreason.latent.coconut import CurriculumSchedule
from mmreason.models.base import VideoInput
from mmreason.train.continual_backprop import ContinualBackpropConfig
from mmreason.train.dare_stage import DareStageConfig
from mmreason.train.grpo import RLConfig

STAGES = ("cot", "coconut", "rl", "dare", "cosre")


@dataclass
class ModelConfig:
    backbone: str = "tiny-internvl"
    """Registry name: tiny-internvl, tiny-anole, tiny-phi4mm, internvl3-1b, anole-7b, phi4-mm."""
    checkpoint: str | None = None
    """Local checkpoint dir or hub id; None for a tiny backbone builds a fresh random one."""


@dataclass
class DataConfig:
    path: str = "runs/quickstart/data/gridworld"
    """A dataset directory written by a mmreason pipeline (it holds manifest.json)."""
    tasks: list[str] = field(default_factory=lambda: ["maze"])
    sizes: list[int] | None = field(default_factory=lambda: [3])
    """Grid sizes to train and evaluate on (None = all)."""
    eval_split: str = "test"
    eval_path: str | None = None
    """Dataset directory of the held-out rows (None = `path`; CinePile writes one split per directory)."""
    max_train_rows: int | None = None
    hard_split: bool | None = None
    """CinePile: train and evaluate on hard (true) or not-hard (false) questions only; null = both."""
    visual_reliance: bool | None = None
    """CinePile: only questions that do (true) or do not (false) rely on the visuals; null = both."""


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
    deepspeed: str = "configs/deepspeed/zero2.json"
    max_failures: int = 0
    """Worker failures after which Ray Train still restarts the workers from the last checkpoint
    (-1: always). A node drained for preemption (spot reclaim, autoscaler) is retried regardless."""
    keep_checkpoints: int = 2
    """Ray Train keeps this many latest checkpoints; the best export is kept apart."""
    seed: int = 0
    experiment: str = "mmreason"
    """MLflow experiment."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage: unknown stage {self.stage!r} (known: {', '.join(STAGES)})")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= -1, got {self.max_failures}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.optim.epochs < 1 or self.optim.batch_size < 1:
            raise ConfigError("optim.epochs and optim.batch_size must be >= 1")
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

    @property
    def run_dir(self) -> Path:
        return Path(self.storage).resolve() / self.run_name
