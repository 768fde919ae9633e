"""RL on the maze task, with and without a length penalty (issue 6's acceptance run).

One run, one data set, one starting model:
1. 3×3 mazes rendered with optional verbosity, so the cot model's replies vary in length:
   `--recheck` (default 0.7): that share of the chains re-checks every step
   (`mmreason.tasks.base.recheck_step`). `--recheck-at` says where: `after-answer` (default,
   `recheck_after_answer`) puts it behind the answer sentence, where it cannot change the answer —
   the verification rounds "overthinking" reasoners add after answering; the +1/0 reward is blind
   to it, so only a length penalty has a reason to cut it. `last-step` makes it the chain's last
   step, a re-walk that can go wrong and change the answer (there the +1/0 reward alone removes it).
   `--restate` (default 0): that share re-checks every step verbatim as it is made (`restated`) —
   a copy of the text just written, not a re-walk (yet on the tiny model the doubled cell numbers
   confused the letter lookup: cot 0.283 after 7 epochs). Above one half, so that
   greedy decoding (the evaluation) is verbose too: at 0.5 the cot model's greedy replies never
   re-checked (measured). With both at 0 the terse maze notes leave a penalty nothing to choose
   between: every sampled reply of a maze is about as long as the others.
2. `cot` SFT (Ray Train + DeepSpeed), held-out accuracy and reply length measured;
3. from that export, `rl` with the +1/0 answer reward (configs/train/rl-maze.yaml) and `rl` with the
   threshold length penalty added (configs/train/rl-maze-length.yaml), same seeds and steps.

Reports held-out accuracy, mean generated tokens and the share of replies that re-check, for the
start and both rl runs, and the ratios the acceptance asks about. Stages resume: re-running with the
same --root continues where it stopped.

    python benchmarks/rl_length.py [--root runs/bench/rl-length-after] [--recheck 0.7] [--eval-rows 600]
    python benchmarks/rl_length.py --recheck-at last-step --root runs/bench/rl-length \
        --out benchmarks/results/rl_length_last_step.json
    python benchmarks/rl_length.py --recheck 0 --restate 0.7 --root runs/bench/rl-length-restate \
        --out benchmarks/results/rl_length_restate.json

Prints a table and writes benchmarks/results/rl_length.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stage_cfg(config: str, run_name: str, args: argparse.Namespace, extra: list[str]):
    from mmreason.config import load_config
    from mmreason.train.config import TrainConfig

    root = Path(args.root)
    return load_config(TrainConfig, REPO / "configs/train" / config, [
        f"data.path={root / 'data'}", f"storage={root / 'train'}", f"run_name={run_name}", f"seed={args.seed}",
        f"eval.max_examples={args.eval_rows}", "eval.epoch_examples=0",
        f"eval.modes={{cot: {{max_new_tokens: {args.max_new_tokens}}}}}", *extra])


def summary(out: dict) -> dict:
    """Accuracy and length of a stage's held-out replies, and how many of them re-check."""
    res = out["eval"]["cot"]
    lines = (Path(out["run_dir"]) / "eval" / "predictions-cot.jsonl").read_text().splitlines()
    preds = [json.loads(line) for line in lines if line.strip()]
    return {"accuracy": res["accuracy"], "tokens_per_answer": res["tokens_per_answer"], "n": res["n"],
            "check_share": sum("Check:" in p["output"] for p in preds) / max(1, len(preds)),
            "train": {k: v for k, v in out["train"].items() if isinstance(v, (int, float))},
            "export": out["export"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO / "runs/bench/rl-length-after"))
    parser.add_argument("--recheck", type=float, default=0.7, help="share of chains that re-check every step (where: --recheck-at)")
    parser.add_argument("--recheck-at", choices=("after-answer", "last-step"), default="after-answer",
                        help="where the re-check goes: behind the answer sentence, or as the chain's last step")
    parser.add_argument("--restate", type=float, default=0.0, help="share of chains that re-check each step")
    parser.add_argument("--examples", type=int, default=6000, help="3x3 mazes over all splits")
    parser.add_argument("--cot-epochs", type=int, default=7)
    parser.add_argument("--eval-rows", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=160, help="eval and rl sampling budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/rl_length.json"))
    args = parser.parse_args()

    from jobs.train import run_stage
    from mmreason.tracking import pipeline_run

    after = args.recheck_at == "after-answer" and args.recheck > 0
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root.resolve()}/mlflow.db")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.gridworld", f"output_dir={root / 'data'}",
                    f"tasks={{maze: {{sizes: [3], examples: {args.examples}}}}}", f"recheck={args.recheck}",
                    f"restate={args.restate}", f"recheck_after_answer={str(after).lower()}",
                    "step_images=false"], cwd=REPO, check=True)
    sampling = f"rl.sampling={{max_new_tokens: {args.max_new_tokens}, do_sample: true, temperature: 1.0}}"
    results, seconds = {}, {}
    with pipeline_run("mmreason-bench", f"rl-length-recheck{args.recheck:g}{'-after' if after else ''}-restate{args.restate:g}"):
        for name, config, extra in (
            ("cot", "cot-maze.yaml",
             [f"optim={{lr: 0.003, batch_size: 16, epochs: {args.cot_epochs}, warmup_steps: 20}}"]),
            ("rl", "rl-maze.yaml", [sampling]),
            ("rl+length", "rl-maze-length.yaml", [sampling]),
        ):
            if name != "cot":
                extra = [f"init_from={results['cot']['export']}", *extra]
            start = time.perf_counter()
            results[name] = summary(run_stage(stage_cfg(config, name.replace("+", "-"), args, extra)))
            seconds[name] = time.perf_counter() - start
            r = results[name]
            print(f"  {name:<10} accuracy {r['accuracy']:.3f}  tokens {r['tokens_per_answer']:.1f}  "
                  f"re-checks {r['check_share']:.2f}  ({seconds[name] / 60:.1f} min)", flush=True)

    cot, rl, short = results["cot"], results["rl"], results["rl+length"]
    ratios = {
        "rl_accuracy_gain_over_cot": rl["accuracy"] - cot["accuracy"],
        "length_penalty_tokens_vs_rl": short["tokens_per_answer"] / rl["tokens_per_answer"],
        "length_penalty_tokens_vs_cot": short["tokens_per_answer"] / cot["tokens_per_answer"],
        "length_penalty_accuracy_vs_rl": short["accuracy"] - rl["accuracy"],
        "length_penalty_accuracy_vs_cot": short["accuracy"] - cot["accuracy"],
    }
    print(f"\n{'held-out 3x3':<12}{'accuracy':>10}{'tokens':>9}{'re-checks':>11}")
    for name, r in results.items():
        print(f"{name:<12}{r['accuracy']:>10.3f}{r['tokens_per_answer']:>9.1f}{r['check_share']:>11.2f}")
    for key, value in ratios.items():
        print(f"{key}: {value:+.3f}" if "accuracy" in key else f"{key}: {value:.3f}")
    report = {"recheck": args.recheck, "recheck_at": args.recheck_at, "restate": args.restate, "examples": args.examples,
              "cot_epochs": args.cot_epochs,
              "eval_rows": args.eval_rows, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "results": results, "ratios": ratios, "stage_minutes": {k: v / 60 for k, v in seconds.items()},
              "minutes": (time.perf_counter() - t0) / 60}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
