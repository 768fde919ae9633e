"""Frame sampling speed: 16 frames from a 2-minute 360p H.264 clip, taken by the seeking sampler
(`mmreason.data.video.sample_frames`) vs decoding every frame and keeping the same 16, side by side
in one process, runs alternating so machine noise hits both alike. Both must return byte-identical
frames. Also timed: the keyframe-only mode (`exact=false`), and the same at a wider keyframe
spacing, since seeking saves what lies between keyframes. Target: seeking >= 5x faster.

    python benchmarks/frames.py [--repeats 5] [--gops 2,5] [--out benchmarks/results/frames.json]

frames/s per core = frames delivered per CPU-second of this process (decoding runs single-threaded
here; CPU time counts every thread, so the figure is per core either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.data.video import FrameSampling, by_full_decode, sample_frames, write_synthetic_clip  # noqa: E402

SECONDS, FPS, SIZE, NUM_FRAMES = 120, 24, (640, 360), 16


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_clip(path: Path, repeats: int) -> dict:
    cfg = FrameSampling(num_frames=NUM_FRAMES)
    ways = {
        "seek": lambda: sample_frames(path, cfg),
        "full_decode": lambda: sample_frames(path, cfg, pick=by_full_decode),
        "keyframes_only": lambda: sample_frames(path, FrameSampling(num_frames=NUM_FRAMES, exact=False)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    outputs = {}
    for r in range(repeats):
        for name in ways if r % 2 == 0 else reversed(list(ways)):
            clip, wall, cpu = timed(ways[name])
            outputs[name] = clip
            runs[name].append({"wall_s": wall, "cpu_s": cpu})
    assert outputs["seek"].frames == outputs["full_decode"].frames, "seeking must return the full decode's frames"
    assert outputs["seek"].times == outputs["full_decode"].times
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s")} for name, rs in runs.items()}
    total_frames = SECONDS * FPS
    return {
        "median": med,
        "speedup_seek_vs_full_wall": med["full_decode"]["wall_s"] / med["seek"]["wall_s"],
        "speedup_seek_vs_full_cpu": med["full_decode"]["cpu_s"] / med["seek"]["cpu_s"],
        "speedup_keyframes_vs_full_wall": med["full_decode"]["wall_s"] / med["keyframes_only"]["wall_s"],
        "sampled_frames_per_s_per_core": {n: NUM_FRAMES / m["cpu_s"] for n, m in med.items()},
        "full_decode_decoded_frames_per_s_per_core": total_frames / med["full_decode"]["cpu_s"],
        "keyframes_only_max_time_error_s": max(abs(a - b) for a, b in zip(outputs["keyframes_only"].times,
                                                                           outputs["seek"].times)),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gops", default="2,5", help="keyframe spacings in seconds, the first is the headline")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/frames.json"))
    args = parser.parse_args()
    gops = [float(g) for g in args.gops.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for gop in gops:
            t0 = time.perf_counter()
            clip = write_synthetic_clip(Path(tmp) / f"clip-gop{gop}.mp4", SECONDS, fps=FPS, size=SIZE, scenes=6,
                                        gop_s=gop)
            print(f"clip: {SECONDS}s {SIZE[0]}x{SIZE[1]} {FPS} fps, keyframe every {gop:g}s, "
                  f"{clip.stat().st_size / 1e6:.1f} MB, made in {time.perf_counter() - t0:.0f}s", flush=True)
            results[f"gop_{gop:g}s"] = {"bytes": clip.stat().st_size, **bench_clip(clip, args.repeats)}

    print(f"\n{'keyframes':>10} {'way':>15} {'wall s':>8} {'cpu s':>8} {'frames/s/core':>14} {'vs full':>8}")
    for key, res in results.items():
        for name, m in res["median"].items():
            ratio = res["median"]["full_decode"]["wall_s"] / m["wall_s"]
            print(f"{key:>10} {name:>15} {m['wall_s']:8.3f} {m['cpu_s']:8.3f} "
                  f"{res['sampled_frames_per_s_per_core'][name]:14.1f} {ratio:7.1f}x")
        decoded = res["full_decode_decoded_frames_per_s_per_core"]
        print(f"{key:>10} full decode: {decoded:.0f} decoded frames/s per core")
    head = results[f"gop_{gops[0]:g}s"]
    print(f"\nseek vs full decode ({gops[0]:g}s keyframes): {head['speedup_seek_vs_full_wall']:.1f}x wall, "
          f"{head['speedup_seek_vs_full_cpu']:.1f}x CPU (target >= 5x)")
    report = {
        "benchmark": f"{NUM_FRAMES} frames from a {SECONDS}s {SIZE[0]}x{SIZE[1]} {FPS} fps H.264 clip (B-frames, "
                     f"veryfast), JPEG at max_side 448: seeking sampler vs decoding every frame",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "headline_keyframe_spacing_s": gops[0],
        "speedup_seek_vs_full_wall": head["speedup_seek_vs_full_wall"],
        "target_speedup": 5.0,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
