"""Evaluate a checkpoint under a KV-cache press: accuracy, KV bytes, retained fractions, latency.

    python -m jobs.evaluate CONFIG.yaml [press=NAME] [press.key=value ...] [key=value ...] [--check]
    python -m jobs.evaluate configs/eval/press-maze.yaml press=tova press.factor=0.25
    python -m jobs.evaluate configs/eval/press-maze.yaml press=kvpress:snapkv press.compression_ratio=0.5
    python -m jobs.evaluate configs/eval/press-maze.yaml use_gpu=true precision=bf16

`press=NAME` replaces the config file's press (its settings too); `press.key=value` then sets one
setting. The press, its settings, the backbone, the checkpoint, the data and `use_gpu` against the
cluster's GPUs are checked before the model loads. The evaluation runs in a Ray task that asks for
`threads` CPUs (1 by default) and, with `use_gpu`, one GPU — not in this driver, which on a cluster
sits on a head node with no CPUs for Ray work. Results: OUTPUT_DIR/results.csv (a row per run),
OUTPUT_DIR/RUN_NAME/result.json and predictions.jsonl, written here, and an MLflow run (see
mmreason.eval.press_eval). `--check` runs every check, prints the resolved config, the checkpoint,
the held-out rows, the press, the device and precision and the task's resources, and loads no
model, starts no task and writes nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from mmreason import console
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import ConfigError, apply_override, from_dict, load_config, to_dict
from mmreason.eval.press_eval import (
    PressEvalConfig,
    held_out,
    measure_press,
    prepare_press_eval,
    record_press_eval,
    results_table,
)


def split_press_overrides(overrides: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(other overrides, the press=NAME value or None, the press.key=value overrides)."""
    others, name, settings = [], None, []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key == "press":
            name = item.partition("=")[2].strip()
        elif key.startswith("press."):
            settings.append(item)
        else:
            others.append(item)
    return others, name, settings


def load(config: str | None, overrides: Sequence[str], config_class: type = PressEvalConfig) -> Any:
    """`config_class` — any config with a `press` field (jobs.video_qa's too) — from the file and the
    overrides, `press=NAME` replacing the file's press and `press.key=value` then setting one setting."""
    others, name, settings = split_press_overrides(overrides)
    cfg = load_config(config_class, config, others)
    raw = {"press": {"name": name} if name is not None else dict(cfg.press)}
    for item in settings:
        apply_override(raw, item)
    if not raw["press"].get("name"):
        raise ConfigError("press: give a press name (press=NAME)")
    cfg.press = raw["press"]
    return cfg


def task_resources(cfg: PressEvalConfig) -> dict[str, float]:
    """What the evaluation task asks Ray for."""
    return {"CPU": cfg.threads or 1, "GPU": 1 if cfg.use_gpu else 0}


def prepare(cfg: PressEvalConfig) -> str:
    """Every check before the model loads — `prepare_press_eval`'s, then `use_gpu` against the
    cluster's GPUs (starts or joins Ray); returns the checkpoint to load."""
    from mmreason.hardware import require_gpus
    from pipelines import cluster_gpus

    checkpoint = prepare_press_eval(cfg)
    now, scalable = cluster_gpus()
    require_gpus(cfg.use_gpu, task_resources(cfg)["GPU"], now, scalable=scalable)
    return checkpoint


def check(cfg: PressEvalConfig) -> dict[str, Any]:
    """`--check`: `prepare`, and what the run would evaluate, where, and write."""
    import ray

    from mmreason.tracking import family_experiment, tracking_uri

    checkpoint = prepare(cfg)
    return {"config": to_dict(cfg), "checkpoint": checkpoint, "rows": len(held_out(cfg)), "press": cfg.press,
            "device": "cuda" if cfg.use_gpu else "cpu", "precision": cfg.precision,
            "task": task_resources(cfg),
            "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
            "writes": {"results": f"{cfg.output_dir}/results.csv", "run_dir": f"{cfg.output_dir}/{cfg.run_name}",
                       "mlflow": {"tracking_uri": tracking_uri(),
                                  "experiment": family_experiment(cfg.experiment, "evaluate")}}}


def run(cfg: PressEvalConfig) -> dict[str, Any]:
    """Check everything, evaluate in a Ray task where the hardware is, write and log the result
    here; returns the result row."""
    import ray

    checkpoint = prepare(cfg)
    res = task_resources(cfg)
    task = ray.remote(num_cpus=res["CPU"], num_gpus=res["GPU"])(_measure_task)
    measured = ray.get(task.remote(to_dict(cfg), checkpoint))
    return record_press_eval(cfg, measured)


def _measure_task(cfg_dict: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    return measure_press(from_dict(PressEvalConfig, cfg_dict), checkpoint)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m jobs.evaluate", __doc__, argv)
    cfg = load(args.config, args.overrides)
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(cfg.output_dir, "evaluate", args.verbose):
        with console.step(f"evaluate: {cfg.run_name} (press {cfg.press.get('name', 'none')})") as step:
            row = run(cfg)
            step.done(f"accuracy {row['accuracy']:.3f} on {row['n']} rows")
        console.echo(results_table(row))
        console.echo(f"results: {cfg.output_dir}/results.csv and {cfg.output_dir}/{cfg.run_name}/result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
