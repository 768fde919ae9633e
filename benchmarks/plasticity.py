"""Plasticity: train one tiny backbone on three grid-world tasks in sequence (cot SFT on Ray Train +
DeepSpeed, each stage starting from the previous export), once plainly and once with continual
backprop, from the same initial weights and data. Reports each task's held-out accuracy right after
its own stage — the last one is the final-task accuracy the comparison is about — and every task's
accuracy at the end of the sequence (what is kept). A benchmark, not a test: at this scale the
difference can be within noise; scale --rows/--epochs up to see more.

    python benchmarks/plasticity.py [--rows 1500] [--epochs 3] [--replacement-rate 0.0007]

Continual backprop's state (utilities, ages, accumulated fractions) is carried from one stage to
the next through the export, so the sequence is one continual run. Prints a table and writes
benchmarks/results/plasticity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEQUENCE = (("maze", 3), ("frozenlake", 3), ("minibehavior", 5))


def stage_cfg(data: str, storage: str, task: str, size: int, init: str | None, args: argparse.Namespace,
              cbp: bool, run_name: str):
    from mmreason.config import load_config
    from mmreason.train.config import TrainConfig

    overrides = [f"data.path={data}", f"storage={storage}", f"run_name={run_name}", f"init_from={init or 'null'}",
                 f"data.tasks=[{task}]", f"data.sizes=[{size}]", f"optim.epochs={args.epochs}",
                 f"optim.lr={args.lr}", "optim.batch_size=16", "optim.warmup_steps=10", f"seed={args.seed}",
                 f"eval.max_examples={args.eval_rows}", "eval.epoch_examples=0",
                 f"eval.modes={{cot: {{max_new_tokens: {args.max_new_tokens}}}}}"]
    if cbp:
        overrides.append(f"continual_backprop={{enabled: true, replacement_rate: {args.replacement_rate}, "
                         f"maturity_threshold: {args.maturity}, decay_rate: 0.99, apply_freq: 1}}")
    return load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", overrides)


def run_sequence(data: str, storage: str, args: argparse.Namespace, cbp: bool) -> dict:
    from jobs.train import evaluate_export, run_stage

    name = "cbp" if cbp else "plain"
    init, after_own, stage_seconds = None, {}, {}
    for task, size in SEQUENCE:
        t0 = time.perf_counter()
        out = run_stage(stage_cfg(data, storage, task, size, init, args, cbp, f"{name}-{task}"))
        stage_seconds[task] = time.perf_counter() - t0
        after_own[task] = out["eval"]["cot"]["accuracy"]
        init = out["export"]
        replaced = out["train"].get("cbp_replaced")
        print(f"  {name:<6} {task:<13} accuracy {after_own[task]:.3f}"
              + (f"  (units replaced so far: {replaced})" if replaced is not None else ""), flush=True)
    at_end = {}
    for task, size in SEQUENCE:  # the final model on every task
        cfg = stage_cfg(data, storage, task, size, None, args, cbp, f"{name}-final-on-{task}")
        at_end[task] = evaluate_export(cfg, Path(init), Path(storage) / f"{name}-final" / task)["cot"]["accuracy"]
    return {"after_own_stage": after_own, "at_end": at_end, "final_task_accuracy": after_own[SEQUENCE[-1][0]],
            "stage_seconds": stage_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1500, help="examples per task (80 %% train)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--replacement-rate", type=float, default=7e-4, help="per step, of the mature units")
    parser.add_argument("--maturity", type=int, default=50)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/plasticity.json"))
    args = parser.parse_args()

    from mmreason.tracking import pipeline_run

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        data = str(Path(tmp) / "data")
        tasks = "{" + ", ".join(f"{t}: {{sizes: [{s}]}}" for t, s in SEQUENCE) + "}"
        subprocess.run([sys.executable, "-m", "pipelines.gridworld", f"output_dir={data}", f"examples={args.rows}",
                        f"tasks={tasks}", "step_images=false"], cwd=REPO, check=True, capture_output=True)
        results = {}
        for cbp in (False, True):
            with pipeline_run("mmreason-bench", f"plasticity-{'cbp' if cbp else 'plain'}"):
                results["continual_backprop" if cbp else "plain"] = run_sequence(data, str(Path(tmp) / "runs"), args, cbp)
    names = [t for t, _ in SEQUENCE]
    print(f"\n{'held-out accuracy':<20}" + "".join(f"{t:>14}" for t in names) + f"{'final task':>12}")
    for cond, r in results.items():
        print(f"{cond + ' (own stage)':<20}" + "".join(f"{r['after_own_stage'][t]:>14.3f}" for t in names)
              + f"{r['final_task_accuracy']:>12.3f}")
        print(f"{cond + ' (at end)':<20}" + "".join(f"{r['at_end'][t]:>14.3f}" for t in names))
    report = {"sequence": [f"{t} {s}x{s}" for t, s in SEQUENCE], "rows_per_task": args.rows, "epochs": args.epochs,
              "lr": args.lr, "continual_backprop": {"replacement_rate": args.replacement_rate,
                                                    "maturity_threshold": args.maturity, "decay_rate": 0.99},
              "eval_rows": args.eval_rows, "results": results, "minutes": (time.perf_counter() - t0) / 60}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
