"""RL (GRPO) throughput: replies/s of the rl stage, split into generation (sampling `group_size`
replies per prompt with the cached batched `generate`) and update (log-probs + clipped loss +
backward + AdamW), on Ray Train + DeepSpeed ZeRO-2 (2 workers × 1 CPU) and, for reference, a plain
single-process loop (2 threads) running the same `grpo_step`.

    python benchmarks/rl.py [--init runs/quickstart/train/quickstart-cot/export] [--steps 12]
                            [--prompts 8] [--group-size 8] [--max-new-tokens 64]

`--init` starts from a trained cot export (realistic reply lengths); without one a fresh tiny model
is used and every reply runs to --max-new-tokens. Prints a table and writes
benchmarks/results/rl.json.
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
DEFAULT_INIT = REPO / "runs/quickstart/train/quickstart-cot/export"


def _cfg(data: str, storage: str, init: str | None, args: argparse.Namespace, workers: int):
    from mmreason.config import load_config
    from mmreason.train.config import TrainConfig

    return load_config(TrainConfig, REPO / "configs/train/rl-maze.yaml", [
        f"data.path={data}", f"storage={storage}", "run_name=bench-rl", f"init_from={init or 'null'}",
        f"optim.batch_size={args.prompts}", "optim.epochs=1", "optim.warmup_steps=1",
        f"data.max_train_rows={args.steps * args.prompts * workers}", f"rl.group_size={args.group_size}",
        f"rl.sampling.max_new_tokens={args.max_new_tokens}", f"workers={workers}", "eval.epoch_examples=0"])


def plain(data: str, init: str | None, args: argparse.Namespace) -> dict:
    """The same grpo_step in one process with a torch AdamW (no Ray, no DeepSpeed)."""
    import torch

    from mmreason.data.reader import read_table
    from mmreason.models import build_tiny, load_backbone
    from mmreason.train.stages.rl import TorchEngine, grpo_step
    from mmreason.train.rewards import Rewards

    torch.set_num_threads(2)
    cfg = _cfg(data, "/tmp/unused", init, args, workers=1)
    path = init or build_tiny("tiny-internvl", Path(tempfile.mkdtemp()) / "m")
    family = load_backbone("tiny-internvl", path)
    family.model.train()
    engine = TorchEngine(family.model, torch.optim.AdamW(family.model.parameters(), lr=cfg.optim.lr))
    rows = read_table(data, split="train").to_pylist()
    rewards, gen = Rewards(cfg.rl.rewards), torch.Generator().manual_seed(0)
    totals = {"gen_seconds": 0.0, "update_seconds": 0.0, "replies": 0.0, "response_length": 0.0}
    t0 = time.perf_counter()
    for step in range(args.steps):
        m = grpo_step(engine, family, rows[step * args.prompts : (step + 1) * args.prompts], cfg.rl, rewards, gen)
        totals["gen_seconds"] += m["gen_seconds"]
        totals["update_seconds"] += m["update_seconds"]
        totals["replies"] += m["samples"]
        totals["response_length"] += m["response_length"] / args.steps
    totals["seconds"] = time.perf_counter() - t0
    return totals


def ray(data: str, storage: str, init: str | None, args: argparse.Namespace) -> dict:
    """The rl stage on Ray Train + DeepSpeed, as the worker loop measures it (rank-averaged)."""
    from jobs.train import fit, resolve_model_path

    cfg = _cfg(data, storage, init, args, workers=2)
    m = fit(cfg, resolve_model_path(cfg))
    steps = m["steps_per_epoch"]
    replies = m["rl_samples"] * steps * 2  # per worker per step × steps × workers
    return {"gen_seconds": m["gen_seconds"], "update_seconds": m["update_seconds"], "replies": replies,
            "response_length": m["rl_response_length"], "seconds": replies / m["samples_per_s"]}


def row(name: str, r: dict) -> dict:
    # gen/update seconds are wall time per worker (workers generate and update their shares in
    # parallel), so all replies over that time is the rate of that phase
    return {"setting": name, "replies": r["replies"], "seconds": r["seconds"],
            "replies_per_s": r["replies"] / r["seconds"],
            "generation_replies_per_s": r["replies"] / r["gen_seconds"],
            "update_replies_per_s": r["replies"] / r["update_seconds"],
            "generation_share": r["gen_seconds"] / (r["gen_seconds"] + r["update_seconds"]),
            "gen_seconds_per_worker": r["gen_seconds"], "update_seconds_per_worker": r["update_seconds"],
            "mean_reply_tokens": r["response_length"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=str(DEFAULT_INIT) if DEFAULT_INIT.is_dir() else None)
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps (per worker)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per worker per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/rl.json"))
    parser.add_argument("--child", choices=["plain", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = plain(args.data, args.init, args) if args.child == "plain" else ray(args.data, args.storage, args.init, args)
        Path(args.result).write_text(json.dumps(result))  # a file: Ray's log lines share stdout
        return

    rows_needed = int(args.steps * args.prompts * 2 / 0.8) + 50
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "data")
        subprocess.run([sys.executable, "-m", "pipelines.gridworld", f"output_dir={data}", f"examples={rows_needed}",
                        "tasks={maze: {sizes: [3]}}", "step_images=false"], cwd=REPO, check=True, capture_output=True)
        for mode in ("plain", "ray"):
            cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--storage", str(Path(tmp) / "runs"),
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--group-size", str(args.group_size),
                   "--max-new-tokens", str(args.max_new_tokens), "--result", str(Path(tmp) / f"{mode}.json")]
            cmd += ["--init", args.init] if args.init else []
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True,
                           env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
            results[mode] = json.loads((Path(tmp) / f"{mode}.json").read_text())
    table = [row("plain torch, 1 process × 2 threads", results["plain"]),
             row("Ray Train + DeepSpeed ZeRO-2, 2 workers × 1 CPU", results["ray"])]
    print(f"{'setting':<48}{'replies/s':>10}{'gen r/s':>9}{'upd r/s':>9}{'gen %':>7}{'tokens':>8}")
    for r in table:
        print(f"{r['setting']:<48}{r['replies_per_s']:>10.1f}{r['generation_replies_per_s']:>9.1f}"
              f"{r['update_replies_per_s']:>9.1f}{100 * r['generation_share']:>6.0f}%{r['mean_reply_tokens']:>8.1f}")
    report = {"init": args.init, "backbone": "tiny-internvl", "steps": args.steps, "prompts_per_worker": args.prompts,
              "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "results": table,
              "note": "gen/upd r/s: replies per second of generation time / of update time (all workers together)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
