"""Decode speed under KV-cache presses: tokens/s with a compressed cache vs the full cache, side by side
in one process, and how much of the decode time the press itself takes.

    python benchmarks/kv_decode.py [--prompts 2048,8192] [--new 64] [--batch 4] [--hidden 512] [--layers 4]

The tiny InternVL-class backbone's text model is widened (`--hidden`, `--layers`, 8 query / 2 KV
heads) and given random weights, saved and loaded back through `load_backbone`; the prompt is
`--prompt` text tokens, so per decode step attention reads a cache of that length — the regime
where a smaller cache pays. Each setting generates `--new` tokens greedily (eos never ends a row:
every setting decodes the same number of steps) under the real press hooks and `KVMeter`:
decode tokens/s, speed-up over no press, the press's own seconds (scoring, selecting, gathering)
as a fraction of decode time, and the cache's peak bytes. Settings are run `--repeats` times
interleaved (none, a, b, …, none, a, b, …) and the median taken: these machines are noisy.
Targets (issue 4): ≥ 1.5× decode tokens/s at 25 % of the cache kept; press ≤ 10 % of decode
(the press's seconds in decode steps; a prompt-time press like SnapKV spends its time in prefill).
A smaller cache pays where reading the cache costs more than reading the weights: here from about
8k tokens × 4 rows (at 2k the step is ~weight-bound on this tiny model, and the gain is small).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.kv import DarePress, KVMeter, make_press  # noqa: E402
from mmreason.latent.coconut import GenerationSettings, generate  # noqa: E402
from mmreason.models import build_tiny, load_backbone  # noqa: E402

SETTINGS = [
    ("none", {}),
    ("tova", {"factor": 0.25, "min_size": 16}),
    ("tova", {"factor": 0.5, "min_size": 16}),
    ("dare", {"rho_text": 0.25, "rho_vis": 0.25, "layer": 0}),
    ("kvpress:streaming_llm", {"compression_ratio": 0.75}),
    ("kvpress:snapkv", {"compression_ratio": 0.75, "window_size": 32}),
]


def widened(tmp: Path, hidden: int, layers: int) -> Path:
    """tiny-internvl with a wider, deeper text model and random weights, saved like any checkpoint
    (build_tiny's folder, its model replaced)."""
    from mmreason.models import get_spec

    out = build_tiny("tiny-internvl", tmp / "wide")
    spec = get_spec("tiny-internvl")
    config = spec.family.model_class.config_class.from_pretrained(out)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 4 * hidden, layers
    text.num_attention_heads, text.num_key_value_heads, text.max_position_embeddings = 8, 2, 16384
    text.layer_types = [text.layer_types[0]] * layers
    torch.manual_seed(0)
    spec.family.model_class(config).save_pretrained(out)
    return out


class NeverEnds:
    """The tokenizer with an eos id no token has: random weights would end rows at random steps."""

    eos_token_id = -1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def run_one(family, batch, press_name: str, settings: dict, new_tokens: int) -> dict:
    # random weights, timed: DARE's router is a fresh one (a config would need a trained router_path)
    press = DarePress(**settings) if press_name == "dare" else make_press(press_name, settings)
    gen = GenerationSettings(max_new_tokens=new_tokens)
    applied = press(family) if press else nullcontext()
    with torch.no_grad(), applied as session, KVMeter(family.model, session) as meter:
        t0 = time.perf_counter()
        out = generate(family, batch, 0, gen)
        seconds = time.perf_counter() - t0
    kv = meter.summary()
    tokens = sum(len(o) for o in out)
    stats = session.stats if session is not None else {}
    press_decode = stats.get("press_decode_seconds", 0.0)
    return {"tokens": tokens, "seconds": seconds, "prefill_seconds": kv["prefill_seconds"],
            "decode_seconds": kv["decode_seconds"], "decode_tokens_per_s": tokens / kv["decode_seconds"],
            "press_prefill_seconds": stats.get("press_prefill_seconds", 0.0), "press_decode_seconds": press_decode,
            "press_fraction_of_decode": press_decode / kv["decode_seconds"],
            "kv_fraction_peak": kv["kv_fraction_peak"], "kv_bytes_peak": kv["kv_bytes_peak"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="2048,8192", help="prompt lengths, each run in full")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/kv_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        family = load_backbone("tiny-internvl", widened(Path(tmp), args.hidden, args.layers))
    family.model.eval()
    vocab = len(family.tokenizer)
    family.tokenizer = NeverEnds(family.tokenizer)  # every setting decodes --new steps
    labels = [name + "".join(f" {k}={v}" for k, v in settings.items()) for name, settings in SETTINGS]
    report = {"new_tokens": args.new, "batch": args.batch, "hidden": args.hidden, "layers": args.layers,
              "threads": args.threads, "repeats": args.repeats, "prompts": {}}
    for prompt in [int(p) for p in args.prompts.split(",")]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, vocab, (args.batch, prompt), generator=g)
        ids[:, 0] = family.tokenizer.bos_token_id
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        runs: dict[str, list[dict]] = {}
        run_one(family, batch, "none", {}, 4)  # warm-up
        for rep in range(args.repeats):
            for label, (name, settings) in zip(labels, SETTINGS):
                runs.setdefault(label, []).append(run_one(family, batch, name, settings, args.new))
                r = runs[label][-1]
                print(f"[{prompt} #{rep}] {label:<44} decode {r['decode_tokens_per_s']:8.1f} tok/s  press "
                      f"{r['press_fraction_of_decode']:.1%}  kv_peak {r['kv_fraction_peak']:.3f}", flush=True)

        med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
        base = med[labels[0]]["decode_tokens_per_s"]
        print(f"\n{prompt}-token prompt, batch {args.batch}, {args.new} new tokens (medians of {args.repeats})")
        print(f"{'setting':<44}{'decode tok/s':>13}{'speed-up':>10}{'press/decode':>14}{'kv peak':>9}")
        for label in labels:
            m = med[label]
            m["speedup_vs_none"] = m["decode_tokens_per_s"] / base
            print(f"{label:<44}{m['decode_tokens_per_s']:>13.1f}{m['speedup_vs_none']:>9.2f}×"
                  f"{m['press_fraction_of_decode']:>14.1%}{m['kv_fraction_peak']:>9.3f}")
        print()
        report["prompts"][str(prompt)] = {"median": med, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
