"""The visual-thought benchmark's models beside their controls (issue 26 item 3): what each cot export
of `configs/bench/mvot-cpu.yaml` (and its text-only control) scores on the test rows it was evaluated
on, against the majority answer's rate per task, and whether it reads the image at all — the first
line of a reply transcribes the layout ("The agent starts at cell 0. The goal is at cell 8. …" /
"Start 0. A 7. …"), so its first three sentences are compared with the row's own first step —
and whether it reasons: each later line of the reply (its drawings left out) against the row's step
at that place, the move alone ("Go down") and the whole line (move, cell reached, letter passed).
Each task's accuracy comes with the exact one-sided binomial p-value of scoring that many or more
by always giving the majority answer (`p_vs_majority`).

    mmreason quickstart configs/bench/mvot-cpu.yaml root=ROOT                        # mvot-cot
    mmreason quickstart configs/bench/mvot-cpu.yaml root=ROOT cot.visual_thoughts.enabled=false \\
        cot.run_name=mvot-cot-text                                                   # the control
    python benchmarks/mvot_models.py --root ROOT mvot-cot mvot-cot-text [...]        # → benchmarks/results/mvot_models.json
    python benchmarks/kv_presses.py --model mvot --checkpoint ROOT/train/mvot-cot/export --data ROOT/data/gridworld
    python benchmarks/mvot_models.py --root ROOT --press-eval ROOT/kv_presses/eval   # → mvot_press_chains.json

The second form scores every press evaluation of kv_presses.py the same way: what each press keeps
of the model's reading and step-by-step reasoning, beside its accuracy and KV fraction.

Reads `ROOT/train/RUN/eval/{results.json,predictions-cot.jsonl}` (or each press's
`RUN/{result.json,predictions.jsonl}`) and the test rows of `ROOT/data/gridworld`; trains nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.data import read_table  # noqa: E402

TRANSCRIPTION = ("start", "second", "third")  # the first three sentences of the first step
DRAWING = re.compile(r"<racm3:break>.*?<eoss>", re.S)


def p_at_least(k: int, n: int, rate: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, rate): how often the majority answer scores k of n or more."""
    return min(1.0, sum(math.comb(n, i) * rate ** i * (1 - rate) ** (n - i) for i in range(k, n + 1)))


def reasoning_lines(output: str, steps: list[str]) -> tuple[int, int, int]:
    """(moves right, lines right, lines compared): the reply's lines after the transcription, its
    drawings left out, against the row's steps at the same places."""
    lines = [line.strip() for line in DRAWING.sub("", output).split("\n") if line.strip()]
    pairs = list(zip(lines[1:], steps[1:]))
    moves = sum(got.split()[:2] == want.split()[:2] for got, want in pairs)
    return moves, sum(got == want for got, want in pairs), len(steps) - 1


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s", text) if s.strip()]


def chain_scores(preds: list[dict[str, Any]], gold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task: accuracy against the majority answer; over all replies: transcription sentences and
    later lines (move / whole line) right — what `summarise` and `summarise_presses` report."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, Counter] = defaultdict(Counter)
    read_right, reasoned = Counter(), Counter()
    for p in preds:
        row = gold[p["id"]]
        by_task[p["task"]].append(bool(p["correct"]))
        answers[p["task"]][row["answer"]] += 1
        want, got = sentences(row["steps"][0]), sentences(p["output"].split("\n")[0])
        for k, name in enumerate(TRANSCRIPTION[: len(want)]):
            read_right[name] += int(k < len(got) and got[k] == want[k])
        moves, lines, of = reasoning_lines(p["output"], row["steps"])
        reasoned.update(moves=moves, lines=lines, of=of)
    return {
        "by_task": {t: task_summary(v, answers[t]) for t, v in sorted(by_task.items())},
        "transcription_right": {name: read_right[name] for name in TRANSCRIPTION},
        "steps_right": {"moves": reasoned["moves"], "lines": reasoned["lines"], "of": reasoned["of"]},
    }


def summarise(root: Path, run: str, gold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    eval_dir = root / "train" / run / "eval"
    results = json.loads((eval_dir / "results.json").read_text())["cot"]
    preds = [json.loads(line) for line in (eval_dir / "predictions-cot.jsonl").read_text().splitlines()]
    return {
        "run": run, "n": len(preds), "accuracy": results["accuracy"],
        "tokens_per_answer": results["tokens_per_answer"], "kv_bytes_peak": results["kv_bytes_peak"],
        **chain_scores(preds, gold), "checkpoint": str(root / "train" / run / "export"),
    }


def summarise_presses(press_eval_dir: Path, gold: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`chain_scores` of every press evaluation `benchmarks/kv_presses.py --model mvot` left under
    `press_eval_dir` (its `kv_presses/eval`: RUN/result.json + predictions.jsonl): how much of the
    model's reading and step-by-step reasoning each press keeps, beside its accuracy and KV."""
    out = []
    for result_file in sorted(press_eval_dir.glob("*/result.json")):
        result = json.loads(result_file.read_text())
        row = result["row"]
        preds = [json.loads(line) for line in (result_file.parent / "predictions.jsonl").read_text().splitlines()]
        out.append({"run": result_file.parent.name, "press": row["press"], "press_settings": row["press_settings"],
                    "n": len(preds), "accuracy": row["accuracy"], "kv_fraction_peak": row.get("kv_fraction_peak"),
                    **chain_scores(preds, gold)})
    return out


def task_summary(correct: list[bool], answers: Counter) -> dict[str, Any]:
    majority = max(answers.values()) / sum(answers.values())
    return {"n": len(correct), "accuracy": sum(correct) / len(correct), "majority_answer_rate": majority,
            "p_vs_majority": p_at_least(sum(correct), len(correct), majority)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="cot run names under ROOT/train")
    parser.add_argument("--root", default="runs/bench-mvot")
    parser.add_argument("--press-eval", default=None, metavar="DIR",
                        help="instead: the press evaluations of kv_presses.py --model mvot (ROOT/kv_presses/eval)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/mvot_models.json "
                                                    "(--press-eval: mvot_press_chains.json)")
    args = parser.parse_args()
    if bool(args.runs) == bool(args.press_eval):
        parser.error("give cot run names or --press-eval DIR (one of the two)")
    root = Path(args.root)
    test = read_table(root / "data" / "gridworld", split="test", columns=["id", "steps", "answer"]).to_pylist()
    gold = {row["id"]: row for row in test}
    if args.press_eval:
        rows = summarise_presses(Path(args.press_eval), gold)
        if not rows:
            raise SystemExit(f"--press-eval {args.press_eval}: no RUN/result.json under it")
        print(f"{'press evaluation':<52}{'acc':>7}{'kv peak':>9}  start/2nd/3rd read   moves / lines right of")
        for r in rows:
            read = "/".join(str(r["transcription_right"][k]) for k in TRANSCRIPTION)
            steps = r["steps_right"]
            print(f"{r['run']:<52}{r['accuracy']:>7.3f}{r['kv_fraction_peak'] or 0:>9.3f}  "
                  f"{read + ' of ' + str(r['n']):<21}{steps['moves']} / {steps['lines']} of {steps['of']}")
        report = {"root": str(root), "press_eval": str(args.press_eval), "rows": rows}
        out = Path(args.out or REPO / "benchmarks/results/mvot_press_chains.json")
    else:
        rows = [summarise(root, run, gold) for run in args.runs]
        print(f"{'run':<22}{'acc':>7}{'tokens':>8}{'peak kB':>9}  per task (majority; p)                          "
              f"start/2nd/3rd read   moves / lines right of")
        for r in rows:
            tasks = "  ".join(f"{t} {v['accuracy']:.2f} ({v['majority_answer_rate']:.2f}; {v['p_vs_majority']:.2f})"
                              for t, v in r["by_task"].items())
            read = "/".join(str(r["transcription_right"][k]) for k in TRANSCRIPTION)
            steps = r["steps_right"]
            print(f"{r['run']:<22}{r['accuracy']:>7.3f}{r['tokens_per_answer']:>8.1f}{r['kv_bytes_peak'] / 1000:>9.0f}  "
                  f"{tasks:<48}{read + ' of ' + str(r['n']):<21}{steps['moves']} / {steps['lines']} of {steps['of']}")
        report = {"root": str(root), "rows": rows}
        out = Path(args.out or REPO / "benchmarks/results/mvot_models.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
