"""The image share of the peak KV cache (`mmreason.kv.accounting.cache_composition`, `image_share`,
`KVMeter.summary()["image_share_peak"]`): bytes per modality from a press session's per-entry state,
counted exactly on hand-made states, and on tiny-anole drawing images (MVoT's visual thoughts)
under a press that keeps everything and under `mvot_window`, which drops the older drawings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmreason.kv import KVMeter, MvotWindowPress, Press
from mmreason.kv.accounting import cache_composition, image_share
from mmreason.kv.base import LayerState
from mmreason.kv.modality import SHARED, TEXT, VISION, modality_spec
from mmreason.latent.coconut import GenerationSettings, generate
from tests.kv_helpers import batch_of, one_thread, rows, tiny_family  # noqa: F401
from tests.test_kv_generated_images import drawing, drive


def _state(mod: list[list[int]], valid: list[list[bool]], heads: int) -> LayerState:
    m = torch.tensor(mod, dtype=torch.int8)[:, None, :].expand(-1, heads, -1)
    v = torch.tensor(valid)[:, None, :].expand(-1, heads, -1)
    col = torch.arange(m.shape[-1]).expand_as(m)
    return LayerState(col, col.float(), v, m)


def test_composition_counts_real_entries_per_modality_in_bytes_and_the_share_is_vision_over_all():
    heads, dim = 2, 4
    # row 0: pad, text, image, image, slot; row 1: text, text, image, image, image
    state = _state([[TEXT, TEXT, VISION, VISION, SHARED], [TEXT, TEXT, VISION, VISION, VISION]],
                   [[False, True, True, True, True], [True, True, True, True, True]], heads)
    keys = torch.zeros(2, heads, 5, dim)                      # float32 keys
    values = torch.zeros(2, heads, 5, 2 * dim, dtype=torch.float16)  # another dim and dtype: both count
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=keys, values=values)] * 2)
    per_entry = dim * 4 + 2 * dim * 2
    out = cache_composition({0: state, 1: state}, cache)
    assert out == {"text": 3 * heads * per_entry * 2, "vision": 5 * heads * per_entry * 2,
                   "shared": 1 * heads * per_entry * 2}
    assert image_share(out) == pytest.approx(5 / 9)
    assert image_share({"text": 0, "vision": 0, "shared": 0}) is None


@pytest.fixture(scope="module")
def anole():
    fam = tiny_family("tiny-anole")
    batch = {k: v[:2] for k, v in batch_of(fam, rows()).items()}
    ids, _ = drawing(fam, 3, shifts=(0, 4))
    return fam, batch, ids


def test_keep_everything_session_leaves_generation_unchanged(anole):
    fam, batch, _ = anole
    settings = GenerationSettings(max_new_tokens=6)
    ref = generate(fam, batch, 0, settings)
    with Press()(fam) as session, KVMeter(fam.model, session) as meter:
        assert generate(fam, batch, 0, settings) == ref
    assert 0 < meter.summary()["image_share_peak"] < 1


def test_image_share_of_the_peak_with_drawn_images_whole_and_under_mvot_window(anole):
    fam, batch, ids = anole
    spec = modality_spec(fam.model)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1).bool()
    every = torch.cat([batch["input_ids"], ids], dim=1)
    vision = (spec.modality(every).bool() & mask).sum()
    with torch.no_grad(), Press()(fam) as session, KVMeter(fam.model, session) as whole:
        drive(fam, batch, ids)
    # nothing dropped: the peak is the end, and its image share is the image tokens' share of every token
    assert whole.summary()["image_share_peak"] == pytest.approx(float(vision / mask.sum()))
    with torch.no_grad(), MvotWindowPress()(fam) as session, KVMeter(fam.model) as plain:
        drive(fam, batch, ids)
    assert "image_share_peak" not in plain.summary()  # no session handed to the meter: no modality known
    with torch.no_grad(), MvotWindowPress()(fam) as session, KVMeter(fam.model, session) as window:
        drive(fam, batch, ids)
    # three drawn images; at the window's peak the first is gone (the second kept, the third nearly
    # drawn), and with it 64 of the image entries: the share is that of 3 images, not 4
    assert 0 < window.summary()["image_share_peak"] < whole.summary()["image_share_peak"]
