"""Grid-world rendering throughput: examples/s per core for 4×4 mazes at 64 px with step images,
through the real Ray Data job with 1 and with 2 Ray CPUs, plus the same generator in a plain
process (no Ray) as the ceiling. Runs alternate (1, 2, 1, 2, …) so machine noise hits both alike;
the report gives medians and the 2-vs-1 ratio.

    python benchmarks/gridworld.py [--examples 12000] [--repeats 3] [--out benchmarks/results/gridworld.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = ["tasks={maze: {sizes: [4]}}", "image_size=64", "step_images=true", "rows_per_shard=500"]


def run_ray_job(num_cpus: int, examples: int) -> dict:
    """In a fresh process: start Ray with `num_cpus`, then time the gridworld job alone."""
    from mmreason.config import load_config
    from mmreason.data.gridworld import GridworldConfig
    from pipelines import gridworld, init_ray

    init_ray(num_cpus=num_cpus)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(GridworldConfig, None, [f"output_dir={out}", f"examples={examples}", *CONFIG])
        t0 = time.perf_counter()
        manifest = gridworld.run(cfg, log=lambda *_: None)
        seconds = time.perf_counter() - t0
    assert manifest["total_rows"] == examples, manifest["total_rows"]
    return {"num_cpus": num_cpus, "examples": examples, "seconds": seconds, "examples_per_s": examples / seconds,
            "examples_per_s_per_core": examples / seconds / num_cpus}


def run_plain(examples: int) -> dict:
    """The same rows generated in this process, no Ray, no Parquet: the per-core ceiling."""
    from mmreason.config import load_config
    from mmreason.data.gridworld import GridworldConfig, build_shard, plan_shards

    cfg = load_config(GridworldConfig, None, [f"examples={examples}", *CONFIG])
    t0 = time.perf_counter()
    n = sum(len(build_shard(cfg, spec)[0]) for spec in plan_shards(cfg))
    seconds = time.perf_counter() - t0
    return {"num_cpus": 1, "examples": n, "seconds": seconds, "examples_per_s": n / seconds,
            "examples_per_s_per_core": n / seconds}


def child(mode: str, examples: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--examples", str(examples)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gridworld.json"))
    parser.add_argument("--child", choices=["ray1", "ray2", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_plain(args.examples) if args.child == "plain" else run_ray_job(int(args.child[-1]), args.examples)
        print(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {"plain": [], "ray1": [], "ray2": []}
    for r in range(args.repeats):
        for mode in ("plain", "ray1", "ray2") if r % 2 == 0 else ("ray2", "ray1", "plain"):
            runs[mode].append(child(mode, args.examples))
            print(f"repeat {r} {mode}: {runs[mode][-1]['examples_per_s']:.0f} examples/s", flush=True)
    med = {m: statistics.median(x["examples_per_s"] for x in rs) for m, rs in runs.items()}
    report = {
        "benchmark": "gridworld maze 4x4, 64 px, step images",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "examples_per_run": args.examples,
        "median_examples_per_s": med,
        "median_examples_per_s_per_core": {"plain": med["plain"], "ray1": med["ray1"], "ray2": med["ray2"] / 2},
        "speedup_2_vs_1_cpus": med["ray2"] / med["ray1"],
        "ray1_vs_plain": med["ray1"] / med["plain"],
        "targets": {"examples_per_s_per_core": 100, "speedup_2_vs_1_cpus": 1.7},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'':<8}{'examples/s':>12}{'per core':>10}")
    for m, cpus in (("plain", 1), ("ray1", 1), ("ray2", 2)):
        print(f"{m:<8}{med[m]:>12.0f}{med[m] / cpus:>10.0f}")
    print(f"2 vs 1 Ray CPUs: {report['speedup_2_vs_1_cpus']:.2f}x   Ray(1 CPU) vs plain: {report['ray1_vs_plain']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
