"""The grid-world dataset: its config, how requested counts become shards, and one shard's rows.

`pipelines/gridworld.py` spreads `plan_shards(cfg)` over Ray tasks and calls `build_shard` in each;
everything here runs in a plain process too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mmreason.config import ConfigError, config_hash
from mmreason.data.schema import SPLITS
from mmreason.tasks import GridTask, RenderOptions, generate_example, get_task
from mmreason.tasks.base import example_id

DATASET_NAME = "gridworld"
GENERATOR_VERSION = 1  # bump when generated rows change for the same config


@dataclass
class TaskSizes:
    """One task's grid sizes, example count and options."""

    sizes: list[int]
    """Grid sizes to generate (maze 3–6, frozenlake 3–8, minibehavior room 5–10)."""
    examples: int | None = None
    """Examples per grid size for this task; None takes the top-level `examples`."""
    blocked: float = 0.0
    """Maze only: share of attempted moves that hit a wall and stay put, in [0, 1) (`MazeTask.blocked`)."""


def configured_task(name: str, spec: TaskSizes) -> GridTask:
    """The task called `name` with the options `spec` sets; an option the task lacks is an error."""
    task = get_task(name)
    options = {"blocked": spec.blocked} if spec.blocked else {}  # at 0 the shared instance, as before
    for option in options:
        if not hasattr(task, option):
            raise ValueError(f"{option}: {name} has no such option (only maze takes it)")
    return replace(task, **options) if options else task


@dataclass
class SplitFractions:
    """Share of each split; layouts are hashed into splits, so splits never share a layout."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        for name in SPLITS:
            if getattr(self, name) < 0:
                raise ConfigError(f"splits.{name} must be >= 0, got {getattr(self, name)}")
        if sum(getattr(self, s) for s in SPLITS) <= 0:
            raise ConfigError("splits: at least one split fraction must be > 0")

    def as_dict(self) -> dict[str, float]:
        total = sum(getattr(self, s) for s in SPLITS)
        return {s: getattr(self, s) / total for s in SPLITS}


def _default_tasks() -> dict[str, TaskSizes]:
    return {
        "maze": TaskSizes(sizes=[3, 4, 5, 6]),
        "frozenlake": TaskSizes(sizes=[3, 4, 5, 6]),
        "minibehavior": TaskSizes(sizes=[8]),
    }


@dataclass
class GridworldConfig:
    output_dir: str = "runs/data/gridworld"
    """Where shards and manifest.json go: a local folder (shared storage on a cluster) or an s3:// / gs:// prefix."""
    seed: int = 0
    """Every example is a pure function of (seed, task, size, split, index)."""
    examples: int = 200
    """Examples per task and grid size, over all splits."""
    tasks: dict[str, TaskSizes] = field(default_factory=_default_tasks)
    """Tasks to render and their grid sizes."""
    splits: SplitFractions = field(default_factory=SplitFractions)
    image_size: int = 64
    """Side of every rendered image in pixels (64 for tiny CPU models, 256–512 MVoT-like)."""
    step_images: bool = True
    """Render a visual thought (the state image) after every step."""
    recheck: float = 0.0
    """Share of examples whose thoughts end with a redundant re-check of every step
    (`mmreason.tasks.base.recheck_step`): replies of varying length, for length-penalty RL."""
    recheck_after_answer: bool = False
    """Put the re-check after the answer sentence, where it cannot change the answer (see
    `mmreason.tasks.base.RenderOptions.recheck_after_answer`)."""
    restate: float = 0.0
    """Share of examples in which every step is followed by a verbatim re-check of itself
    (`mmreason.tasks.base.restated`): longer replies whose extra text is a copy, not a re-walk."""
    rows_per_shard: int = 256
    """Rows per Parquet shard; a shard is one Ray task and the unit of resume."""
    overwrite: bool = False
    """Regenerate shards that already exist instead of skipping them."""

    def __post_init__(self) -> None:
        if self.examples < 0:
            raise ConfigError(f"examples must be >= 0, got {self.examples}")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        for name in ("recheck", "restate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1] (a share of examples), got {getattr(self, name)}")
        if self.recheck_after_answer and not self.recheck:
            raise ConfigError("recheck_after_answer places the re-check that recheck adds; with recheck=0 it does "
                              "nothing (set recheck > 0)")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16 px, got {self.image_size}")
        if not self.tasks:
            raise ConfigError("tasks: name at least one task")
        for name, spec in self.tasks.items():
            try:
                task = get_task(name)
            except ValueError as exc:
                raise ConfigError(f"tasks.{name}: {exc}") from None
            try:
                configured_task(name, spec)
            except ValueError as exc:  # "blocked must be …" → "tasks.maze.blocked must be …"
                raise ConfigError(f"tasks.{name}.{exc}") from None
            if spec.examples is not None and spec.examples < 0:
                raise ConfigError(f"tasks.{name}.examples must be >= 0, got {spec.examples}")
            for size in spec.sizes:
                if size not in task.sizes:
                    raise ConfigError(
                        f"tasks.{name}.sizes: grid size {size} out of range "
                        f"{task.sizes.start}..{task.sizes.stop - 1} for {name}"
                    )
                if self.image_size < 4 * size:
                    raise ConfigError(f"image_size {self.image_size} is too small for {name} grid size {size}")

    def generation_key(self) -> dict[str, Any]:
        """The settings that decide the rows (not where they go or whether to overwrite)."""
        key = asdict(self)
        for name in ("output_dir", "overwrite", "rows_per_shard"):
            key.pop(name)
        for name in ("recheck", "recheck_after_answer", "restate"):  # added later: at 0, shards written before them stay valid
            if not key[name]:
                key.pop(name)
        for spec in key["tasks"].values():  # ditto
            if not spec["blocked"]:
                spec.pop("blocked")
        key["generator_version"] = GENERATOR_VERSION
        return key


@dataclass(frozen=True)
class ShardSpec:
    task: str
    size: int
    split: str
    part: int
    start: int
    stop: int

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.task}-n{self.size}-{self.part:04d}.parquet"


def split_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Whole-row counts per split summing exactly to `total` (largest remainder)."""
    raw = {s: total * fractions[s] for s in SPLITS}
    counts = {s: int(raw[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: (-(raw[s] - counts[s]), SPLITS.index(s)))
    for s in by_remainder[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


def plan_shards(cfg: GridworldConfig) -> list[ShardSpec]:
    """Every shard the config asks for, in a stable order."""
    fractions = cfg.splits.as_dict()
    specs = []
    for task, spec in cfg.tasks.items():
        n = cfg.examples if spec.examples is None else spec.examples
        for size in sorted(set(spec.sizes)):
            for split, count in split_counts(n, fractions).items():
                for part, start in enumerate(range(0, count, cfg.rows_per_shard)):
                    specs.append(ShardSpec(task, size, split, part, start, min(start + cfg.rows_per_shard, count)))
    return specs


def shard_info(cfg: GridworldConfig, spec: ShardSpec) -> dict[str, Any]:
    """What a finished shard's footer must say for a re-run to skip it."""
    return {
        "dataset": DATASET_NAME,
        "spec": asdict(spec),
        "config_hash": config_hash({"generation": cfg.generation_key(), "spec": asdict(spec)}),
        "expected_rows": spec.stop - spec.start,
    }


def build_shard(cfg: GridworldConfig, spec: ShardSpec) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The rows of one shard, and the examples that failed (recorded, not fatal)."""
    task = configured_task(spec.task, cfg.tasks[spec.task])
    fractions = cfg.splits.as_dict()
    opts = RenderOptions(image_size=cfg.image_size, step_images=cfg.step_images, recheck=cfg.recheck,
                         recheck_after_answer=cfg.recheck_after_answer, restate=cfg.restate)
    rows, errors = [], []
    for index in range(spec.start, spec.stop):
        try:
            rows.append(generate_example(task, spec.size, spec.split, index, cfg.seed, fractions, opts))
        except Exception as exc:  # a bad example is recorded and the shard goes on
            errors.append({"id": example_id(spec.task, spec.size, spec.split, cfg.seed, index), "error": repr(exc)})
    return rows, errors
