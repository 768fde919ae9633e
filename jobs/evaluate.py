"""Evaluate a checkpoint under a KV-cache press: accuracy, KV bytes, retained fractions, latency.

    python -m jobs.evaluate CONFIG.yaml [press=NAME] [press.key=value ...] [key=value ...]
    python -m jobs.evaluate configs/eval/press-maze.yaml press=tova press.factor=0.25
    python -m jobs.evaluate configs/eval/press-maze.yaml press=kvpress:snapkv press.compression_ratio=0.5

`press=NAME` replaces the config file's press (its settings too); `press.key=value` then sets one
setting. The press, its settings, the backbone, the checkpoint and the data are checked before the
model loads. Results: OUTPUT_DIR/results.csv (a row per run), OUTPUT_DIR/RUN_NAME/result.json and
predictions.jsonl, and an MLflow run (see mmreason.kv.evaluation).
"""

from __future__ import annotations

import sys
from typing import Sequence

from mmreason.cli_args import job_main, parse_job_args
from mmreason.config import ConfigError, apply_override, load_config
from mmreason.kv.evaluation import PressEvalConfig, results_table, run_press_eval


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


def load(config: str | None, overrides: Sequence[str]) -> PressEvalConfig:
    others, name, settings = split_press_overrides(overrides)
    cfg = load_config(PressEvalConfig, config, others)
    raw = {"press": {"name": name} if name is not None else dict(cfg.press)}
    for item in settings:
        apply_override(raw, item)
    if not raw["press"].get("name"):
        raise ConfigError("press: give a press name (press=NAME)")
    cfg.press = raw["press"]
    return cfg


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m jobs.evaluate", __doc__, argv)
    cfg = load(args.config, args.overrides)
    row = run_press_eval(cfg)
    print(results_table(row))
    print(f"results: {cfg.output_dir}/results.csv and {cfg.output_dir}/{cfg.run_name}/result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
