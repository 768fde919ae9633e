"""GPU smoke benchmark: the code a Ray Train worker runs, on one GPU, without Ray or MLflow.

    python benchmarks/gpu_smoke.py                                  # cuda, bf16 (the A100/H100 setting)
    python benchmarks/gpu_smoke.py --device cpu --precision bf16 --train-rows 64 --test-rows 8   # here

One tiny cot stage per setting — `mmreason.train.loop.run_loop` with a `LocalWorker` (DeepSpeed
single-process, ZeRO-2, the precision written into its config), an epoch of maze rows, per-epoch
evaluation, the export — then the export decoded on the device under every press of
`benchmarks/kv_presses.py` at half the cache (TOVA, DARE with a router saved untrained, CoSRe, the
kvpress baselines; `mmreason.eval.press_eval.measure_press`, what `jobs.evaluate` runs), and
CoCoNuT's latent generation. The same seed runs first on the CPU in fp32 as the reference: the
device run's loss must stay within `--loss-tol` (relative) of it and its accuracy within
`--acc-tol` points (the model is tiny and barely trained, so accuracy is near chance and
compared loosely; the loss is the sharper check). Prints samples/s, decode tokens/s and both
checks; writes benchmarks/results/gpu_smoke.json. Exit code 1 when a check fails.

On a GPU box with Python 3.12 and torch (CUDA) but no Ray/DeepSpeed/MLflow, carry the wheels
(`benchmarks/gpu_wheels.sh` downloads them into wheels/, ~20 MB) and run
`pip install --no-deps wheels/*.whl && pip install --no-deps -e . && python -m pytest -m gpu -q &&
python benchmarks/gpu_smoke.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def maze_rows(split: str, n: int, seed: int) -> list[dict]:
    from mmreason.tasks import TASKS, RenderOptions, generate_example

    fractions, opts = {"train": 0.8, "val": 0.1, "test": 0.1}, RenderOptions(image_size=64, step_images=False)
    return [generate_example(TASKS["maze"], 3, split, i, seed, fractions, opts) for i in range(n)]


def kv_press_list() -> list[dict]:
    """No press, then the presses `benchmarks/kv_presses.py` compares, at half the cache."""
    spec = importlib.util.spec_from_file_location("kv_presses", REPO / "benchmarks/kv_presses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return [{"name": "none"}, *module.presses(0.5, "ROUTER_DIR", None)]


def stage(init: Path, root: Path, device: str, precision: str, train: list[dict], val: list[dict],
          args: argparse.Namespace) -> dict:
    """One cot stage through the shared loop, evaluated each epoch on `val` (it picks `best`);
    returns its last epoch's metrics and the export dir."""
    import torch

    from mmreason.config import load_config
    from mmreason.train.config import TrainConfig
    from mmreason.train.loop import LocalWorker, run_loop, single_process_env

    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        f"precision={precision}", f"use_gpu={device != 'cpu'}", f"optim.batch_size={args.batch_size}",
        f"optim.epochs={args.epochs}", f"eval.epoch_examples={len(val)}", f"eval.batch_size={len(val)}",
        "eval.modes={cot: {max_new_tokens: 128}}", f"seed={args.seed}"])
    dev = torch.device(device)
    single_process_env(dev)
    worker = LocalWorker(train, cfg.optim.batch_size, dev, root / "checkpoints", seed=args.seed)
    steps = len(train) // cfg.optim.batch_size
    t0 = time.perf_counter()
    out = run_loop(cfg, str(init), worker, REPO / "configs/deepspeed/zero2.json", steps, str(root / "run"),
                   eval_rows=val)
    return {"loss": out["loss"], "eval_accuracy": out.get("eval_accuracy"), "samples_per_s": out["samples_per_s"],
            "losses": [r["loss"] for r in worker.reported], "seconds": time.perf_counter() - t0,
            "export": str(root / "run" / "export")}


def decode_all(export: str, device: str, precision: str, test: list[dict], args: argparse.Namespace) -> dict:
    """The export under every press and with CoCoNuT latents; accuracy, tokens/s and KV per press."""
    from mmreason.eval.press_eval import PressEvalConfig, measure_press
    from mmreason.kv.dare import DareRouter, save_router
    from mmreason.models import load_backbone
    from mmreason.train.stages.dare import ROUTER_FILE

    hidden = load_backbone("tiny-internvl", export).model.config.get_text_config().hidden_size
    save_router(DareRouter(hidden, 64, 3), Path(export) / ROUTER_FILE)  # untrained: the decode path, not a result
    out = {}
    runs = [dict(p) for p in kv_press_list()] + [{"name": "none", "mode": "coconut", "n_latent_steps": 1}]
    for press in runs:
        press.pop("model", None)
        if "router_path" in press:
            press["router_path"] = str(Path(export) / ROUTER_FILE)
        mode, n_latent = press.pop("mode", "cot"), press.pop("n_latent_steps", 0)
        label = f"{press['name']}" + (f"-{mode}" if mode != "cot" else "")
        cfg = PressEvalConfig(use_gpu=device != "cpu", precision=precision, press=press, mode=mode,
                              n_latent_steps=n_latent, batch_size=len(test), seed=args.seed)
        cfg.model.backbone, cfg.model.checkpoint = "tiny-internvl", export
        cfg.generation.max_new_tokens = 128
        row = measure_press(cfg, export, rows=test)["row"]
        out[label] = {k: row[k] for k in ("accuracy", "decode_tokens_per_s", "kv_fraction_peak", "tokens_per_answer")
                      if k in row}
        print(f"  {label:<28} acc {row['accuracy']:.3f}  decode {row['decode_tokens_per_s']:8.1f} tok/s  "
              f"peak KV {row.get('kv_fraction_peak', float('nan')):.2f}", flush=True)
    return out


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--train-rows", type=int, default=1024)
    parser.add_argument("--test-rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-tol", type=float, default=0.05, help="relative; bf16 keeps 8 mantissa bits")
    parser.add_argument("--acc-tol", type=float, default=15.0, help="points, on --test-rows rows")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_smoke.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu to try the script)")

    from mmreason.models import build_tiny

    train, test = maze_rows("train", args.train_rows, args.seed), maze_rows("test", args.test_rows, args.seed)
    val = maze_rows("val", args.test_rows, args.seed)  # per-epoch evaluation (and `best`) never reads test
    report = {"device": args.device, "precision": args.precision, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "train_rows": len(train), "test_rows": len(test), "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny("tiny-internvl", Path(tmp) / "init", seed=args.seed)
        settings = [("cpu", "fp32"), (args.device, args.precision)]
        for device, precision in settings:
            key = f"{device}-{precision}"
            print(f"{key}: cot stage, {args.epochs} epoch(s) of {len(train)} rows", flush=True)
            report[key] = stage(init, Path(tmp) / key, device, precision, train, val, args)
            print(f"  loss {report[key]['loss']:.4f}  val accuracy {report[key]['eval_accuracy']:.3f}  "
                  f"{report[key]['samples_per_s']:.1f} samples/s", flush=True)
            report[key]["decode"] = decode_all(report[key]["export"], device, precision, test, args)
    ref, dev = report["cpu-fp32"], report[f"{args.device}-{args.precision}"]
    loss_gap = abs(dev["loss"] - ref["loss"]) / ref["loss"]
    acc_gap = 100 * abs(dev["eval_accuracy"] - ref["eval_accuracy"])
    report["checks"] = {"loss_rel_gap": loss_gap, "loss_tol": args.loss_tol, "loss_ok": loss_gap <= args.loss_tol,
                        "accuracy_gap_points": acc_gap, "acc_tol": args.acc_tol, "accuracy_ok": acc_gap <= args.acc_tol}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"loss {dev['loss']:.4f} vs CPU fp32 {ref['loss']:.4f} (gap {loss_gap:.1%}, tolerance {args.loss_tol:.0%}); "
          f"accuracy {dev['eval_accuracy']:.3f} vs {ref['eval_accuracy']:.3f} (gap {acc_gap:.1f} points, "
          f"tolerance {args.acc_tol:g}); training {dev['samples_per_s']:.1f} vs {ref['samples_per_s']:.1f} "
          f"samples/s   wrote {args.out}")
    return 0 if report["checks"]["loss_ok"] and report["checks"]["accuracy_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
