"""Images the model draws while decoding (MVoT's visual thoughts) under the presses: CoSRe's DCT
when a drawn image is complete, and MVoT's own window (`mvot_window`). tiny-anole draws 8×8 VQ
codes between `<racm3:break>` and `<eoss>`; a random model does not, so the drawings are
teacher-forced one token per forward, exactly as `coconut.decode` feeds its picks."""

from __future__ import annotations

import math

import pytest
import torch

from mmreason.config import ConfigError
from mmreason.kv import CosrePress, KVMeter, MvotWindowPress, make_press
from mmreason.kv.accounting import layer_bytes
from mmreason.kv.cosre import bilinear, compress_grid, reduced_coords
from mmreason.kv.modality import SHARED, TEXT, VISION
from mmreason.latent.coconut import GenerationSettings, decode, generate
from mmreason.models.base import position_ids
from tests.kv_helpers import batch_of, forced, one_thread, prefill, rows, tiny_family  # noqa: F401

SIDE = 8  # tiny-anole: 64 px → 8 × 8 codes


def drawing(fam, n_images: int, shifts: tuple[int, ...]):
    """(B, T) ids each row writes after its prompt — `shifts[b]` words first (so rows complete
    their images at different steps), then per image `<racm3:break>` + codes + `<eoss>` and the
    words "Go up." — and per row the spans (first, last) of each image's codes among them."""
    words = fam.tokenizer("Go up.", add_special_tokens=False)["input_ids"]
    images = [r["images"][0] for r in rows()]
    drawn = fam.drawn_images([images[i % len(images)] for i in range(n_images)])
    seqs, spans = [], []
    for shift in shifts:
        seq, mine = [], []
        for i in range(shift):
            seq.append(words[i % len(words)])
        for image in drawn:
            mine.append((len(seq) + 1, len(seq) + len(image) - 2))
            seq += image + words
        seqs.append(seq)
        spans.append(mine)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [words[0]] * (width - len(s)) for s in seqs])
    return ids, spans


def drive(fam, batch, ids, after_step=None):
    """Prefill, then feed `ids` (B, T) one column per forward; `after_step(t)` after the forward that
    fed column t. Returns (last output, attention mask, next positions)."""
    out = prefill(fam, batch)
    mask = batch["attention_mask"]
    pos = position_ids(mask)[:, -1:]
    embed = fam.model.get_input_embeddings()
    for t in range(ids.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = fam.model(inputs_embeds=embed(ids[:, t:t + 1]), attention_mask=mask, position_ids=pos,
                        past_key_values=out.past_key_values, use_cache=True)
        if after_step is not None:
            after_step(t)
    return out, mask, pos + 1


@pytest.fixture(scope="module")
def setup():
    fam = tiny_family("tiny-anole")
    batch = batch_of(fam, rows())
    ids, spans = drawing(fam, 2, shifts=(0, 5, 11))
    return fam, batch, ids, spans


def _completed(spans, t):
    """Images of one row whose `<eoss>` (right after the last code) has been fed by step t."""
    return [s for s in spans if s[1] + 1 <= t]


def _codes_fed(spans, t, open_only=False):
    """Codes of one row fed by step t (of images not yet completed only, with `open_only`)."""
    return sum(max(0, min(t, last) - first + 1) for first, last in spans if not open_only or last + 1 > t)


@pytest.mark.parametrize("block,keep", [(4, 2), (3, 2)])
def test_a_drawn_image_is_dct_compressed_in_every_layer_when_its_end_marker_is_fed_per_row(setup, block, keep):
    fam, batch, ids, spans = setup
    width = batch["input_ids"].shape[1]
    per_image = (-(-SIDE // block) * keep) ** 2  # ceil(h/b)·keep_h × ceil(w/b)·keep_w
    mass = block * block / (keep * keep)

    def check(t):
        for st in session.states.values():
            col, valid, mod = st.col[:, 0], st.valid[:, 0], st.mod[:, 0]
            lm = st.log_mass[:, 0] if st.log_mass is not None else torch.zeros_like(st.pos[:, 0])
            drawn = valid & (mod == VISION) & (col >= width)
            for b in range(ids.shape[0]):
                done = _completed(spans[b], t)
                open_codes = _codes_fed(spans[b], t, open_only=True)
                merged = drawn[b] & (lm[b] - math.log(mass)).abs().lt(1e-5)
                assert int(merged.sum()) == per_image * len(done), (t, b)
                assert int((drawn[b] & (lm[b] == 0)).sum()) == open_codes, (t, b)
                for first, last in done:  # the entries of an image sit on its columns
                    inside = merged[b] & (col[b] >= width + first) & (col[b] <= width + last)
                    assert int(inside.sum()) == per_image

    # rows complete their images at different steps (shifts 0, 5, 11): each row at its own
    with torch.no_grad(), CosrePress(block=block, keep_h=keep, keep_w=keep)(fam) as session:
        drive(fam, batch, ids, check)


def test_drawn_images_keys_are_compressed_before_rope_and_re_rotated_at_their_grid_positions(setup):
    fam, batch, ids, spans = setup
    width = batch["input_ids"].shape[1]
    b = 1
    first, last = spans[b][0]
    raw = {}

    def snapshot(t):
        if t == last:  # the last code is in, its end marker not yet
            for layer, st in session.states.items():
                sel = st.valid[b, 0] & (st.col[b, 0] >= width + first) & (st.col[b, 0] <= width + last)
                idx = sel.nonzero().flatten()
                idx = idx[st.col[b, 0, idx].argsort()]
                cache = session.cache.layers[layer]
                raw[layer] = (cache.keys[b:b + 1, :, idx].clone(), cache.values[b, :, idx].clone(),
                              st.pos[b:b + 1, 0, idx].clone())

    with torch.no_grad(), CosrePress(block=4, keep_h=2, keep_w=2)(fam) as session:
        drive(fam, batch, ids[:, : last + 2], snapshot)  # up to and with the end marker
        rope = session.rope
        rr, cc, _ = reduced_coords(SIDE, SIDE, 4, 2, 2)
        for layer, (keys, values, pos) in raw.items():
            heads, dim = keys.shape[1], keys.shape[-1]
            grid = lambda t: t.reshape(heads, SIDE, SIDE, dim)  # noqa: E731
            new_pos = bilinear(pos[0].double().view(SIDE, SIDE), rr, cc).flatten().float()
            k_pre = rope.unrotate(keys, pos)[0]
            want = rope.rotate(compress_grid(grid(k_pre), 4, 2, 2).reshape(1, heads, -1, dim), new_pos[None])[0]
            on_rotated = compress_grid(grid(keys[0]), 4, 2, 2).reshape(heads, -1, dim)

            st = session.states[layer]
            sel = st.valid[b, 0] & (st.col[b, 0] >= width + first) & (st.col[b, 0] <= width + last)
            idx = sel.nonzero().flatten()
            idx = idx[st.pos[b, 0, idx].argsort()]  # the grid's positions increase row-major
            assert torch.allclose(st.pos[b, 0, idx], new_pos, atol=1e-4)
            got = session.cache.layers[layer].keys[b][:, idx]
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
            assert (got - on_rotated).abs().max() > 0.1  # the DCT of rotated keys is something else
            got_v = session.cache.layers[layer].values[b][:, idx]
            assert torch.allclose(got_v, compress_grid(grid(values), 4, 2, 2).reshape(heads, -1, dim), atol=1e-5)


def test_keep_equal_to_block_on_drawn_images_generates_what_no_press_generates(setup, monkeypatch):
    fam, batch, ids, spans = setup
    settings = GenerationSettings(max_new_tokens=8)
    calls = []
    drawn = CosrePress._drawn
    monkeypatch.setattr(CosrePress, "_drawn", lambda self, call, closed: calls.append(1) or drawn(self, call, closed))
    with torch.no_grad():
        out, mask, pos = drive(fam, batch, ids)
        ref = decode(fam, out.logits[:, -1], out.past_key_values, mask, pos, settings)
        # the full compress path (keeps_everything off): un-rotate, DCT, re-rotate at the same positions
        with forced(CosrePress(block=4, keep_h=4, keep_w=4))(fam):
            out2, mask2, pos2 = drive(fam, batch, ids)
            got = decode(fam, out2.logits[:, -1], out2.past_key_values, mask2, pos2, settings)
    assert len(calls) == 2 * 6  # layers × images completed (3 rows × 2)
    assert torch.allclose(out2.logits, out.logits, atol=1e-4)
    assert got == ref and any(got)


def test_with_slots_a_drawn_image_leaves_its_residual_fraction_and_every_token_is_counted_once(setup):
    fam, batch, ids, spans = setup
    width = batch["input_ids"].shape[1]
    frac, slots = 0.5, 4
    per_image = 16
    with torch.no_grad(), CosrePress(block=4, keep_h=2, keep_w=2, slots=slots, residual_vis=frac)(fam) as session:
        prefill_slots = {}

        def check(t):
            for layer, st in session.states.items():
                valid, col, mod = st.valid[:, 0], st.col[:, 0], st.mod[:, 0]
                shared = ((mod == SHARED) & valid).sum(-1)
                prefill_slots.setdefault(layer, shared.clone())
                assert torch.equal(shared, prefill_slots[layer])  # drawn images join the slots there are
                for b in range(ids.shape[0]):
                    done = _completed(spans[b], t)
                    own = int(((mod[b] == VISION) & valid[b] & (col[b] >= width)).sum())
                    assert own == math.floor(frac * per_image + 0.5) * len(done) + _codes_fed(spans[b], t, True)
                    # generated text is not folded (every = 0)
                    text = int(((mod[b] == TEXT) & valid[b] & (col[b] >= width)).sum())
                    assert text == t + 1 - _codes_fed(spans[b], t)
                    # every token seen is an entry of its own or part of one merged entry or slot
                    mass = float(st.log_mass[b, 0].exp().masked_fill(~valid[b], 0).sum())
                    tokens = int(batch["attention_mask"][b].sum()) + t + 1
                    assert mass == pytest.approx(tokens, abs=1e-2), (t, b)

        drive(fam, batch, ids, check)


def _window_kept(spans, t, latest=1):
    """Generated columns (offsets after the prompt) `mvot_window` keeps after step t: every text
    token, the codes of the `latest` completed images and those of an image still being drawn."""
    codes = {j for first, last in spans for j in range(first, last + 1)}
    keep = {j for j in range(t + 1) if j not in codes}
    done = _completed(spans, t)
    for first, last in done[-latest:] + [s for s in spans if s not in done]:
        keep |= {j for j in range(first, min(last, t) + 1)}
    return keep


def test_mvot_window_keeps_prompt_images_text_and_the_latest_drawn_image_and_the_meter_sees_the_drops():
    fam = tiny_family("tiny-anole")
    batch = batch_of(fam, rows())
    ids, spans = drawing(fam, 3, shifts=(0, 4))
    batch = {k: v[:2] for k, v in batch.items()}
    width = batch["input_ids"].shape[1]
    prompt_cols = [set((batch["attention_mask"][b].nonzero().flatten()).tolist()) for b in range(2)]
    lengths = []

    def check(t):
        lengths.append(session.states[0].length)
        for st in session.states.values():
            for b in range(2):
                valid = st.valid[b, 0]
                cols = set(st.col[b, 0][valid].tolist())
                assert {c for c in cols if c < width} == prompt_cols[b]  # the prompt image and text stay
                assert {c - width for c in cols if c >= width} == _window_kept(spans[b], t), (t, b)

    with torch.no_grad(), MvotWindowPress()(fam) as session, KVMeter(fam.model, session) as meter:
        drive(fam, batch, ids, check)
    with torch.no_grad(), KVMeter(fam.model) as full:
        drive(fam, batch, ids)
    config = fam.model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    per_entry = 2 * heads * dim * 4  # keys + values, float32, per row
    layers = config.num_hidden_layers
    # the cache tensors shrank: the last step holds the longest row's kept entries (prompt + window)
    kept_last = max(len(prompt_cols[b]) + len(_window_kept(spans[b], ids.shape[1] - 1)) for b in range(2))
    assert session.states[0].length == kept_last
    assert layer_bytes(session.cache) == [2 * per_entry * kept_last] * layers
    # the peak is the longest cache inside a step, before that step's drop
    peak = max([width] + [n + 1 for n in lengths[:-1]] + [width + 1])
    assert meter.summary()["kv_bytes_peak"] == per_entry * peak * layers
    assert full.summary()["kv_bytes_peak"] == per_entry * (width + ids.shape[1]) * layers
    assert meter.summary()["kv_bytes_peak"] <= full.summary()["kv_bytes_peak"] - per_entry * SIDE * SIDE * layers


def test_mvot_window_bad_settings_name_the_setting_and_other_families_are_left_alone():
    with pytest.raises(ConfigError, match="latest must be >= 1"):
        make_press("mvot_window", {"latest": 0})
    with pytest.raises(ConfigError, match="press.window"):
        make_press("mvot_window", {"window": 2})
    fam = tiny_family("tiny-internvl")  # cannot draw: nothing ever completes, nothing is dropped
    batch = batch_of(fam, rows())
    settings = GenerationSettings(max_new_tokens=6)
    ref = generate(fam, batch, 0, settings)
    with MvotWindowPress()(fam) as session:
        assert generate(fam, batch, 0, settings) == ref
        assert session.spec.image_end_ids is None
        assert all(bool(st.valid.all()) or st.length == session.seen for st in session.states.values())
