"""Accuracy vs KV memory of every press on one trained maze model, side by side at matched budgets.

    python benchmarks/kv_presses.py                                  # the benchmark model (configs/bench)
    python benchmarks/kv_presses.py --checkpoint runs/quickstart/train/quickstart-cot/export \
        --data runs/quickstart/data/gridworld --sizes 3 --rows 100

For each kept fraction f (default 0.5 and 0.25, i.e. kvpress compression ratios 0.5 and 0.75) the
cot model is evaluated (`mmreason.eval.press_eval.run_press_eval`, the code `jobs.evaluate` runs) with
no press, TOVA (factor f), DARE (per-modality targets `dare_targets(f)`, from layer 0, with the
router and model of a dare stage run here on this model for that f — DARE's way, backbone trained
with the router, `DARE_RECIPE` (decode masks, recent window, context router, importance fit;
change with `--dare-set`), unless
`--dare-backbone frozen`; `--dare-kept` trains one for every f instead — or given by
`--dare-export`), CoSRe training-free (DCT 4×4 → 2×2 on images + shared slots with residual
fraction f, on the cot model), CoSRe with the model fine-tuned under it (`cosre_settings(f)`, which
also folds the answer into the slots as it is written; a cosre stage run here for that f, or
`--cosre-export`; `--no-cosre-stage` skips it), and the kvpress baselines at compression 1 − f. KV bytes are
measured (`KVMeter`): `kv_fraction_peak` is the cache's peak during decoding over the full cache's,
`kv_fraction_prefill` right after the prompt — kvpress presses compress the prompt only, ours
every step. Writes benchmarks/results/kv_presses.json, a table, and an accuracy-vs-KV plot (PNG +
HTML, Pareto front in red).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.config import load_config  # noqa: E402
from mmreason.eval.pareto import pareto_front, plot_front  # noqa: E402
from mmreason.eval.press_eval import PressEvalConfig, results_table, run_press_eval  # noqa: E402
from mmreason.train.stages.dare import ROUTER_FILE  # noqa: E402

KVPRESS = ("snapkv", "streaming_llm", "knorm", "expected_attention", "tova")
DARE_WINDOW = 8
"""DARE keeps the latest 8 entries (a step of the answer is ~6 tokens) and ranks the rest by its router."""
DARE_RECIPE = ["dare.masks=decode", f"dare.window={DARE_WINDOW}", "dare.router_context=3", "dare.router_fit=knockout"]
"""How the dare stage trains here: a router reading each token with the two before it is fitted,
before the stage, to how much evicting each token alone raises the cot model's answer loss
(knockout, on 256 training rows), then frozen with what feeds it; the rest of the model trains
under the masks decoding applies (replayed query by query) with the recent window."""


def presses(kept: float, dare_export: str | None, cosre_export: str | None) -> list[dict]:
    """The presses at one kept fraction; a `model` key names the stage export a press decodes with
    (default: the cot checkpoint)."""
    out = [{"name": "tova", "factor": kept, "min_size": 4},
           {"name": "cosre", "block": 4, "keep_h": 2, "keep_w": 2, "slots": 8, "residual_text": kept,
            "residual_vis": kept}]
    if cosre_export:
        out.append({"name": "cosre", **cosre_settings(kept), "model": cosre_export})
    if dare_export:
        rho_text, rho_vis = dare_targets(kept)
        out.append({"name": "dare", "rho_text": rho_text, "rho_vis": rho_vis, "layer": 0, "window": DARE_WINDOW,
                    "router_path": str(Path(dare_export) / ROUTER_FILE), "model": dare_export})
    # kvpress's SnapKV observation window defaults to 64 queries: a maze prompt is ~70 tokens
    out += [{"name": f"kvpress:{m}", "compression_ratio": round(1 - kept, 4), **({"window_size": 16} if m == "snapkv" else {})}
            for m in KVPRESS]
    return out


def dare_targets(kept: float) -> tuple[float, float]:
    """DARE's per-modality targets for a kept fraction of the whole cache: a maze row is ~16 image
    entries and ~105 text ones (prompt + answer), and its image is read once, for the transcription
    that opens the answer — so the image is kept whole while the budget allows (ρ_vis = min(1,
    2·kept)) and text takes the rest (ρ_text = 0.8·kept: 0.5 → 1.0 / 0.4, 0.25 → 0.5 / 0.2)."""
    return round(0.8 * kept, 4), min(1.0, round(2 * kept, 4))


def cosre_settings(kept: float) -> dict:
    """CoSRe's settings for a kept fraction of the peak cache when the model is fine-tuned under
    it: 8 shared slots, 0.6·kept of the text as residual entries, every image entry; the image's
    4×4 grid is kept whole at 0.5 (as DARE keeps it: the answer's first line reads it) and cut to
    2×2 frequencies below; the answer is folded every 8 tokens, the latest 8 kept (4 / 4 below
    0.5). 0.5 → ~0.45 of the peak; below, the slots and the recent window are a floor."""
    small = kept < 0.5
    return {"block": 4, "keep_h": 2 if small else 4, "keep_w": 2 if small else 4, "slots": 8,
            "residual_text": round(0.6 * kept, 4), "residual_vis": 1.0, "every": 4 if small else 8,
            "recent": 4 if small else 8}


def run_bench_stage(config: str, name: str, checkpoint: str, data: str, sizes: list[int], out: Path, rows: int,
                    epochs: int, overrides: list[str]) -> str:
    """One training stage (`configs/train/<config>`) on the benchmark model; returns its export. A
    run name per setting: the same name resumes (or reuses) an earlier run's checkpoints."""
    from jobs.train import run_stage
    from mmreason.train.config import TrainConfig

    cfg = load_config(TrainConfig, str(REPO / "configs/train" / config), [
        f"init_from={checkpoint}", f"data.path={data}", f"data.sizes={json.dumps(sizes)}", f"storage={out}",
        f"run_name={name}", f"data.max_train_rows={rows}", f"optim.epochs={epochs}",
        "eval.max_examples=50", "eval.modes={cot: {max_new_tokens: 128}}", *overrides])
    return run_stage(cfg)["export"]


def name_suffix(overrides: list[str]) -> str:
    """What a stage's config overrides add to its run name: `dare.ratio_weight=20` → `-ratio_weight20`,
    `distill=1.0` → `-distill1.0`."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--dare-set / --cosre-set take KEY=VALUE, got {bad}")
    return "".join("-" + key.split(".")[-1] + value for key, value in (o.split("=", 1) for o in overrides))


def train_router(checkpoint: str, data: str, sizes: list[int], out: Path, backbone: str, rows: int,
                 epochs: int, kept: float, overrides: list[str]) -> str:
    """The dare stage on this model (`dare_targets(kept)`, router from layer 0); returns its export,
    which holds the router (and, with `backbone=full`, the model trained to decode under it)."""
    rho_text, rho_vis = dare_targets(kept)
    name = f"bench-dare-{backbone}-{kept}-r{rows}-e{epochs}-w{DARE_WINDOW}c3knock" + name_suffix(overrides)
    return run_bench_stage("dare-maze.yaml", name, checkpoint, data, sizes, out, rows, epochs, [
        f"dare.rho_text={rho_text}", f"dare.rho_vis={rho_vis}", "dare.layer=0", f"dare.backbone={backbone}",
        "optim.lr=0.001" if backbone == "full" else "optim.lr=0.003", *DARE_RECIPE, *overrides])


def train_cosre(checkpoint: str, data: str, sizes: list[int], out: Path, rows: int, epochs: int, kept: float,
                overrides: list[str]) -> str:
    """The cosre stage on this model under `cosre_settings(kept)`; returns its export."""
    settings = cosre_settings(kept)
    name = f"bench-cosre-{kept}-r{rows}-e{epochs}-" + "".join(f"{k[0]}{v}" for k, v in settings.items()) + name_suffix(
        overrides)
    return run_bench_stage("cosre-maze.yaml", name, checkpoint, data, sizes, out, rows, epochs,
                           [f"cosre={json.dumps(settings)}", *overrides])  # the config's lr and batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/bench/train/bench-cot/export")
    parser.add_argument("--data", default="runs/bench/data/gridworld")
    parser.add_argument("--sizes", default="3,4")
    parser.add_argument("--rows", type=int, default=1000,
                        help="held-out rows, interleaved over sizes (1000: a standard error of 0.7 points at 95 %%)")
    parser.add_argument("--kept", default="0.5,0.25", help="kept fractions of the KV cache")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dare-export", default=None, help="a dare stage's export (default: train one here)")
    parser.add_argument("--dare-backbone", choices=("frozen", "full"), default="full",
                        help="the dare stage trains the router only, or the model with it (DARE's way)")
    parser.add_argument("--dare-rows", type=int, default=16000, help="training rows of the dare stage (per epoch)")
    parser.add_argument("--dare-epochs", type=int, default=5)
    parser.add_argument("--dare-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the dare stage's config (repeatable), e.g. dare.ratio_weight=20")
    parser.add_argument("--dare-kept", type=float, default=None,
                        help="train one dare stage, for this kept fraction, and use it at every --kept "
                             "(default: one per kept fraction, each trained for its own targets)")
    parser.add_argument("--no-dare", action="store_true")
    parser.add_argument("--cosre-export", default=None, help="a cosre stage's export (default: train one here)")
    parser.add_argument("--cosre-rows", type=int, default=16000, help="training rows of the cosre stage (per epoch)")
    parser.add_argument("--cosre-epochs", type=int, default=3)
    parser.add_argument("--cosre-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the cosre stage's config (repeatable), e.g. distill=1.0")
    parser.add_argument("--no-cosre-stage", action="store_true", help="CoSRe on the cot model only (training-free)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/kv_presses.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path("runs/bench/kv_presses")

    kept_fractions = [float(k) for k in args.kept.split(",")]
    dare_exports: dict[float, str | None] = {kept: None for kept in kept_fractions}
    t0 = time.perf_counter()
    if not args.no_dare:
        trained: dict[float, str] = {}  # by the fraction trained for: --dare-kept trains one stage for all
        for kept in kept_fractions:
            target = args.dare_kept or kept
            if not args.dare_export and target not in trained:
                trained[target] = train_router(str(Path(args.checkpoint).resolve()), args.data, sizes,
                                               work / "train", args.dare_backbone, args.dare_rows,
                                               args.dare_epochs, target, args.dare_set)
            dare_exports[kept] = args.dare_export or trained[target]
    train_s = time.perf_counter() - t0
    cosre_exports: dict[float, str | None] = {kept: None for kept in kept_fractions}
    if not args.no_cosre_stage:
        for kept in kept_fractions:
            cosre_exports[kept] = args.cosre_export or train_cosre(
                str(Path(args.checkpoint).resolve()), args.data, sizes, work / "train", args.cosre_rows,
                args.cosre_epochs, kept, args.cosre_set)
    cosre_s = time.perf_counter() - t0 - train_s

    base = load_config(PressEvalConfig, str(REPO / "configs/eval/press-maze.yaml"), [
        f"model.checkpoint={args.checkpoint}", f"data.path={args.data}", f"data.sizes={json.dumps(sizes)}",
        f"max_examples={args.rows}", f"generation.max_new_tokens={args.max_new_tokens}", f"output_dir={work / 'eval'}",
        "batch_size=25", "threads=2"])
    settings = [{"name": "none"}] + [dict(p, kept=kept) for kept in kept_fractions
                                     for p in presses(kept, dare_exports[kept], cosre_exports[kept])]
    rows = []
    for press in settings:
        cfg = copy.deepcopy(base)
        kept = press.pop("kept", None)
        model = press.pop("model", None)  # a stage's export: the model trained to decode under the press
        cfg.press = press
        if model:
            cfg.model.checkpoint = model
        name = press["name"] + (" (fine-tuned)" if press["name"] == "cosre" and model else "")
        label = name + "".join(f" {k}={v}" for k, v in press.items() if k not in ("name", "router_path"))
        cfg.run_name = "bench-" + label.replace(" ", "-").replace(":", "-").replace("=", "")
        row = run_press_eval(cfg, log=lambda *a, **k: None)
        row["label"] = label
        row["short"] = name + (f" kept {kept}" if kept else "")  # the plot's label
        rows.append(row)
        print(f"{label:<48} accuracy {row['accuracy']:.3f}  kv_fraction_peak {row['kv_fraction_peak']:.3f}  "
              f"prefill {row['kv_fraction_prefill']:.3f}  {row['seconds']:.1f}s", flush=True)

    full = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_drop_points"] = 100.0 * (full - row["accuracy"])
    print()
    print(results_table(rows))
    objectives = [("accuracy", "max"), ("kv_fraction_peak", "min")]
    front = pareto_front(rows, objectives)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_front(rows, front, objectives, "short", out.with_suffix(".png"), out.with_suffix(".html"),
               title="maze cot model: accuracy vs peak KV (fraction of full)")
    keep = ("label", "short", "press", "press_settings", "n", "accuracy", "accuracy_drop_points", "kv_fraction_prefill",
            "kv_fraction_peak", "retained_text_prefill", "retained_vision_prefill", "kv_bytes_peak",
            "prefill_ms_per_example", "decode_tokens_per_s", "press_fraction_of_decode", "tokens_per_answer")
    report = {"checkpoint": args.checkpoint, "data": args.data, "sizes": sizes, "rows": rows[0]["n"],
              "dare_exports": {str(k): v for k, v in dare_exports.items()},
              "dare_trained_for": None if args.dare_export else args.dare_kept or "each kept fraction",
              "dare_backbone": None if args.dare_export else args.dare_backbone,
              "dare_train_seconds": train_s,
              "cosre_exports": {str(k): v for k, v in cosre_exports.items()},
              "cosre_train_seconds": cosre_s,
              "results": [{k: r.get(k) for k in keep} for r in rows],
              "pareto_front": [rows[i]["label"] for i in front]}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nPareto front: {', '.join(report['pareto_front'])}")
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.html')}")


if __name__ == "__main__":
    main()
