"""Training throughput: Ray Train + DeepSpeed ZeRO-2 (2 workers × 1 CPU) vs a plain single-process
torch loop (2 threads), same tiny backbone, same 3×3 maze rows, same per-step work (encode,
collate, CoCoNuT forward, backward, AdamW step). Reports steady-state samples/s (epoch 2; epoch 1
holds start-up) and the ratio.

    python benchmarks/train_throughput.py [--rows 1024] [--batch-size 32] [--backbone tiny-internvl]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_loop(data: str, backbone: str, batch_size: int, epochs: int) -> float:
    """Samples/s of the last epoch of a single-process loop."""
    import torch

    from mmreason.config import load_config
    from mmreason.data.reader import read_table
    from mmreason.latent.coconut import latent_forward
    from mmreason.models import build_tiny, load_backbone
    from mmreason.train.config import TrainConfig
    from mmreason.train.worker import encode_batch

    torch.set_num_threads(2)
    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [f"data.path={data}"])
    with tempfile.TemporaryDirectory() as tmp:
        family = load_backbone(backbone, build_tiny(backbone, Path(tmp) / "m"))
    rows = read_table(data, split="train").to_pylist()
    opt = torch.optim.AdamW([p for p in family.model.parameters() if p.requires_grad], lr=1e-3)
    rng = random.Random(0)
    rate = 0.0
    for epoch in range(epochs):
        t0, seen = time.perf_counter(), 0
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            batch = encode_batch(family, rows[i : i + batch_size], cfg, epoch, rng)
            loss, _ = latent_forward(family, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += batch_size
        rate = seen / (time.perf_counter() - t0)
    return rate


def ray_train(data: str, backbone: str, batch_size: int, epochs: int, storage: str) -> float:
    """Samples/s of the last epoch on Ray Train + DeepSpeed, as the worker loop measures it."""
    from jobs.train import fit, resolve_model_path
    from mmreason.config import load_config
    from mmreason.train.config import TrainConfig

    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        f"data.path={data}", f"storage={storage}", "run_name=bench", f"model.backbone={backbone}",
        f"optim.batch_size={batch_size // 2}", f"optim.epochs={epochs}", "eval.max_examples=0", "workers=2"])
    return fit(cfg, resolve_model_path(cfg))["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1280, help="3x3 maze rows rendered (80 %% train)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (16 per Ray worker)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="tiny-internvl")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
    parser.add_argument("--child", choices=["plain", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "plain":
        print(json.dumps({"samples_per_s": plain_loop(args.data, args.backbone, args.batch_size, args.epochs)}))
        return
    if args.child == "ray":
        rate = ray_train(args.data, args.backbone, args.batch_size, args.epochs, args.storage)
        print(json.dumps({"samples_per_s": rate}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "data")
        subprocess.run([sys.executable, "-m", "pipelines.gridworld", f"output_dir={data}",
                        f"examples={args.rows}", "tasks={maze: {sizes: [3]}}", "step_images=false"],
                       cwd=REPO, check=True, capture_output=True)
        results = {}
        for mode in ("plain", "ray"):
            cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--storage", str(Path(tmp) / "runs"),
                   "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--backbone", args.backbone]
            out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True,
                                 env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]
            print(f"{mode:<6} {results[mode]:8.1f} samples/s", flush=True)
    report = {"backbone": args.backbone, "global_batch": args.batch_size, "train_rows": int(args.rows * 0.8),
              "plain_2_threads_samples_per_s": results["plain"],
              "ray_train_deepspeed_2x1_samples_per_s": results["ray"],
              "ratio_ray_vs_plain": results["ray"] / results["plain"], "target_ratio": 0.8}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"Ray Train + DeepSpeed vs plain: {report['ratio_ray_vs_plain']:.2f}x   wrote {args.out}")


if __name__ == "__main__":
    main()
