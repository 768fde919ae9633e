"""Does bf16 train as well as fp32? The same tiny cot stage (same seed, rows, epochs, batches) in both
precisions through the shared loop (`mmreason.train.loop.run_loop`, DeepSpeed single-process
ZeRO-2; bf16 = DeepSpeed's bf16 mode, fp32 master weights), then held-out accuracy of each export
in its own precision, and training speed side by side.

    python benchmarks/precision.py [--train-rows 2400] [--test-rows 200] [--epochs 5] [--device cpu]

Target (issue: real hardware): bf16 within 5 points of fp32. On a CPU without bf16 matrix units
(this project's 2-core machines) bf16 is several times slower than fp32 — a GPU's tensor cores are
where it pays; the ratio is printed, not judged. Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_smoke import maze_rows  # noqa: E402


def run(init: Path, root: Path, precision: str, train: list[dict], test: list[dict], args) -> dict:
    import torch

    from mmreason.config import load_config
    from mmreason.eval.runner import evaluate
    from mmreason.models import load_backbone
    from mmreason.hardware import torch_dtype
    from mmreason.train.config import TrainConfig
    from mmreason.train.loop import LocalWorker, run_loop, single_process_env

    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        f"precision={precision}", f"use_gpu={args.device != 'cpu'}", f"optim.batch_size={args.batch_size}",
        f"optim.epochs={args.epochs}", f"optim.lr={args.lr}", "eval.epoch_examples=0", f"seed={args.seed}"])
    device = torch.device(args.device)
    single_process_env(device)
    worker = LocalWorker(train, cfg.optim.batch_size, device, root / "checkpoints", seed=args.seed)
    t0 = time.perf_counter()
    out = run_loop(cfg, str(init), worker, REPO / "configs/deepspeed/zero2.json", len(train) // args.batch_size,
                   str(root / "run"))
    seconds = time.perf_counter() - t0
    family = load_backbone("tiny-internvl", root / "run" / "export", dtype=torch_dtype(precision))
    family.model.to(device)
    result = evaluate(family, test, "cot", cfg.eval.modes["cot"], batch_size=50)
    return {"loss_by_epoch": [r["loss"] for r in worker.reported], "final_loss": out["loss"],
            "samples_per_s": [r["samples_per_s"] for r in worker.reported], "train_seconds": seconds,
            "accuracy": result.accuracy, "n": result.n, "tokens_per_answer": result.tokens_per_answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=2400)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/precision.json"))
    args = parser.parse_args()

    import torch

    from mmreason.models import build_tiny

    train, test = maze_rows("train", args.train_rows, args.seed), maze_rows("test", args.test_rows, args.seed)
    report = {"device": args.device, "train_rows": len(train), "test_rows": len(test), "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "chance": 0.25, "target_gap_points": 5}
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny("tiny-internvl", Path(tmp) / "init", seed=args.seed)
        for precision in ("fp32", "bf16"):
            report[precision] = run(init, Path(tmp) / precision, precision, train, test, args)
            r = report[precision]
            print(f"{precision}: held-out accuracy {r['accuracy']:.3f} (n={r['n']}), loss by epoch "
                  f"{', '.join(f'{x:.3f}' for x in r['loss_by_epoch'])}, {r['train_seconds']:.0f} s", flush=True)
    gap = 100 * (report["bf16"]["accuracy"] - report["fp32"]["accuracy"])
    speed = report["bf16"]["train_seconds"] / report["fp32"]["train_seconds"]
    report.update(gap_points=gap, met=abs(gap) <= 5, bf16_time_over_fp32=speed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"bf16 − fp32: {gap:+.1f} points (target within 5: {'met' if abs(gap) <= 5 else 'MISSED'}); "
          f"bf16 took {speed:.1f}× fp32's training time on {args.device}   wrote {args.out}")


if __name__ == "__main__":
    main()
