"""CoCoNuT generation: batched with a KV cache (mmreason) vs the reference algorithm (batch 1, no
cache), side by side on the same tiny backbone and the same held-out rows, with a check that both
produce the same tokens. Reports answers/s and the speed-up per batch size.

    python benchmarks/coconut_generate.py [--rows 32] [--latents 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.latent.coconut import GenerationSettings, generate, generate_uncached  # noqa: E402
from mmreason.models import build_tiny, load_backbone  # noqa: E402
from mmreason.tasks import TASKS, RenderOptions, generate_example  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--latents", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/coconut_generate.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        family = load_backbone("tiny-internvl", build_tiny("tiny-internvl", Path(tmp) / "m"))
    # random tiny weights emit one token forever; spread them so rows differ and stop at eos rarely,
    # which makes every answer run the full token budget (the worst case for the uncached reference)
    with torch.no_grad():
        for p in family.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    family.model.eval()
    rows = [generate_example(TASKS["maze"], 3, "test", i, 0, {"train": .8, "val": .1, "test": .1},
                             RenderOptions(step_images=False)) for i in range(args.rows)]
    items = [family.encode(r, "latent", args.latents, 1, with_target=False) for r in rows]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

    t0 = time.perf_counter()
    reference = [generate_uncached(family, family.collate([it], pad_side="left"), args.latents, args.max_new_tokens)
                 for it in items]
    ref_s = time.perf_counter() - t0
    report = {"rows": args.rows, "latents": args.latents, "max_new_tokens": args.max_new_tokens,
              "reference_batch1_uncached": {"seconds": ref_s, "answers_per_s": args.rows / ref_s},
              "batched_cached": {}}
    print(f"reference (batch 1, no cache): {args.rows / ref_s:8.2f} answers/s")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(items), bs):
            out += generate(family, family.collate(items[i : i + bs], pad_side="left"), args.latents, settings)
        seconds = time.perf_counter() - t0
        same = out == reference
        report["batched_cached"][bs] = {"seconds": seconds, "answers_per_s": args.rows / seconds,
                                        "speedup_vs_reference": ref_s / seconds, "same_tokens": same}
        print(f"batched + cache, batch {bs:>3}: {args.rows / seconds:8.2f} answers/s   "
              f"{ref_s / seconds:6.1f}x   same tokens: {same}")
    report["tokens_per_answer"] = sum(map(len, reference)) / len(reference)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
