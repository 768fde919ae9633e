"""What CoSRe's `base_delta` does to the drawn images of MVoT-style replies: fidelity and bytes.

    python benchmarks/cosre_base_delta.py [--rows 4] [--deltas 0,0.05,0.1,0.25,0.5,1]

tiny-anole (random weights spread as the tests spread them: such a model has no accuracy to lose,
so fidelity to the uncompressed cache stands in for it) reads 3×3 mazes with their step images as
visual thoughts in the reply (`encode(..., visual_thoughts=True)`: each step's text, then its
state drawn as `<racm3:break>` + 64 VQ codes + `<eoss>`). Each reply is teacher-forced one token per
forward (`compressed_forward`, chunk 1), so every drawn image is DCT-compressed at its own end
marker, as in decoding. Per `base_delta`, at block 4, keep 2×2: the relative error of the DCT
entries' pre-RoPE keys and values against base_delta = 0, KL(uncompressed ‖ compressed) of the
next-token distributions over the reply, the reply's NLL, and the cache's bytes (`KVMeter`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.kv import CosrePress, KVMeter  # noqa: E402
from mmreason.kv.cosre import compress_grid  # noqa: E402
from mmreason.kv.training import compressed_forward, distillation  # noqa: E402
from mmreason.models import build_tiny, load_backbone  # noqa: E402
from mmreason.tasks import TASKS, RenderOptions, generate_example  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--deltas", default="0,0.05,0.1,0.25,0.5,1")
    args = parser.parse_args()
    torch.manual_seed(0)
    fam = load_backbone("tiny-anole", build_tiny("tiny-anole", tempfile.mkdtemp(prefix="cosre-delta-")))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in fam.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    fam.model.eval()
    split = {"train": 1.0, "val": 0.0, "test": 0.0}
    opts = RenderOptions(step_images=True, image_size=64)
    rows = [generate_example(TASKS["maze"], 3, "train", i, 0, split, opts) for i in range(args.rows)]
    batch = fam.collate([fam.encode(r, "cot", visual_thoughts=True) for r in rows], align_latents=True)
    drawn = int((batch["labels"] == fam.image_end_id).sum())
    print(f"{args.rows} rows, {drawn} drawn images, {int((batch['labels'] != -100).sum())} reply tokens")

    with torch.no_grad():
        full = CosrePress(block=4, keep_h=4, keep_w=4)  # keeps everything: the uncompressed cache
        with KVMeter(fam.model) as meter:
            nll_full, logits_full = compressed_forward(fam, batch, full, chunk=1)
        bytes_full = meter.summary()["kv_bytes_peak"]
        # the drawn images' grids as the uncompressed cache holds them, pre-RoPE, for the error column
        grids = _drawn_grids(fam, batch)
        ref = [compress_grid(g, 4, 2, 2, 0.0) for g in grids]
        print(f"{'base_delta':>10} {'key/value rel. err':>18} {'KL vs full':>11} {'NLL':>7} {'peak KV B/row':>14}")
        print(f"{'full':>10} {'':>18} {0.0:>11.4f} {float(nll_full):>7.3f} {bytes_full:>14.0f}")
        for delta in (float(d) for d in args.deltas.split(",")):
            press = CosrePress(block=4, keep_h=2, keep_w=2, base_delta=delta)
            with KVMeter(fam.model) as meter:
                nll, logits = compressed_forward(fam, batch, press, chunk=1)
            err = torch.stack([(compress_grid(g, 4, 2, 2, delta) - r).norm() / r.norm() for g, r in zip(grids, ref)])
            kl = distillation(logits, logits_full, batch["labels"])
            print(f"{delta:>10.2f} {float(err.mean()):>18.4f} {float(kl):>11.4f} {float(nll):>7.3f} "
                  f"{meter.summary()['kv_bytes_peak']:>14.0f}")


def _drawn_grids(fam, batch) -> list[torch.Tensor]:
    """Per drawn image and layer, its (H, 8, 8, 2D) grid of [pre-RoPE key, value] in an uncompressed
    forward of the whole batch."""
    from mmreason.kv.rope import Rope
    from mmreason.models.base import position_ids

    mask = batch["attention_mask"]
    pos = position_ids(mask)
    out = fam.model(inputs_embeds=fam.embed(batch), attention_mask=mask, position_ids=pos, use_cache=True)
    rope = Rope(fam.model.get_decoder().rotary_emb)
    ids, side = batch["input_ids"], 8
    grids = []
    for layer in out.past_key_values.layers:
        k_pre = rope.unrotate(layer.keys, pos.float())
        for b, t in (ids == fam.image_end_id).nonzero().tolist():
            if not bool((batch["labels"][b, t] != -100)):
                continue  # a prompt image
            cols = torch.arange(t - side * side, t)
            kv = torch.cat([k_pre[b][:, cols], layer.values[b][:, cols]], dim=-1)
            grids.append(kv.view(kv.shape[0], side, side, -1))
    return grids


if __name__ == "__main__":
    main()
