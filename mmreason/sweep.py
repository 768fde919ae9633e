"""What a sweep turns, over which values, toward which objectives — checked before any trial
starts, with no Ray here (`jobs.sweep` runs it on Ray Tune).

Two kinds, told apart by whether the config names a `stage`:

- **press sweeps** (`presses:`): each trial evaluates one checkpoint under one press setting
  through `jobs.evaluate`'s code (`mmreason.eval.press_eval.run_press_eval`). Knobs are the press's
  own fields: `rho_text`, `rho_vis` (dare), `block`, `keep_h`, `keep_w`, `slots`, `base_delta`
  (cosre), `cache_size` / `factor` (the TOVA budget), `compression_ratio` (kvpress:*), …
- **stage sweeps** (`stage:` + `stage_space:`): each trial trains a stage through `jobs.train`
  with dotted overrides (`optim.lr`, a retention target of the dare stage, …), reporting every
  epoch so ASHA can stop the weak ones; the export can then be evaluated under a press.

A setting is a constant or exactly one distribution:

    factor: 0.5                      # the same in every trial
    factor: {grid: [0.25, 0.5]}      # every value (grid search); a categorical for optuna
    factor: {uniform: [0.1, 0.9]}    # optuna only; also loguniform: [lo, hi], int: [lo, hi]
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mmreason.config import ConfigError
from mmreason.hardware import torch_dtype

DISTRIBUTIONS = ("grid", "uniform", "loguniform", "int")
LATENCY = "latency_ms_per_example"
"""Derived per trial: 1000 × evaluation seconds / examples (prefill + decoding, model load excluded)."""


@dataclass
class Objective:
    metric: str
    """A numeric metric every trial reports (accuracy, kv_bytes_peak, latency_ms_per_example, …)."""
    mode: Literal["max", "min"] = "max"


@dataclass
class SearchConfig:
    algorithm: Literal["grid", "optuna"] = "grid"
    """grid: every point of the `grid:` lists; optuna: multi-objective sampling over the objectives."""
    num_samples: int = 1
    """grid: how many times the whole grid runs; optuna: how many trials."""
    seed: int = 0
    max_concurrent: int | None = None
    """Trials at once; None = as many as the free Ray resources hold."""


@dataclass
class AshaConfig:
    enabled: bool = False
    """Stop weak stage trials early (stage sweeps only; they report every epoch)."""
    metric: str = "loss"
    """A per-epoch metric of the stage (loss; eval_accuracy when eval.epoch_examples > 0)."""
    mode: Literal["max", "min"] = "min"
    grace_period: int = 1
    """Epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2


def _default_objectives() -> list[Objective]:
    return [Objective("accuracy", "max"), Objective("kv_bytes_peak", "min"), Objective(LATENCY, "min")]


@dataclass
class SweepConfig:
    name: str = "sweep"
    """The sweep's MLflow parent run and its output folder `output_dir/<name>-<time>`."""
    evaluate: str | None = "configs/eval/press-maze.yaml"
    """The evaluation config (checkpoint, held-out data, mode, generation) every press trial starts from."""
    evaluate_overrides: list[str] = field(default_factory=list)
    """`key=value` overrides on it (max_examples=50, model.checkpoint=…)."""
    presses: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Press name → its settings, each a constant or a distribution (module doc)."""
    stage: str | None = None
    """A stage config (configs/train/*.yaml): makes this a stage sweep."""
    stage_overrides: list[str] = field(default_factory=list)
    stage_space: dict[str, Any] = field(default_factory=dict)
    """Dotted stage keys → constant or distribution, e.g. `optim.lr: {loguniform: [1e-4, 1e-2]}`."""
    objectives: list[Objective] = field(default_factory=_default_objectives)
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    cpus_per_trial: float = 1.0
    """Press trials: CPUs each (also its torch threads). Stage trials: the trial's own share (its
    Ray Train workers take `workers × cpus_per_worker` more)."""
    use_gpu: bool = False
    """Each trial's press evaluation runs on a GPU (`gpus_per_trial` of one, asked of Ray for the
    trial); refused before any trial starts where the cluster has none. A stage trial's training
    takes its own GPUs from the stage config (`use_gpu`, `gpus_per_worker` in stage_overrides)."""
    gpus_per_trial: float = 1.0
    """With use_gpu: GPUs each trial asks Ray for (a fraction packs several trials onto one GPU)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype each trial's evaluation loads the model in (replaces the evaluation config's)."""
    uncompressed: bool = True
    """Press sweeps: the checkpoint is also evaluated with no press on the same rows — a reference row
    `uncompressed` in the tables, a marked point in the plots (it takes part in the front)."""
    output_dir: str = "runs/sweep"
    experiment: str = "mmreason"
    """MLflow experiment prefix: the sweep goes to `<experiment>-sweep`."""

    def __post_init__(self) -> None:
        if self.search.num_samples < 1:
            raise ConfigError(f"search.num_samples must be >= 1, got {self.search.num_samples}")
        if self.search.max_concurrent is not None and self.search.max_concurrent < 1:
            raise ConfigError(f"search.max_concurrent must be >= 1 or null, got {self.search.max_concurrent}")
        if self.cpus_per_trial < 0 or self.gpus_per_trial < 0 or self.cpus_per_trial + self.trial_gpus == 0:
            raise ConfigError("cpus_per_trial and gpus_per_trial must be >= 0, and a trial must ask for some "
                              "CPU (or, with use_gpu, GPU)")
        if self.use_gpu and self.gpus_per_trial <= 0:
            raise ConfigError(f"gpus_per_trial must be > 0 with use_gpu, got {self.gpus_per_trial}")
        torch_dtype(self.precision)
        if not self.objectives:
            raise ConfigError("objectives: give at least one (metric, mode)")
        if self.asha.enabled and self.stage is None:
            raise ConfigError("asha.enabled: ASHA stops training trials early; a press sweep has no epochs "
                              "(set `stage:` for a stage sweep)")
        if self.asha.grace_period < 1 or self.asha.reduction_factor < 2:
            raise ConfigError("asha.grace_period must be >= 1 and asha.reduction_factor >= 2")

    @property
    def is_stage_sweep(self) -> bool:
        return self.stage is not None

    @property
    def trial_gpus(self) -> float:
        """GPUs a trial itself asks Ray for: `gpus_per_trial` with use_gpu, else none."""
        return self.gpus_per_trial if self.use_gpu else 0.0

    @property
    def objective_pairs(self) -> list[tuple[str, str]]:
        return [(o.metric, o.mode) for o in self.objectives]


@dataclass
class Dimension:
    """One swept setting: `values` for a grid, or (`low`, `high`) for uniform/loguniform/int."""
    name: str
    kind: str
    values: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0

    def corners(self) -> list[Any]:
        """The values that show whether every value of this dimension is acceptable."""
        if self.kind == "grid":
            return list(self.values)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def suggest(self, trial: Any, param: str) -> Any:
        """An optuna (define-by-run) suggestion."""
        if self.kind == "grid":
            return trial.suggest_categorical(param, self.values)
        if self.kind == "int":
            return trial.suggest_int(param, int(self.low), int(self.high))
        return trial.suggest_float(param, self.low, self.high, log=self.kind == "loguniform")


@dataclass
class Group:
    """The settings of one press (or of the stage): constants plus swept dimensions."""
    name: str
    constants: dict[str, Any]
    dimensions: list[Dimension]

    def grid(self) -> list[dict[str, Any]]:
        names = [d.name for d in self.dimensions]
        return [{**self.constants, **dict(zip(names, combo))}
                for combo in itertools.product(*(d.values for d in self.dimensions))]


@dataclass
class SearchSpace:
    groups: list[Group]
    target: str
    """"press" (group names are presses) or "stage" (one group of dotted overrides)."""

    def grid_points(self) -> list[dict[str, Any]]:
        return [{"group": g.name, "values": values} for g in self.groups for values in g.grid()]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: pick the group (if more than one), then each of its dimensions."""
        names = [g.name for g in self.groups]
        group = self.groups[0]
        if len(names) > 1:
            group = self.groups[names.index(trial.suggest_categorical("group", names))]
        values = dict(group.constants)
        for dim in group.dimensions:
            values[dim.name] = dim.suggest(trial, f"{group.name}.{dim.name}")
        return {"point": {"group": group.name, "values": values}}

    def size(self) -> float:
        """Points in the grid (inf when a dimension is continuous)."""
        total = 0.0
        for g in self.groups:
            n = 1.0
            for d in g.dimensions:
                n *= len(d.values) if d.kind == "grid" else math.inf
            total += n
        return total


def parse_setting(where: str, name: str, spec: Any) -> Dimension | None:
    """None for a constant; a Dimension for `{grid|uniform|loguniform|int: …}` (checked)."""
    if not isinstance(spec, dict):
        return None
    keys = list(spec)
    if len(keys) != 1 or keys[0] not in DISTRIBUTIONS:
        forms = ", ".join(f"{d}: …" for d in DISTRIBUTIONS)
        raise ConfigError(f"{where}.{name}: a swept setting is one of {{{forms}}}, got {json.dumps(spec)}")
    kind, arg = keys[0], spec[keys[0]]
    if kind == "grid":
        if not isinstance(arg, list):
            raise ConfigError(f"{where}.{name}.grid must be a list of values, got {arg!r}")
        if not arg:
            raise ConfigError(f"{where}.{name}.grid is empty: the search space has no point")
        return Dimension(name, "grid", values=list(arg))
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
        raise ConfigError(f"{where}.{name}.{kind} must be [low, high], got {arg!r}")
    low, high = float(arg[0]), float(arg[1])
    if not low < high:
        raise ConfigError(f"{where}.{name}.{kind}: low must be < high, got [{arg[0]}, {arg[1]}] (an empty range)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.{name}.loguniform needs low > 0, got {arg[0]}")
    return Dimension(name, kind, low=low, high=high)


def build_space(cfg: SweepConfig) -> SearchSpace:
    """The checked search space: groups, dimensions, and for grid search only grid dimensions.
    Unknown presses and settings are caught by `check_points` (each press's own validation)."""
    if cfg.is_stage_sweep:
        if cfg.presses and len(cfg.presses) > 1:
            raise ConfigError("presses: a stage sweep evaluates its exports under at most one press")
        items, where, target = {"stage": cfg.stage_space}, "stage_space", "stage"
        if not cfg.stage_space:
            raise ConfigError("stage_space is empty: name the stage settings to sweep (e.g. optim.lr: {grid: [...]})")
    else:
        if not cfg.presses:
            raise ConfigError("presses is empty: the search space has no point (name a press and its settings)")
        items, where, target = cfg.presses, "presses", "press"
    groups = []
    for group, settings in items.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}.{group} must map settings to values or distributions, got {settings!r}")
        constants, dims = {}, []
        prefix = where if target == "stage" else f"{where}.{group}"
        for name, spec in settings.items():
            dim = parse_setting(prefix, name, spec)
            if dim is None:
                constants[name] = spec
            else:
                dims.append(dim)
        if cfg.search.algorithm == "grid":
            for d in dims:
                if d.kind != "grid":
                    raise ConfigError(f"{prefix}.{d.name}: {d.kind} needs search.algorithm=optuna; grid search "
                                      f"takes grid: [values]")
        groups.append(Group(group, constants, dims))
    space = SearchSpace(groups, target)
    if target == "press" and all(not g.dimensions for g in groups) and len(groups) < 2:
        raise ConfigError(f"presses.{groups[0].name}: nothing is swept (every setting is a constant) — the search "
                          f"space is a single point; use jobs.evaluate for one setting")
    return space


def check_points(space: SearchSpace, make: Any) -> int:
    """Call `make(group, values)` — which raises ConfigError naming a bad setting — on every grid
    point, or on each dimension's corners for continuous spaces; returns the points checked."""
    checked = 0
    for g in space.groups:
        if all(d.kind == "grid" for d in g.dimensions):
            points = g.grid()
        else:
            base = {**g.constants, **{d.name: d.corners()[0] for d in g.dimensions}}
            points = [dict(base, **{d.name: v}) for d in g.dimensions for v in d.corners()] or [base]
        for values in points:
            make(g.name, values)
            checked += 1
    return checked
