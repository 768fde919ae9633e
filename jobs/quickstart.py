"""The embedded default, end to end on one machine with no set-up (README command 1).

    python -m jobs.quickstart [CONFIG.yaml] [key=value ...] [--check]
    mmreason quickstart [CONFIG.yaml] [key=value ...]     e.g. cot.optim.epochs=2 steps=[cot,coconut]

A local Ray (or the cluster RAY_ADDRESS names, as under `ray job submit`) renders the grid-world
dataset (all three tasks; many 3×3 mazes), then, in order (`steps`):

- `cot`: a tiny InternVL-class backbone, chain-of-thought SFT on Ray Train + DeepSpeed (2 workers);
- `coconut`: the CoCoNuT curriculum from the cot export;
- `dare`: DARE's knockout-fitted KV router on the cot model, which then learns to answer under its masks;
- `presses`: the cot model evaluated under each press in `presses` (none, TOVA, DARE with the
  trained router, CoSRe, kvpress baselines) — accuracy, KV bytes, retained fractions, latency;
- `sweep`: a small Ray Tune grid over press settings and its Pareto front (table, PNG, HTML).

Everything is one MLflow pipeline run (`<experiment>-pipeline`, name `quickstart`) with a child run
per stage, per press evaluation and for the sweep, whose trials are its children; the store is
./mlflow.db unless MLFLOW_TRACKING_URI names another. Every output goes under `root`.

Before any work the presses, the sweep's space, the tracking store, each stage's backbone and
DeepSpeed file, and every `use_gpu` against the cluster's GPUs are checked. `--check` stops there
and prints the resolved config, the steps, the dataset's shards and each stage's, press
evaluation's and sweep trial's resources; it renders, trains and writes nothing.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmreason import console
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import ConfigError, load_config, to_dict
from mmreason.data.gridworld import GridworldConfig, TaskSizes
from mmreason.eval.runner import EvalConfig
from mmreason.eval.press_eval import PressEvalConfig
from mmreason.latent.coconut import CurriculumSchedule, GenerationSettings
from mmreason.sweep import SweepConfig
from mmreason.train.config import DataConfig, OptimConfig, TrainConfig
from mmreason.train.stages.dare import ROUTER_FILE, DareStageConfig
from pipelines import gridworld

echo = console.echo

STEPS = ("cot", "coconut", "dare", "presses", "sweep")
DATA_DIR = "data/gridworld"
"""Where the dataset goes, under `root`."""
EVAL_BUDGET = {"vanilla": 16, "cot": 96, "coconut": 96}
"""max_new_tokens per eval mode: a 3×3 maze's cot answer is ~40 tokens."""


def _default_data() -> GridworldConfig:
    return GridworldConfig(output_dir=DATA_DIR, tasks={
        "maze": TaskSizes(sizes=[3], examples=6000),
        "frozenlake": TaskSizes(sizes=[3, 4], examples=200),
        "minibehavior": TaskSizes(sizes=[8], examples=200),
    })


def _eval(modes: Sequence[str]) -> EvalConfig:
    return EvalConfig(modes={m: GenerationSettings(max_new_tokens=EVAL_BUDGET[m]) for m in modes}, max_examples=200)


def _stage(stage: str, optim: OptimConfig, modes: Sequence[str], **kwargs: Any) -> TrainConfig:
    return TrainConfig(stage=stage, run_name=f"quickstart-{stage}", storage="train",
                       data=DataConfig(path=DATA_DIR, tasks=["maze"], sizes=[3]), optim=optim, eval=_eval(modes),
                       **kwargs)


def _default_cot() -> TrainConfig:
    return _stage("cot", OptimConfig(lr=3e-3, batch_size=16, epochs=10, warmup_steps=20), ["vanilla", "cot"])


def _default_coconut() -> TrainConfig:
    return _stage("coconut", OptimConfig(lr=1e-3, batch_size=16, epochs=2, warmup_steps=5),
                  ["vanilla", "cot", "coconut"],
                  coconut=CurriculumSchedule(c_thought=1, epochs_per_stage=2, max_latent_stage=1, first_stage=1))


def _default_dare() -> TrainConfig:
    """configs/train/dare-maze.yaml's recipe, small: from layer 0 keep 40 % of the text entries and
    every image entry (~half the peak cache), the latest 8 always; the router fitted to each
    token's measured knockout rise (128 rows), then the model trained 1 epoch of 4 000 rows under
    the masks decoding applies."""
    cfg = _stage("dare", OptimConfig(lr=1e-3, batch_size=16, epochs=1, warmup_steps=10), ["cot"],
                 dare=DareStageConfig(rho_text=0.4, rho_vis=1.0, layer=0, backbone="full", masks="decode", window=8,
                                      router_context=3, router_fit="knockout", fit_rows=128))
    cfg.data.max_train_rows = 4000
    return cfg


def _default_evaluate() -> PressEvalConfig:
    return PressEvalConfig(run_name="quickstart-eval", output_dir="eval",
                           data=DataConfig(path=DATA_DIR, tasks=["maze"], sizes=[3], eval_split="test"),
                           mode="cot", generation=GenerationSettings(max_new_tokens=EVAL_BUDGET["cot"]),
                           max_examples=100, batch_size=25)


def _default_presses() -> dict[str, dict[str, Any]]:
    """Each at about half of the full KV cache; `dare: {}` takes the dare stage's targets and router."""
    return {
        "none": {},
        "tova": {"factor": 0.5, "min_size": 8},
        "dare": {},
        "cosre": {"block": 4, "keep_h": 2, "keep_w": 2, "slots": 0, "base_delta": 0.05},
        "kvpress:snapkv": {"compression_ratio": 0.5, "window_size": 16},
        "kvpress:streaming_llm": {"compression_ratio": 0.5},
        "kvpress:knorm": {"compression_ratio": 0.5},
        "kvpress:expected_attention": {"compression_ratio": 0.5},
    }


def _default_sweep() -> SweepConfig:
    return SweepConfig(
        name="quickstart-sweep", output_dir="sweep",
        evaluate_overrides=["data.sizes=[3]", "max_examples=50", "batch_size=25",
                            f"generation.max_new_tokens={EVAL_BUDGET['cot']}"],
        presses={"tova": {"factor": {"grid": [0.25, 0.5, 0.75]}, "min_size": 8},
                 "cosre": {"block": 4, "keep_h": {"grid": [1, 2]}, "keep_w": 2, "base_delta": 0.05}})


@dataclass
class QuickstartConfig:
    root: str = "runs/quickstart"
    """Every output goes under this folder; the relative paths below are relative to it."""
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    """Which of cot, coconut, dare, presses, sweep run (cot always does: the others start from it)."""
    data: GridworldConfig = field(default_factory=_default_data)
    """The grid-world dataset the quickstart renders (`output_dir` under `root`)."""
    cot: TrainConfig = field(default_factory=_default_cot)
    """Chain-of-thought SFT stage (`storage` under `root`)."""
    coconut: TrainConfig = field(default_factory=_default_coconut)
    """CoCoNuT curriculum stage, started from the cot export."""
    dare: TrainConfig = field(default_factory=_default_dare)
    """The dare stage: a knockout-fitted KV router on the cot model, trained under its masks."""
    evaluate: PressEvalConfig = field(default_factory=_default_evaluate)
    """How each press is evaluated on the cot model (held-out rows, mode, generation)."""
    presses: dict[str, dict[str, Any]] = field(default_factory=_default_presses)
    """Press name → settings, one evaluation each (names as `jobs.evaluate`'s `press=`)."""
    sweep: SweepConfig = field(default_factory=_default_sweep)
    """A small press sweep on the cot model (its checkpoint and data are filled in)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"steps: unknown step(s) {', '.join(map(repr, unknown))} (known: {', '.join(STEPS)})")
        if "cot" not in self.steps:
            raise ConfigError("steps: the other steps start from the cot model; keep 'cot'")
        if "presses" in self.steps and "dare" in self.presses and "dare" not in self.steps:
            raise ConfigError("presses.dare evaluates the router the dare step trains: add 'dare' to steps "
                              "or remove the dare press")

    def place(self) -> None:
        """Relative output paths → under `root`; every stage reads the dataset this run renders."""
        root = Path(self.root)

        def under(path: str) -> str:
            return path if Path(path).is_absolute() else str(root / path)

        self.data.output_dir = under(self.data.output_dir)
        for stage in (self.cot, self.coconut, self.dare):
            stage.storage = under(stage.storage)
            stage.data.path = self.data.output_dir
        self.evaluate.output_dir = under(self.evaluate.output_dir)
        self.evaluate.data.path = self.data.output_dir
        self.sweep.output_dir = under(self.sweep.output_dir)


def press_run_name(name: str) -> str:
    return "quickstart-eval-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def stages(cfg: QuickstartConfig) -> list[str]:
    """The training stages `steps` runs, in order."""
    return [name for name in ("cot", "coconut", "dare") if name in cfg.steps]


def check(cfg: QuickstartConfig) -> None:
    """What would fail after training — a press, its settings, kvpress, the sweep's space, the
    tracking store, a stage's backbone or DeepSpeed file — fails now, before any work."""
    from jobs import train
    from mmreason.kv import make_press
    from mmreason.models import get_spec
    from mmreason.sweep import build_space, check_points
    from mmreason.tracking import check_tracking_uri
    from mmreason.train.loop import deepspeed_config

    check_tracking_uri()
    if "presses" in cfg.steps:
        for name, settings in cfg.presses.items():
            try:
                # dare's router_path is the one the dare step trains (`evaluate_presses`)
                make_press(name, settings, pending={"router_path"} if name == "dare" else ())
            except ConfigError as exc:
                raise ConfigError(f"presses.{name}: {exc}") from None
    if "sweep" in cfg.steps:
        if cfg.sweep.is_stage_sweep:
            raise ConfigError("sweep: the quickstart runs a press sweep on its cot model (no `stage`)")
        check_points(build_space(cfg.sweep), make_press)
    for name in stages(cfg):
        stage = getattr(cfg, name)
        try:
            get_spec(stage.model.backbone)
            deepspeed_config(stage, train.deepspeed_file(stage), stage.workers)
        except ValueError as exc:  # get_spec's unknown backbone, or a ConfigError
            raise ConfigError(f"{name}: {exc}") from None


def check_gpus(cfg: QuickstartConfig) -> dict[str, float]:
    """Every `use_gpu` the steps would act on — each stage's workers, the press evaluations, the
    sweep's trials — against the cluster's GPUs (now, or on a node its autoscaler can add); starts or
    joins Ray. Returns the cluster's CPUs and GPUs."""
    import ray

    from mmreason.hardware import require_gpus
    from pipelines import cluster_gpus

    now, scalable = cluster_gpus()
    for name in stages(cfg):
        stage = getattr(cfg, name)
        require_gpus(stage.use_gpu, stage.gpus_per_worker, now, f"{name}.use_gpu", scalable)
    if "presses" in cfg.steps:
        require_gpus(cfg.evaluate.use_gpu, 1, now, "evaluate.use_gpu", scalable)
    if "sweep" in cfg.steps:
        require_gpus(cfg.sweep.use_gpu, cfg.sweep.trial_gpus, now, "sweep.use_gpu", scalable)
    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def check_report(cfg: QuickstartConfig) -> dict[str, Any]:
    """`--check`: every check `run` makes before work, and what each step would do and ask for."""
    from jobs import sweep as sweep_job
    from jobs import train
    from mmreason import storage
    from mmreason.sweep import build_space
    from mmreason.tracking import family_experiment, tracking_uri
    from pipelines import shard_tasks

    cfg.place()
    check(cfg)
    cluster = check_gpus(cfg)
    specs, output = gridworld.plan(cfg.data, dry_run=True)
    cot_export = storage.join(cfg.cot.run_location, "export")
    report: dict[str, Any] = {
        "config": to_dict(cfg), "steps": ["data", *cfg.steps],
        "data": {**output.summary({spec.relpath: spec.stop - spec.start for spec in specs}),
                 "ray": shard_tasks(len(output.todo))},
        "stages": {}}
    for name in stages(cfg):
        stage = getattr(cfg, name)
        per_worker = train.stage_resources(stage)
        report["stages"][name] = {
            "run": stage.run_location, "starts_from": stage.model.backbone if name == "cot" else cot_export,
            "epochs": stage.optim.epochs, "workers": stage.workers, "per_worker": per_worker,
            "total": {k: v * stage.workers for k, v in per_worker.items()}}
    if "presses" in cfg.steps:  # evaluated one after another in this process
        report["presses"] = {"runs": [press_run_name(name) for name in cfg.presses],
                             "device": "cuda" if cfg.evaluate.use_gpu else "cpu", "precision": cfg.evaluate.precision,
                             "output_dir": cfg.evaluate.output_dir}
    if "sweep" in cfg.steps:
        report["sweep"] = {"trials": sweep_job.n_trials(cfg.sweep, build_space(cfg.sweep)),
                           "per_trial": {"CPU": cfg.sweep.cpus_per_trial, "GPU": cfg.sweep.trial_gpus},
                           "output_dir": cfg.sweep.output_dir}
    report["mlflow"] = {"tracking_uri": tracking_uri(), "experiment": family_experiment(cfg.cot.experiment, "pipeline"),
                        "run": "quickstart"}
    report["cluster"] = cluster
    return report


def evaluate_presses(cfg: QuickstartConfig, cot_export: str, dare: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The cot model under each press (`dare` under the router the dare stage trained)."""
    from mmreason.eval.press_eval import run_press_eval

    rows = []
    bar = console.progress(len(cfg.presses), "presses")
    for name, settings in cfg.presses.items():
        one = copy.deepcopy(cfg.evaluate)
        one.run_name = press_run_name(name)
        one.model = copy.deepcopy(cfg.cot.model)
        one.model.checkpoint = cot_export
        one.press = {"name": name, **settings}
        if name == "dare":
            targets = cfg.dare.dare
            one.model.checkpoint = dare["export"]  # the model trained under its router's masks + the router
            one.press = {"name": name, "rho_text": targets.rho_text, "rho_vis": targets.rho_vis,
                         "layer": targets.layer, "router_width": targets.router_width, "window": targets.window,
                         "router_path": str(Path(dare["export"]) / ROUTER_FILE), **settings}
        rows.append(run_press_eval(one, log=lambda *a, **k: None))
        bar.update(1, last=name, accuracy=rows[-1]["accuracy"])
    bar.close()
    return rows


def run(cfg: QuickstartConfig) -> dict[str, Any]:
    """The whole flow under one MLflow pipeline run; returns what each step produced."""
    from jobs import sweep as sweep_job
    from mmreason.eval.press_eval import results_table
    from mmreason.tracking import pipeline_run

    cfg.place()
    check(cfg)
    check_gpus(cfg)
    out: dict[str, Any] = {"stages": []}
    with pipeline_run(cfg.cot.experiment, "quickstart") as parent_id:
        out["parent_run_id"] = parent_id
        with console.step("data: gridworld") as step:
            manifest = gridworld.run(cfg.data)
            step.done(f"{manifest['total_rows']} rows in {cfg.data.output_dir}")
        echo(gridworld.summary_table(manifest))
        cot = _train(cfg.cot)
        out["stages"].append(cot)
        if "coconut" in cfg.steps:
            cfg.coconut.init_from = cot["export"]
            out["stages"].append(_train(cfg.coconut))
        dare = None
        if "dare" in cfg.steps:
            cfg.dare.init_from = cot["export"]
            dare = _train(cfg.dare)
            out["stages"].append(dare)
        if "presses" in cfg.steps:
            with console.step(f"presses: {len(cfg.presses)} on the cot model") as step:
                out["presses"] = evaluate_presses(cfg, cot["export"], dare)
                step.done(f"results in {cfg.evaluate.output_dir}/results.csv")
            echo(f"\nthe cot model under each press ({cfg.evaluate.mode} mode, {out['presses'][0]['n']} held-out "
                 f"rows; kv_fraction = KV bytes / the full cache's)")
            echo(results_table(out["presses"]))
        if "sweep" in cfg.steps:
            cfg.sweep.evaluate_overrides += [f"model.backbone={cfg.cot.model.backbone}",
                                             f"model.checkpoint={cot['export']}", f"data.path={cfg.data.output_dir}"]
            with console.step(f"sweep: {cfg.sweep.name}") as step:
                out["sweep"] = sweep_job.run_sweep(cfg.sweep)
                step.done(f"{len(out['sweep']['front'])} on the Pareto front")
    _print_summary(cfg, out)
    return out


def _train(stage: TrainConfig) -> dict[str, Any]:
    """One training stage as a console step."""
    from jobs.train import eval_summary, run_stage

    with console.step(f"train: {stage.stage}") as step:
        out = run_stage(stage)
        step.done(eval_summary(out["eval"]))
    return out


def _print_summary(cfg: QuickstartConfig, out: dict[str, Any]) -> None:
    from mmreason.tracking import tracking_uri

    held_out = f"{cfg.cot.data.eval_split} split, tasks {cfg.cot.data.tasks}, sizes {cfg.cot.data.sizes or 'all'}"
    echo(f"\nquickstart results ({held_out})")
    echo(f"{'model':<10}{'mode':<10}{'accuracy':>10}{'tokens/answer':>15}{'latents':>9}{'kv_fraction':>13}{'n':>6}")
    for stage in out["stages"]:
        for mode, r in stage["eval"].items():
            kv = r.get("kv_fraction_peak")
            echo(f"{stage['stage']:<10}{mode:<10}{r['accuracy']:>10.3f}{r['tokens_per_answer']:>15.1f}"
                 f"{r['latents_per_answer']:>9}{'' if kv is None else f'{kv:.3f}':>13}{r['n']:>6}")
    echo(f"\ndata: {cfg.data.output_dir}   models: " + ", ".join(s["export"] for s in out["stages"]))
    if "presses" in out:
        echo(f"press evaluations: {cfg.evaluate.output_dir}/results.csv")
    if "sweep" in out:
        pareto = Path(out["sweep"]["run_dir"]) / "pareto"
        echo(f"Pareto front: {pareto / 'pareto.png'}  {pareto / 'pareto.html'}")
    echo(f"MLflow: pipeline run {out['parent_run_id']} in {tracking_uri()}")
    echo("  browse: mmreason mlflow   (http://127.0.0.1:5000; experiment "
         f"{cfg.cot.experiment}-pipeline, run 'quickstart')")


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("mmreason quickstart", __doc__, argv)
    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    if args.check:
        print_check(check_report(cfg))
        return 0
    with console.session(cfg.root, "quickstart", args.verbose, steps=1 + len(cfg.steps)):
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
