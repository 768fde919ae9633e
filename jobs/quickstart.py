"""The embedded default, end to end on one machine with no set-up (README command 1).

    python -m jobs.quickstart [CONFIG.yaml] [key=value ...]
    mmreason quickstart [CONFIG.yaml] [key=value ...]     e.g. cot.optim.epochs=2

A local Ray renders the grid-world dataset (all three tasks; many 3×3 mazes), a tiny InternVL-class
backbone is trained with chain-of-thought SFT, then through the CoCoNuT curriculum, both on Ray
Train + DeepSpeed (2 workers), and evaluated in the vanilla, cot and coconut modes. Everything is
one MLflow pipeline run with a child run per stage, in ./mlflow.db.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mmreason.cli_args import job_main, parse_job_args
from mmreason.config import load_config
from mmreason.data.gridworld import GridworldConfig, TaskSizes
from mmreason.eval.runner import EvalConfig
from mmreason.latent.coconut import CurriculumSchedule, GenerationSettings
from mmreason.train.config import DataConfig, OptimConfig, TrainConfig
from pipelines import gridworld

DATA_DIR = "runs/quickstart/data/gridworld"


def _default_data() -> GridworldConfig:
    return GridworldConfig(output_dir=DATA_DIR, tasks={
        "maze": TaskSizes(sizes=[3], examples=6000),
        "frozenlake": TaskSizes(sizes=[3, 4], examples=200),
        "minibehavior": TaskSizes(sizes=[8], examples=200),
    })


def _eval(modes: Sequence[str]) -> EvalConfig:
    budget = {"vanilla": 16, "cot": 96, "coconut": 96}
    return EvalConfig(modes={m: GenerationSettings(max_new_tokens=budget[m]) for m in modes}, max_examples=200)


def _default_cot() -> TrainConfig:
    return TrainConfig(stage="cot", run_name="quickstart-cot", storage="runs/quickstart/train",
                       data=DataConfig(path=DATA_DIR, tasks=["maze"], sizes=[3]),
                       optim=OptimConfig(lr=3e-3, batch_size=16, epochs=7, warmup_steps=20),
                       eval=_eval(["vanilla", "cot"]))


def _default_coconut() -> TrainConfig:
    return TrainConfig(stage="coconut", run_name="quickstart-coconut", storage="runs/quickstart/train",
                       data=DataConfig(path=DATA_DIR, tasks=["maze"], sizes=[3]),
                       optim=OptimConfig(lr=1e-3, batch_size=16, epochs=2, warmup_steps=5),
                       coconut=CurriculumSchedule(c_thought=1, epochs_per_stage=2, max_latent_stage=1, first_stage=1),
                       eval=_eval(["vanilla", "cot", "coconut"]))


@dataclass
class QuickstartConfig:
    data: GridworldConfig = field(default_factory=_default_data)
    """The grid-world dataset the quickstart renders."""
    cot: TrainConfig = field(default_factory=_default_cot)
    """Chain-of-thought SFT stage."""
    coconut: TrainConfig = field(default_factory=_default_coconut)
    """CoCoNuT curriculum stage, started from the cot export."""


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    from jobs.train import run_stage
    from mmreason.tracking import pipeline_run, tracking_uri

    args = parse_job_args("mmreason quickstart", __doc__, argv)
    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    with pipeline_run(cfg.cot.experiment, "quickstart") as parent_id:
        manifest = gridworld.run(cfg.data)
        print(gridworld.summary_table(manifest))
        cfg.cot.data.path = cfg.coconut.data.path = cfg.data.output_dir
        cot = run_stage(cfg.cot)
        cfg.coconut.init_from = cot["export"]
        coconut = run_stage(cfg.coconut)

    held_out = f"{cfg.cot.data.eval_split} split, tasks {cfg.cot.data.tasks}, sizes {cfg.cot.data.sizes or 'all'}"
    print(f"\nquickstart results ({held_out})")
    print(f"{'model':<10}{'mode':<10}{'accuracy':>10}{'tokens/answer':>15}{'latents':>9}{'n':>6}")
    for stage in (cot, coconut):
        for mode, r in stage["eval"].items():
            print(f"{stage['stage']:<10}{mode:<10}{r['accuracy']:>10.3f}{r['tokens_per_answer']:>15.1f}"
                  f"{r['latents_per_answer']:>9}{r['n']:>6}")
    print(f"\ndata: {cfg.data.output_dir}   models: {cot['export']}, {coconut['export']}")
    print(f"MLflow: pipeline run {parent_id} in {tracking_uri()}")
    uri = tracking_uri()
    print(f"  browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1   (predictions: {Path(coconut['run_dir']) / 'eval'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
