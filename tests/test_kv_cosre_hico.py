"""CoSRe's blockwise DCT codec and shared slots, HiCo's per-frame / per-clip merges, and the RoPE
round trip both rely on."""

from __future__ import annotations

import math

import pytest
import torch

from mmreason.config import ConfigError
from mmreason.kv import CosrePress, HicoPress, make_press
from mmreason.kv.cosre import compress_grid, dct_matrix, quant_steps, reduced_coords
from mmreason.kv.hico import pooling_matrix
from mmreason.kv.modality import SHARED, TEXT, VISION
from mmreason.kv.rope import Rope
from mmreason.latent.coconut import GenerationSettings, generate
from tests.kv_helpers import FAMILIES, batch_of, forced, one_thread, prefill, rows, tiny_family, video_rows  # noqa: F401


@pytest.mark.parametrize("block", [2, 3, 4, 8])
def test_dct_with_every_frequency_kept_and_no_quantisation_reconstructs_within_1e_5(block):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 6, 5)  # (heads…, h, w, channels); 6 is not a multiple of 4 or 8
    y = compress_grid(x, block, block, block, base_delta=0.0)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 1e-5
    tiny = compress_grid(x, block, block, block, base_delta=1e-9)  # delta → 0
    assert (tiny - x).abs().max() < 1e-5


def test_low_frequency_tiles_shrink_the_grid_and_keep_the_tile_means():
    torch.manual_seed(0)
    x = torch.randn(8, 8, 3)
    y = compress_grid(x, block=4, keep_h=2, keep_w=2)
    assert y.shape == (4, 4, 3)
    # DC preserved: each 2×2 output tile has the mean of its 4×4 input tile
    means = x.view(2, 4, 2, 4, 3).mean((1, 3))
    assert torch.allclose(y.view(2, 2, 2, 2, 3).mean((1, 3)), means, atol=1e-6)
    assert torch.allclose(compress_grid(torch.full((8, 8, 1), 3.0), 4, 1, 1), torch.full((2, 2, 1), 3.0))
    rows_, cols_, mass = reduced_coords(8, 8, 4, 2, 2)
    assert rows_.tolist() == [0.5, 2.5, 4.5, 6.5] and mass == 4.0


def test_quantisation_steps_grow_with_frequency_and_coefficients_land_on_them():
    steps = quant_steps(3, 3, 0.5)
    assert steps[0, 0] == 0.5 and steps[2, 2] == 2.5 and bool((steps[1:] > steps[:-1]).all())
    torch.manual_seed(0)
    x = torch.randn(4, 4, 1)
    y = compress_grid(x, 4, 4, 4, base_delta=0.5)
    d = dct_matrix(4)
    coef = torch.einsum("ui,ijc,vj->uvc", d, y.double(), d)[..., 0]
    q = coef / quant_steps(4, 4, 0.5)
    assert torch.allclose(q, q.round(), atol=1e-6)


def test_rope_unrotate_inverts_rotate_for_every_family_including_partial_rotary():
    torch.manual_seed(0)
    for name in FAMILIES:
        fam = tiny_family(name)
        rope = Rope(fam.model.get_decoder().rotary_emb)
        keys = torch.randn(2, 2, 7, fam.model.get_decoder().layers[0].self_attn.head_dim)
        pos = torch.rand(2, 7) * 50
        assert torch.allclose(rope.unrotate(rope.rotate(keys, pos), pos), keys, atol=1e-5)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cosre_identity_settings_rebuild_the_cache_within_1e_5(family_name):
    """keep = block, delta = 0, no slots, full compress path: un-rotate → DCT → re-rotate is the identity."""
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    with torch.no_grad():
        ref = prefill(fam, batch).past_key_values
        with forced(CosrePress(block=4, keep_h=4, keep_w=4))(fam) as session:
            prefill(fam, batch)
            for layer, st in session.states.items():
                keys, values = session.cache.layers[layer].keys, session.cache.layers[layer].values
                for b in range(keys.shape[0]):
                    cols = st.col[b, 0][st.valid[b, 0]]
                    assert torch.allclose(keys[b][:, st.valid[b, 0]], ref.layers[layer].keys[b][:, cols], atol=1e-5)
                    assert torch.allclose(values[b][:, st.valid[b, 0]], ref.layers[layer].values[b][:, cols], atol=1e-5)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_cosre_compresses_each_image_grid_and_slots_fold_what_residuals_do_not_keep(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    spec_grids = None
    with CosrePress(block=4, keep_h=2, keep_w=2)(fam) as session:
        with torch.no_grad():
            prefill(fam, batch)
        spec_grids = session.spec.grids
        st = session.states[0]
        n_vis = ((st.mod[:, 0] == VISION) & st.valid[:, 0]).sum(-1)
        grid_tokens = sum(g.numel() for g in spec_grids)
        extra = session.spec.tokens_per_image - grid_tokens  # Phi-4's separators stay
        assert n_vis.tolist() == [grid_tokens // 4 + extra] * 3
        masses = st.log_mass[(st.mod == VISION) & st.valid].unique()
        assert bool(torch.isin(masses, torch.tensor([0.0, math.log(4.0)])).all())
    settings = GenerationSettings(max_new_tokens=4)
    with CosrePress(block=4, keep_h=2, keep_w=2, slots=4, residual_text=0.5, residual_vis=0.5)(fam) as session:
        generate(fam, batch, 0, settings)
        for st in session.states.values():
            shared = (st.mod[:, 0] == SHARED) & st.valid[:, 0]
            assert bool((shared.sum(-1) <= 4).all()) and bool((shared.sum(-1) > 0).all())
            text = ((st.mod[:, 0] == TEXT) & st.valid[:, 0]).sum(-1)
            seen_text = session.seen_by_mod[:, TEXT]
            assert bool((text < seen_text).all())  # half the prompt's text folded into slots


@pytest.mark.parametrize("family_name", ["tiny-internvl", "tiny-phi4mm"])  # tiny Anole generates image codes
def test_cosre_folds_generated_tokens_into_the_slots_every_few_steps_and_loses_no_mass(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    every, recent, frac = 4, 2, 0.5
    press = CosrePress(block=4, keep_h=4, keep_w=4, slots=4, residual_text=frac, residual_vis=1.0, every=every,
                       recent=recent)
    with press(fam) as session:
        generate(fam, batch, 0, GenerationSettings(max_new_tokens=14))
    width = batch["input_ids"].shape[1]
    fed = session.seen - width  # generated tokens fed back (the last one picked is not)
    assert fed >= 2 * every, "the tiny model stopped early; the test needs two folds"
    # the fold after every `every` fed tokens took those that left the recent window since the last
    # one, and kept round(frac · n) of its n as entries; the rest are still whole
    bounds = [max(0, i * every - recent) for i in range(fed // every + 1)]
    own_generated = sum(math.floor(frac * (b - a) + 0.5) for a, b in zip(bounds, bounds[1:])) + fed - bounds[-1]
    valid_tokens = batch["attention_mask"].sum(-1) + fed
    for layer, st in session.states.items():
        valid, col, mod = st.valid[:, 0], st.col[:, 0], st.mod[:, 0]
        generated = valid & (col >= width) & (mod != SHARED)
        assert generated.sum(-1).tolist() == [own_generated] * 3, layer
        # every token seen is an entry of its own or part of exactly one slot: the masses add up
        mass = st.log_mass[:, 0].exp().masked_fill(~valid, 0).sum(-1)
        assert torch.allclose(mass, valid_tokens.float(), atol=1e-3), (layer, mass, valid_tokens)
        assert bool((((mod == SHARED) & valid).sum(-1) <= 4).all())


def test_cosre_bad_settings_name_the_setting():
    with pytest.raises(ConfigError, match="keep_h"):
        CosrePress(block=4, keep_h=5)
    with pytest.raises(ConfigError, match="residual_vis"):
        make_press("cosre", {"slots": 2, "residual_vis": 0})
    with pytest.raises(ConfigError, match="press.keep"):
        make_press("cosre", {"keep": 2})
    with pytest.raises(ConfigError, match="every=8 folds generated tokens into the shared slots: it needs slots > 0"):
        make_press("cosre", {"every": 8})
    with pytest.raises(ConfigError, match="every and recent must be >= 0"):
        CosrePress(slots=4, every=4, recent=-1)


def test_pooling_matrix_averages_adaptive_regions():
    a = pooling_matrix(4, 4, 2, 2)
    x = torch.arange(16.0, dtype=torch.float64)
    assert (a @ x).tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.allclose(a.sum(-1), torch.ones(4, dtype=a.dtype))


@pytest.mark.parametrize("family_name", ["tiny-internvl", "tiny-anole"])
def test_hico_merges_each_frame_then_each_clip_as_specified(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, video_rows(4))
    with torch.no_grad():
        ref = prefill(fam, batch).past_key_values
        press = HicoPress(tokens_per_frame=4, clip_frames=2)
        with press(fam) as session:
            prefill(fam, batch)
            spec = session.spec
            grid = spec.grids[0]
            side = grid.shape[0]
            pool = pooling_matrix(side, side, 2, 2).float()
            for layer, st in session.states.items():
                values = session.cache.layers[layer].values
                rope = session.rope
                for b in range(values.shape[0]):
                    frames = spec.images(session.prompt_modality[b])
                    assert len(frames) == 4
                    vis = ((st.mod[b, 0] == VISION) & st.valid[b, 0]).nonzero().flatten()
                    assert vis.numel() == 2 * 4  # 2 clips × 4 tokens
                    ref_v = ref.layers[layer].values[b]
                    ref_k = rope.unrotate(ref.layers[layer].keys[b:b + 1], _positions(batch, b)[None])[0]
                    for clip in range(2):
                        cols = [frames[f][0] + grid.flatten() for f in (2 * clip, 2 * clip + 1)]
                        want_v = torch.stack([torch.einsum("nt,htd->hnd", pool, ref_v[:, c]) for c in cols]).mean(0)
                        want_k = torch.stack([torch.einsum("nt,htd->hnd", pool, ref_k[:, c]) for c in cols]).mean(0)
                        got = vis[4 * clip: 4 * clip + 4]
                        assert torch.allclose(values[b][:, got], want_v, atol=1e-5)
                        got_k = rope.unrotate(session.cache.layers[layer].keys[b:b + 1, :, got],
                                              st.pos[b:b + 1, 0, got])[0]
                        assert torch.allclose(got_k, want_k, atol=1e-4)
                    # a merged entry stands for 2 frames × 4 tokens
                    assert torch.allclose(st.log_mass[b, 0, vis], torch.full((8,), math.log(2 * side * side / 4)))


def test_hico_masses_add_up_to_the_frames_tokens_when_bins_overlap():
    """4 → 3 per side pools in overlapping adaptive bins; the merged entries must still stand for
    exactly the frames' tokens (their +log(mass) attention would otherwise over-weigh the video)."""
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, video_rows(4))
    with torch.no_grad(), HicoPress(tokens_per_frame=9)(fam) as session:
        prefill(fam, batch)
        side = session.spec.grids[0].shape[0]
        assert side % 3 != 0  # the bins overlap
        for st in session.states.values():
            for b in range(st.valid.shape[0]):
                vis = (st.mod[b, 0] == VISION) & st.valid[b, 0]
                assert int(vis.sum()) == 4 * 9
                assert torch.allclose(st.log_mass[b, 0, vis].exp().sum(), torch.tensor(4.0 * side * side))


def _positions(batch, b):
    mask = batch["attention_mask"][b]
    return (mask.cumsum(-1) - 1).clamp(min=0).float()


def test_hico_drops_visual_entries_progressively_deeper():
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, video_rows(4))
    with HicoPress(tokens_per_frame=4, clip_frames=1, drop_from_layer=0, drop_keep=0.5)(fam) as session:
        with torch.no_grad():
            prefill(fam, batch)
        counts = [int(((st.mod[0, 0] == VISION) & st.valid[0, 0]).sum()) for st in session.states.values()]
        texts = [int(((st.mod[0, 0] == TEXT) & st.valid[0, 0]).sum()) for st in session.states.values()]
    assert counts == [8, 4]  # 16 merged entries, then × 0.5, × 0.25
    assert texts[0] == texts[1] == int(session.seen_by_mod[0, TEXT])
