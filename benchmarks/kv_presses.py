"""Accuracy vs KV memory of every press on one trained maze model, side by side at matched budgets.

    python benchmarks/kv_presses.py                                  # the benchmark model (configs/bench)
    python benchmarks/kv_presses.py --checkpoint runs/quickstart/train/quickstart-cot/export \
        --data runs/quickstart/data/gridworld --sizes 3 --rows 100
    python benchmarks/kv_presses.py --model mvot                     # the visual-thought model (below)

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

`--model mvot`: the tiny-anole model of configs/bench/mvot-cpu.yaml, which draws the state after
every step while it reasons (MVoT's visual thoughts, ~66 tokens an image), on mazes and FrozenLake,
evaluated in cot mode with a budget that lets it draw (`MVOT_BUDGET`). Drawn images are most of
its cache, so the presses are set for that (`mvot_presses`): CoSRe training-free compresses every
image, the drawn ones at their `<eoss>`, with a DCT (`mvot_cosre_settings`); DARE evicts images too
(ρ_vis < 1, `mvot_dare_targets`) with a router trained on the frozen model (`MVOT_DARE_RECIPE`:
the dare stage cannot train visual thoughts, so a backbone it trained would stop drawing); MVoT's
own `mvot_window` (prompt images, text, the latest drawn image) once; TOVA and the kvpress
baselines as for the maze model. No fine-tuned CoSRe: the cosre stage trains text replies only
(`visual_thoughts` is refused outside cot / coconut) and its chunked teacher forcing lets tokens
after an `<eoss>` read the image whole. The uncompressed model's `image_share_peak` (image entries'
share of the peak cache) is measured under a press that keeps everything (`--share-rows`). Writes
benchmarks/results/kv_presses_mvot.json (+ .png, .html).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
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
        out.append(dare_press(dare_targets(kept), dare_export))
    return out + kvpress_presses(kept)


def dare_press(targets: tuple[float, float], dare_export: str) -> dict:
    """DARE at (rho_text, rho_vis) with the router and model of a dare stage's export."""
    rho_text, rho_vis = targets
    return {"name": "dare", "rho_text": rho_text, "rho_vis": rho_vis, "layer": 0, "window": DARE_WINDOW,
            "router_path": str(Path(dare_export) / ROUTER_FILE), "model": dare_export}


def kvpress_presses(kept: float) -> list[dict]:
    """The kvpress baselines at compression 1 − kept."""
    # kvpress's SnapKV observation window defaults to 64 queries: a maze prompt is ~70 tokens
    return [{"name": f"kvpress:{m}", "compression_ratio": round(1 - kept, 4), **({"window_size": 16} if m == "snapkv" else {})}
            for m in KVPRESS]


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


MVOT_BUDGET = 800
"""max_new_tokens of the visual-thought model: the longest held-out reply (a 4×4 maze, 10 drawn
images of 66 tokens + text) is ~740 tokens."""
MVOT_IMAGE_SHARE = 0.66
"""Image entries' share of a whole visual-thought row (mazes and FrozenLake 3×3 + 4×4, teacher
forced: prompt 64 image + 86 text tokens, reply 233 image + 65 text on average) — what the
per-modality targets below are sized by; the benchmark measures the generated one (`image_share_peak`)."""
MVOT_DARE_RECIPE = ["dare.backbone=frozen", "dare.masks=gumbel", "dare.router_fit=none", "dare.window=0",
                    "dare.router_context=3", "optim.lr=0.003"]
"""DARE on the visual-thought model: the router alone learns (Gumbel masks + the ratio loss,
Dynamic-LLaVA's recipe; the stage's recent window needs decode masks, so decoding adds its
`DARE_WINDOW` latest entries on top), the model stays as trained — a dare stage trains text replies
only, so a backbone trained there would unlearn drawing (and knockout fitting trains the backbone)."""


@dataclass(frozen=True)
class BenchModel:
    """A benchmarked model and what it is evaluated on (`--model`; each field a flag's default)."""

    checkpoint: str
    data: str
    backbone: str
    tasks: tuple[str, ...]
    sizes: str
    max_new_tokens: int
    out: str
    title: str


MODELS = {
    "maze": BenchModel("runs/bench/train/bench-cot/export", "runs/bench/data/gridworld", "tiny-internvl", ("maze",),
                       "3,4", 128, "benchmarks/results/kv_presses.json", "maze cot model"),
    "mvot": BenchModel("runs/bench-mvot/train/mvot-cot/export", "runs/bench-mvot/data/gridworld", "tiny-anole",
                       ("maze", "frozenlake"), "3,4", MVOT_BUDGET, "benchmarks/results/kv_presses_mvot.json",
                       "MVoT visual-thought model (draws while reasoning)"),
}


def mvot_presses(kept: float, dare_export: str | None) -> list[dict]:
    """The presses on the visual-thought model at one kept fraction (`mvot_window` is added once)."""
    out = [{"name": "tova", "factor": kept, "min_size": 4},
           {"name": "cosre", **mvot_cosre_settings(kept)}]
    if dare_export:
        out.append(dare_press(mvot_dare_targets(kept), dare_export))
    return out + kvpress_presses(kept)


def mvot_cosre_settings(kept: float) -> dict:
    """Training-free CoSRe on the visual-thought model for a kept fraction of the peak cache. An
    image in progress stays whole (~64 entries, a floor) and the DCT acts on the 8 × 8 code grid
    of every finished one. At 0.5: each 4×4 block to its 2×2 lowest frequencies and text untouched
    (a text entry missing breaks these tiny models): an average row's peak ~150 text + 64 being drawn
    + a quarter of ~230 image entries ≈ 0.6 of it, the longest rows (which set a batch's cache) ~0.45.
    Below 0.5 the DCT alone cannot get there (text is ~1/3 of the cache): 1×1 (each block's mean),
    and the text into 8 shared slots, `kept` of it as residual entries, the reply folded every 8
    tokens beyond the latest 8."""
    if kept >= 0.5:
        return {"block": 4, "keep_h": 2, "keep_w": 2}
    return {"block": 4, "keep_h": 1, "keep_w": 1, "slots": 8, "residual_text": round(kept, 4), "residual_vis": 1.0,
            "every": 8, "recent": 8}


def mvot_dare_targets(kept: float) -> tuple[float, float]:
    """DARE's per-modality targets on the visual-thought model: text is kept more (ρ_text =
    min(1, 1.6·kept): 0.5 → 0.8, 0.25 → 0.4) and images take the rest of the budget at
    `MVOT_IMAGE_SHARE` images (ρ_vis = (kept − (1 − share)·ρ_text) / share: 0.35, 0.17)."""
    rho_text = min(1.0, round(1.6 * kept, 4))
    rho_vis = (kept - (1 - MVOT_IMAGE_SHARE) * rho_text) / MVOT_IMAGE_SHARE
    return rho_text, round(min(1.0, max(0.05, rho_vis)), 4)


def press_settings(model: str, kept_fractions: list[float], dare_exports: dict[float, str | None],
                   cosre_exports: dict[float, str | None]) -> list[dict]:
    """Every evaluation of a benchmark run, in order: no press, then each press at each kept
    fraction (`kept` and, for a stage's press, `model`: the export it decodes with)."""
    if model == "mvot":
        return ([{"name": "none"}] + [dict(p, kept=kept) for kept in kept_fractions
                                      for p in mvot_presses(kept, dare_exports[kept])]
                + [{"name": "mvot_window", "latest": 1}])
    return [{"name": "none"}] + [dict(p, kept=kept) for kept in kept_fractions
                                 for p in presses(kept, dare_exports[kept], cosre_exports[kept])]


def eval_config(bench: BenchModel, checkpoint: str, data: str, sizes: list[int], rows: int, max_new_tokens: int,
                work: Path):
    """The evaluation every press shares (configs/eval/press-maze.yaml, set to this model)."""
    return load_config(PressEvalConfig, str(REPO / "configs/eval/press-maze.yaml"), [
        f"model.backbone={bench.backbone}", f"model.checkpoint={checkpoint}", f"data.path={data}",
        f"data.tasks={json.dumps(list(bench.tasks))}", f"data.sizes={json.dumps(sizes)}", f"max_examples={rows}",
        f"generation.max_new_tokens={max_new_tokens}", f"output_dir={work / 'eval'}", "batch_size=25", "threads=2"])


def uncompressed_image_share(cfg: PressEvalConfig, rows: int) -> dict:
    """The image entries' share of the uncompressed model's peak cache, over the first `rows` held-out
    rows: generated under a press that keeps everything (`Press()`: the model's output is unchanged,
    and the session tells image entries from text — `KVMeter`'s `image_share_peak`)."""
    import torch

    from mmreason.eval.press_eval import held_out
    from mmreason.eval.runner import evaluate
    from mmreason.kv import KVMeter, Press
    from mmreason.models import load_backbone

    torch.set_num_threads(cfg.threads or 1)
    family = load_backbone(cfg.model.backbone, cfg.model.checkpoint)
    with torch.no_grad(), Press()(family) as session, KVMeter(family.model, session) as meter:
        result = evaluate(family, held_out(cfg)[:rows], cfg.mode, cfg.generation, batch_size=cfg.batch_size)
    kv = meter.summary()
    return {"rows": result.n, "accuracy": result.accuracy, "image_share_peak": kv["image_share_peak"],
            "kv_bytes_peak": kv["kv_bytes_peak"]}


def run_bench_stage(config: str, name: str, checkpoint: str, data: str, sizes: list[int], out: Path, rows: int,
                    epochs: int, overrides: list[str], bench: BenchModel = MODELS["maze"],
                    max_new_tokens: int | None = None) -> str:
    """One training stage (`configs/train/<config>`) on the benchmark model; returns its export. A
    run name per setting: the same name resumes (or reuses) an earlier run's checkpoints. Its
    evaluation: 50 held-out rows, `max_new_tokens` (default: the model's budget)."""
    from jobs.train import run_stage
    from mmreason.train.config import TrainConfig

    cfg = load_config(TrainConfig, str(REPO / "configs/train" / config), [
        f"init_from={checkpoint}", f"model.backbone={bench.backbone}", f"data.path={data}",
        f"data.tasks={json.dumps(list(bench.tasks))}", f"data.sizes={json.dumps(sizes)}", f"storage={out}",
        f"run_name={name}", f"data.max_train_rows={rows}", f"optim.epochs={epochs}",
        "eval.max_examples=50", f"eval.modes={{cot: {{max_new_tokens: {max_new_tokens or bench.max_new_tokens}}}}}",
        *overrides])
    return run_stage(cfg)["export"]


def name_suffix(overrides: list[str]) -> str:
    """What a stage's config overrides add to its run name: `dare.ratio_weight=20` → `-ratio_weight20`,
    `distill=1.0` → `-distill1.0`."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--dare-set / --cosre-set take KEY=VALUE, got {bad}")
    return "".join("-" + key.split(".")[-1] + value for key, value in (o.split("=", 1) for o in overrides))


def train_router(checkpoint: str, data: str, sizes: list[int], out: Path, backbone: str, rows: int,
                 epochs: int, kept: float, overrides: list[str], model: str = "maze",
                 max_new_tokens: int | None = None) -> str:
    """The dare stage on this model (`dare_targets(kept)`, router from layer 0; the visual-thought
    model: `mvot_dare_targets`, `MVOT_DARE_RECIPE`); returns its export, which holds the router
    (and, with `backbone=full`, the model trained to decode under it)."""
    if model == "mvot":
        rho_text, rho_vis = mvot_dare_targets(kept)
        # no "." in a run name: its export is logged as an MLflow model, whose name may not hold one
        name = f"mvot-dare-frozen-k{round(100 * kept)}-r{rows}-e{epochs}-c3gumbel" + name_suffix(overrides).replace(".", "p")
        return run_bench_stage("dare-maze.yaml", name, checkpoint, data, sizes, out, rows, epochs, [
            f"dare.rho_text={rho_text}", f"dare.rho_vis={rho_vis}", "dare.layer=0", *MVOT_DARE_RECIPE, *overrides],
            MODELS["mvot"], max_new_tokens)
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
    parser.add_argument("--model", choices=sorted(MODELS), default="maze",
                        help="which benchmark model: its checkpoint, data, tasks, budget, presses and output "
                             "(mvot: the visual-thought model of configs/bench/mvot-cpu.yaml, which draws)")
    parser.add_argument("--checkpoint", default=None, help="default: the --model's")
    parser.add_argument("--data", default=None, help="default: the --model's")
    parser.add_argument("--sizes", default=None, help="default: 3,4")
    parser.add_argument("--rows", type=int, default=None,
                        help="held-out rows, interleaved over sizes (default 1000: a standard error of 0.7 points at "
                             "95 %%; --model mvot: 200, each row decodes up to 800 tokens)")
    parser.add_argument("--kept", default="0.5,0.25", help="kept fractions of the KV cache")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: 128; {MVOT_BUDGET} for --model mvot (it draws ~66 tokens a step)")
    parser.add_argument("--share-rows", type=int, default=200,
                        help="--model mvot: rows the uncompressed model's image share of the peak cache is measured on")
    parser.add_argument("--dare-export", default=None, help="a dare stage's export (default: train one here)")
    parser.add_argument("--dare-backbone", choices=("frozen", "full"), default="full",
                        help="the dare stage trains the router only, or the model with it (DARE's way; "
                             "--model mvot: always frozen, see MVOT_DARE_RECIPE)")
    parser.add_argument("--dare-rows", type=int, default=None,
                        help="training rows of the dare stage (per epoch; default 16000, --model mvot 2000)")
    parser.add_argument("--dare-epochs", type=int, default=None, help="default 5; --model mvot 1 (the router only)")
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
    parser.add_argument("--out", default=None, help="default: the --model's (benchmarks/results/kv_presses[_mvot].json)")
    args = parser.parse_args()
    bench = MODELS[args.model]
    mvot = args.model == "mvot"
    checkpoint = args.checkpoint or bench.checkpoint
    data = args.data or bench.data
    sizes = [int(s) for s in (args.sizes or bench.sizes).split(",")]
    max_new_tokens = args.max_new_tokens or bench.max_new_tokens
    n_rows = args.rows or (200 if mvot else 1000)
    dare_rows = args.dare_rows or (2000 if mvot else 16000)
    dare_epochs = args.dare_epochs or (1 if mvot else 5)
    work = Path(checkpoint).resolve().parents[2] / "kv_presses" if mvot else Path("runs/bench/kv_presses")
    if mvot and (args.cosre_export or args.cosre_set):
        raise SystemExit("--model mvot: no fine-tuned CoSRe — the cosre stage cannot train visual thoughts "
                         "(see the module docstring); drop --cosre-export / --cosre-set")

    kept_fractions = [float(k) for k in args.kept.split(",")]
    dare_exports: dict[float, str | None] = {kept: None for kept in kept_fractions}
    t0 = time.perf_counter()
    if not args.no_dare:
        trained: dict[float, str] = {}  # by the fraction trained for: --dare-kept trains one stage for all
        for kept in kept_fractions:
            target = args.dare_kept or kept
            if not args.dare_export and target not in trained:
                trained[target] = train_router(str(Path(checkpoint).resolve()), data, sizes, work / "train",
                                               args.dare_backbone, dare_rows, dare_epochs, target,
                                               args.dare_set, args.model, max_new_tokens)
            dare_exports[kept] = args.dare_export or trained[target]
    train_s = time.perf_counter() - t0
    cosre_exports: dict[float, str | None] = {kept: None for kept in kept_fractions}
    if not args.no_cosre_stage and not mvot:
        for kept in kept_fractions:
            cosre_exports[kept] = args.cosre_export or train_cosre(
                str(Path(checkpoint).resolve()), data, sizes, work / "train", args.cosre_rows,
                args.cosre_epochs, kept, args.cosre_set)
    cosre_s = time.perf_counter() - t0 - train_s

    base = eval_config(bench, checkpoint, data, sizes, n_rows, max_new_tokens, work)
    rows = []
    for press in press_settings(args.model, kept_fractions, dare_exports, cosre_exports):
        cfg = copy.deepcopy(base)
        kept = press.pop("kept", None)
        model = press.pop("model", None)  # a stage's export: the model trained to decode under the press
        cfg.press = press
        if model:
            cfg.model.checkpoint = model
        name = press["name"] + (" (fine-tuned)" if press["name"] == "cosre" and model else "")
        label = name + "".join(f" {k}={v}" for k, v in press.items() if k not in ("name", "router_path"))
        cfg.run_name = ("mvot-" if mvot else "bench-") + label.replace(" ", "-").replace(":", "-").replace("=", "")
        row = run_press_eval(cfg, log=lambda *a, **k: None)
        row["label"] = label
        row["short"] = name + (f" kept {kept}" if kept else "")  # the plot's label
        rows.append(row)
        share = row.get("image_share_peak")
        print(f"{label:<48} accuracy {row['accuracy']:.3f}  kv_fraction_peak {row['kv_fraction_peak']:.3f}  "
              f"prefill {row['kv_fraction_prefill']:.3f}" + (f"  image share {share:.3f}" if share is not None else "")
              + f"  {row['seconds']:.1f}s", flush=True)
    uncompressed = None
    if mvot:  # no press, no session: the none row cannot tell image entries from text (see KVMeter)
        uncompressed = uncompressed_image_share(copy.deepcopy(base), min(args.share_rows, n_rows))
        print(f"uncompressed model: image entries are {uncompressed['image_share_peak']:.3f} of the peak cache "
              f"({uncompressed['rows']} rows)")

    full = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_drop_points"] = 100.0 * (full - row["accuracy"])
    print()
    print(results_table(rows))
    objectives = [("accuracy", "max"), ("kv_fraction_peak", "min")]
    front = pareto_front(rows, objectives)
    out = Path(args.out or REPO / bench.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_front(rows, front, objectives, "short", out.with_suffix(".png"), out.with_suffix(".html"),
               title=f"{bench.title}: accuracy vs peak KV (fraction of full)")
    keep = ("label", "short", "press", "press_settings", "n", "accuracy", "accuracy_drop_points", "kv_fraction_prefill",
            "kv_fraction_peak", "image_share_peak", "retained_text_prefill", "retained_vision_prefill",
            "retained_vision_final", "kv_bytes_peak", "prefill_ms_per_example", "decode_tokens_per_s",
            "press_fraction_of_decode", "tokens_per_answer")
    report = {"model": args.model, "checkpoint": checkpoint, "data": data, "tasks": list(bench.tasks), "sizes": sizes,
              "rows": rows[0]["n"], "max_new_tokens": max_new_tokens,
              "dare_exports": {str(k): v for k, v in dare_exports.items()},
              "dare_trained_for": None if args.dare_export else args.dare_kept or "each kept fraction",
              "dare_backbone": None if args.dare_export else "frozen" if mvot else args.dare_backbone,
              "dare_train_seconds": train_s,
              "cosre_exports": {str(k): v for k, v in cosre_exports.items()},
              "cosre_train_seconds": cosre_s,
              **({"cosre_stage": "not run: the cosre stage cannot train visual thoughts", "uncompressed": uncompressed}
                 if mvot else {}),
              "results": [{k: r.get(k) for k in keep} for r in rows],
              "pareto_front": [rows[i]["label"] for i in front]}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nPareto front: {', '.join(report['pareto_front'])}")
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.html')}")


if __name__ == "__main__":
    main()
