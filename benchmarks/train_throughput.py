"""Training throughput: Ray Train + DeepSpeed ZeRO-2 (2 workers × 1 CPU) vs a plain single-process
torch loop (2 threads), same tiny backbone, same 3×3 maze rows, same per-step work (encode,
collate, CoCoNuT forward, backward, AdamW step).

These machines' speed drifts by ±30 % over minutes, so the two run in alternating rounds (plain,
Ray, plain, Ray, …) and the ratio is of the medians of their steady-state epochs (every epoch but
each run's first, which holds start-up). Ray's per-epoch rate is what the workers log to MLflow
(`samples_per_s`; `data_wait_s` beside it).

    python benchmarks/train_throughput.py [--rows 1280] [--batch-size 32] [--epochs 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_loop(data: str, backbone: str, batch_size: int, epochs: int) -> list[dict]:
    """Per-epoch samples/s of a single-process loop over rows read once."""
    import torch

    from mmreason.config import load_config
    from mmreason.data.reader import read_table
    from mmreason.latent.coconut import latent_forward
    from mmreason.models import build_tiny, load_backbone
    from mmreason.train.config import TrainConfig
    from mmreason.train.stages.sft import encode_batch

    torch.set_num_threads(2)
    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [f"data.path={data}"])
    with tempfile.TemporaryDirectory() as tmp:
        family = load_backbone(backbone, build_tiny(backbone, Path(tmp) / "m"))
    rows = read_table(data, split="train").to_pylist()
    opt = torch.optim.AdamW([p for p in family.model.parameters() if p.requires_grad], lr=1e-3)
    rng = random.Random(0)
    epochs_out = []
    for epoch in range(epochs):
        t0, seen = time.perf_counter(), 0
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            batch = encode_batch(family, rows[i : i + batch_size], cfg, epoch, rng)
            loss, _ = latent_forward(family, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += batch_size
        epochs_out.append({"epoch": epoch, "samples_per_s": seen / (time.perf_counter() - t0)})
    return epochs_out


def ray_train(data: str, backbone: str, batch_size: int, epochs: int, storage: str, run_name: str) -> list[dict]:
    """Per-epoch samples/s (and data wait) on Ray Train + DeepSpeed, as the workers log them."""
    from mlflow.tracking import MlflowClient

    from jobs.train import fit, resolve_model_path
    from mmreason.config import load_config
    from mmreason.tracking import stage_run, tracking_uri
    from mmreason.train.config import TrainConfig

    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        f"data.path={data}", f"storage={storage}", f"run_name={run_name}", f"model.backbone={backbone}",
        f"optim.batch_size={batch_size // 2}", f"optim.epochs={epochs}", "eval.max_examples=0",
        "eval.epoch_examples=0", "workers=2"])
    with stage_run("bench-train-throughput", run_name, {}) as run:
        fit(cfg, resolve_model_path(cfg), run.info.run_id)
    client = MlflowClient(tracking_uri())
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("samples_per_s", "data_wait_s")}
    return [{"epoch": e, "samples_per_s": history["samples_per_s"][e], "data_wait_s": history["data_wait_s"][e]}
            for e in sorted(history["samples_per_s"])]


def cpu_times() -> list[int]:
    """The aggregate CPU line of /proc/stat (user … steal), or [] where there is none."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return []


def steal_fraction(before: list[int], after: list[int]) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two snapshots (Linux VMs)."""
    if not before or not after:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return delta[7] / max(1, sum(delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1280, help="3x3 maze rows rendered (80 %% train)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (16 per Ray worker)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is start-up, not counted")
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain/Ray rounds")
    parser.add_argument("--backbone", default="tiny-internvl")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
    parser.add_argument("--child", choices=["plain", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is start-up)")
    if args.child:
        if args.child == "plain":
            epochs = plain_loop(args.data, args.backbone, args.batch_size, args.epochs)
        else:
            epochs = ray_train(args.data, args.backbone, args.batch_size, args.epochs, args.storage, args.run_name)
        print(json.dumps(epochs))
        return

    runs: dict[str, list[list[dict]]] = {"plain": [], "ray": []}
    steal: dict[str, list[float | None]] = {"plain": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "data")
        subprocess.run([sys.executable, "-m", "pipelines.gridworld", f"output_dir={data}",
                        f"examples={args.rows}", "tasks={maze: {sizes: [3]}}", "step_images=false"],
                       cwd=REPO, check=True, capture_output=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        for round_ in range(args.rounds):
            for mode in ("plain", "ray"):
                cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--storage", str(Path(tmp) / "runs"),
                       "--run-name", f"bench-{round_}", "--batch-size", str(args.batch_size),
                       "--epochs", str(args.epochs), "--backbone", args.backbone]
                before = cpu_times()
                out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, env=env)
                epochs = json.loads(out.stdout.strip().splitlines()[-1])
                steal[mode].append(steal_fraction(before, cpu_times()))
                runs[mode].append(epochs)
                rates = " ".join(f"{e['samples_per_s']:6.1f}" for e in epochs)
                stolen = "" if steal[mode][-1] is None else f"   (CPU stolen by the host: {steal[mode][-1]:.0%})"
                print(f"round {round_}  {mode:<6} samples/s by epoch: {rates}{stolen}", flush=True)

    steady = {mode: [e["samples_per_s"] for run in mode_runs for e in run[1:]] for mode, mode_runs in runs.items()}
    median = {mode: statistics.median(rates) for mode, rates in steady.items()}
    by_round = [statistics.median(e["samples_per_s"] for e in r[1:]) / statistics.median(e["samples_per_s"] for e in p[1:])
                for p, r in zip(runs["plain"], runs["ray"])]
    wait = statistics.median(e["data_wait_s"] for run in runs["ray"] for e in run[1:])
    report = {"backbone": args.backbone, "global_batch": args.batch_size, "train_rows": int(args.rows * 0.8),
              "epochs_per_run": args.epochs, "rounds": args.rounds,
              "plain_2_threads_samples_per_s": median["plain"], "ray_train_deepspeed_2x1_samples_per_s": median["ray"],
              "ratio_ray_vs_plain": median["ray"] / median["plain"], "ratio_by_round": by_round,
              "ray_data_wait_s_per_epoch": wait, "target_ratio": 0.8, "runs": runs,
              "cpu_steal_fraction": steal}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"median steady-state samples/s: plain {median['plain']:.1f}, Ray Train + DeepSpeed {median['ray']:.1f}; "
          f"ratio {report['ratio_ray_vs_plain']:.2f}x (by round: {', '.join(f'{r:.2f}' for r in by_round)}); "
          f"Ray data wait {wait:.2f} s/epoch   wrote {args.out}")


if __name__ == "__main__":
    main()
