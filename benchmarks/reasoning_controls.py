"""Can the benchmark tell reasoning apart? CoCoNuT beside its controls on blocked mazes (issue 25).

On mazes whose moves are all legal the end cell is the start plus the sum of the moves, and a model
with no thoughts scores like CoCoNuT. Here 30 % of the attempted moves hit a wall and stay
(`tasks.maze.blocked: 0.3`), and the plain sum never lands on the answer, so the walls in the
picture must be followed. Rows, each trained from the shared cot export of
`configs/bench/maze-blocked-cot.yaml` with `configs/bench/maze-blocked-coconut.yaml`:

- `cot` / `vanilla`: the cot model writing its chain / answering at once (the cot config's stage);
- `coconut`: our curriculum (the last move stays written, `keep_last_steps: 1`), latent thoughts;
- `pause`: the same curriculum, each thought one learned token (`coconut.thought=pause`);
- `none`: the same curriculum, the replaced steps removed, nothing in their place (`coconut.thought=none`);
- `reference`: CoCoNuT's own curriculum (`coconut.keep_last_steps=0`), latent thoughts.

Accuracy on the test split (per-epoch selection reads val), overall and per grid size, tokens written
per answer, latent thoughts; and an out-of-distribution column: the same exports on 5×5 mazes,
which no row trained on.

    mmreason quickstart configs/bench/maze-blocked-cot.yaml          # data + the cot row (≤ 60 min)
    python benchmarks/reasoning_controls.py run coconut pause none reference [--seed 1]
    python benchmarks/reasoning_controls.py run cot --seed 1          # a second cot seed (and its rows)
    python benchmarks/reasoning_controls.py table                     # benchmarks/results/reasoning_controls.json

A row whose run already has an export and results is not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.config import load_config  # noqa: E402

COT_CONFIG = REPO / "configs/bench/maze-blocked-cot.yaml"
COCONUT_CONFIG = REPO / "configs/bench/maze-blocked-coconut.yaml"
CONTROLS = {
    "coconut": [],
    "pause": ["coconut.thought=pause"],
    "none": ["coconut.thought=none"],
    "reference": ["coconut.keep_last_steps=0"],
}
"""Rows trained from the cot export: overrides of the coconut config."""
OOD_SIZES = [5]
TARGETS = {"cot_accuracy": 0.85, "coconut_gap_to_cot": 0.05, "coconut_token_share": 1 / 3,
           "coconut_over_controls": 0.05}


def run_name(row: str, seed: int) -> str:
    return f"blocked-{row}" + (f"-s{seed}" if seed else "")


def cot_stage(root: str, seed: int):
    from jobs.quickstart import QuickstartConfig

    cfg = load_config(QuickstartConfig, COT_CONFIG, [f"root={root}"])
    cfg.place()
    stage = cfg.cot
    stage.seed = seed
    stage.run_name = run_name("cot", seed)
    return cfg, stage


def control_stage(root: str, row: str, seed: int):
    from mmreason.train.config import TrainConfig

    cot_run = Path(root) / "train" / run_name("cot", seed)
    return load_config(TrainConfig, COCONUT_CONFIG, [
        f"storage={Path(root) / 'train'}", f"data.path={Path(root) / 'data/gridworld'}",
        f"init_from={cot_run / 'export'}", f"run_name={run_name(row, seed)}", f"seed={seed}", *CONTROLS[row]])


def done(run_dir: Path) -> bool:
    return (run_dir / "export" / "config.json").exists() and (run_dir / "eval" / "results.json").exists()


def run(rows: list[str], root: str, seed: int) -> None:
    from jobs.train import run_stage
    from pipelines import gridworld

    for row in rows:
        if row == "cot":
            data, stage = cot_stage(root, seed)
            gridworld.run(data.data)  # shards already rendered are skipped
        else:
            stage = control_stage(root, row, seed)
            if not done(Path(stage.init_from).parent):
                raise SystemExit(f"{row}: no cot export at {stage.init_from}; run the cot row first "
                                 f"(`mmreason quickstart {COT_CONFIG.relative_to(REPO)}`"
                                 f"{'' if not seed else f' or `run cot --seed {seed}`'})")
        if done(Path(stage.run_location)):
            print(f"{row} (seed {seed}): {stage.run_location} is done, kept")
            continue
        out = run_stage(stage)
        print(f"{row} (seed {seed}): {json.dumps(out['eval'])}")


def ood(stage, run_dir: Path, mode: str) -> dict[str, Any]:
    """The export on the out-of-distribution sizes' test rows (cached next to its eval)."""
    cache = run_dir / "eval" / f"ood-{mode}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from jobs.train import evaluate_export

    stage.data.sizes = OOD_SIZES
    stage.eval.modes = {mode: stage.eval.modes[mode]}
    if mode != "vanilla":  # 5×5 walks are longer; a vanilla reply is the answer alone
        stage.eval.modes[mode].max_new_tokens = max(stage.eval.modes[mode].max_new_tokens, 240)
    results, _ = evaluate_export(stage, run_dir / "export")
    cache.write_text(json.dumps(results[mode], indent=2))
    return results[mode]


def table(root: str, out: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    entries = []
    for seed in sorted({int(p.name.rsplit("-s", 1)[1]) if "-s" in p.name else 0
                        for p in (Path(root) / "train").glob("blocked-cot*")}):
        for row, mode in [("cot", "cot"), ("cot", "vanilla"), *[(r, "coconut") for r in CONTROLS]]:
            stage = cot_stage(root, seed)[1] if row == "cot" else control_stage(root, row, seed)
            run_dir = Path(stage.run_location)
            if not done(run_dir):
                continue
            res = json.loads((run_dir / "eval" / "results.json").read_text())[mode]
            far = ood(stage, run_dir, mode)
            entries.append({"row": "vanilla" if mode == "vanilla" else row, "seed": seed, "mode": mode,
                            "run": str(run_dir), "accuracy": res["accuracy"], "by_size": res["accuracy_by_size"],
                            "tokens_per_answer": res["tokens_per_answer"], "latents": res["latents_per_answer"],
                            "n": res["n"], "ood_5x5_accuracy": far["accuracy"], "ood_n": far["n"],
                            "ood_tokens_per_answer": far["tokens_per_answer"]})

    def mean(row: str, key: str) -> float | None:
        vals = [e[key] for e in entries if e["row"] == row]
        return statistics.mean(vals) if vals else None

    checks: dict[str, Any] = {}
    cot, coco = mean("cot", "accuracy"), mean("coconut", "accuracy")
    if cot is not None:
        checks["cot_accuracy"] = {"value": cot, "target": f">= {TARGETS['cot_accuracy']}",
                                  "met": cot >= TARGETS["cot_accuracy"]}
    if cot is not None and coco is not None:
        share = (mean("coconut", "tokens_per_answer") + mean("coconut", "latents")) / mean("cot", "tokens_per_answer")
        checks["coconut_vs_cot"] = {"gap": cot - coco, "token_share_with_latents": share,
                                    "target": "gap <= 0.05 at <= 1/3 of cot's tokens",
                                    "met": cot - coco <= TARGETS["coconut_gap_to_cot"]
                                    and share <= TARGETS["coconut_token_share"]}
    for control in ("pause", "none"):
        other = mean(control, "accuracy")
        if coco is not None and other is not None:
            checks[f"coconut_over_{control}"] = {"margin": coco - other, "target": ">= 0.05",
                                                 "met": coco - other >= TARGETS["coconut_over_controls"]}
    paired = paired_tests(entries)
    result = {"data": "blocked mazes (tasks.maze.blocked=0.3), trained on 3x3 + 4x4, test split; OOD: 5x5 test split",
              "selection": "per-epoch evaluation and the best export on val; these numbers: the final export on test",
              "commands": ["mmreason quickstart configs/bench/maze-blocked-cot.yaml",
                           "python benchmarks/reasoning_controls.py run coconut pause none reference [--seed N]",
                           "python benchmarks/reasoning_controls.py table"],
              "rows": entries, "targets": checks, "paired": paired}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'row':<10}{'seed':>5}{'all':>8}{'3x3':>8}{'4x4':>8}{'tokens':>8}{'latents':>8}{'5x5 (OOD)':>11}{'n':>6}")
    for e in entries:
        by = e["by_size"]
        print(f"{e['row']:<10}{e['seed']:>5}{e['accuracy']:>8.3f}{by.get('3', float('nan')):>8.3f}"
              f"{by.get('4', float('nan')):>8.3f}{e['tokens_per_answer']:>8.1f}{e['latents']:>8}"
              f"{e['ood_5x5_accuracy']:>11.3f}{e['n']:>6}")
    for name, check in checks.items():
        print(f"{name}: {check}")
    for name, test in paired.items():
        print(f"{name}: {test}")
    print(f"wrote {out}")
    return result


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the discordant pairs as a fair coin's flips."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_tests(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """CoCoNuT against each control on the same test mazes, per seed and pooled: the mazes only
    CoCoNuT gets right, those only the control gets right, and the exact McNemar p-value."""
    def correct(entry: dict[str, Any]) -> dict[str, bool]:
        lines = (Path(entry["run"]) / "eval" / f"predictions-{entry['mode']}.jsonl").read_text().splitlines()
        return {p["id"]: p["correct"] for p in map(json.loads, lines)}

    by = {(e["row"], e["seed"]): e for e in entries}
    out: dict[str, Any] = {}
    for control in ("pause", "none"):
        seeds, pooled = {}, [0, 0]
        for (row, seed), entry in sorted(by.items()):
            if row != "coconut" or (control, seed) not in by:
                continue
            a, b = correct(entry), correct(by[(control, seed)])
            only_a = sum(a[i] and not b[i] for i in a.keys() & b.keys())
            only_b = sum(b[i] and not a[i] for i in a.keys() & b.keys())
            seeds[seed] = {"coconut_only": only_a, f"{control}_only": only_b, "p": mcnemar_p(only_a, only_b)}
            pooled[0], pooled[1] = pooled[0] + only_a, pooled[1] + only_b
        if seeds:
            out[f"coconut_vs_{control}"] = {"per_seed": seeds, "pooled": {
                "coconut_only": pooled[0], f"{control}_only": pooled[1], "p": mcnemar_p(*pooled)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="train rows (cot, or controls from the cot export of the same seed)")
    run_p.add_argument("rows", nargs="+", choices=["cot", *CONTROLS])
    run_p.add_argument("--seed", type=int, default=0)
    table_p = sub.add_parser("table", help="collect every finished row (+ its 5x5 OOD evaluation) into one table")
    table_p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/reasoning_controls.json")
    for p in (run_p, table_p):
        p.add_argument("--root", default="runs/bench-blocked", help="the cot config's root")
    args = parser.parse_args()
    from mmreason.storage import is_remote

    if is_remote(args.root):  # the table reads and caches results as local files
        parser.error(f"--root {args.root}: a local folder (copy the runs down first, e.g. aws s3 sync)")
    if args.command == "run":
        run(args.rows, args.root, args.seed)
    else:
        table(args.root, args.out)


if __name__ == "__main__":
    main()
