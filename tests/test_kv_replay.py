"""Prefill once, replay every press (`PromptRecorder`, `Session.replay_prompt`, `KVMeter.prompt_done`): the
same caches, tokens and KV accounting as the prompt run under the press itself."""

from __future__ import annotations

import pytest
import torch

from mmreason.kv import DarePress, KVMeter, make_press
from mmreason.kv.base import PromptRecorder
from mmreason.latent.coconut import GenerationSettings, decode, generate
from mmreason.models.base import position_ids
from tests.kv_helpers import batch_of, one_thread, prefill, rows, tiny_family  # noqa: F401

PRESSES = [
    ("tova", {"factor": 0.5, "min_size": 4}),
    ("cosre", {"block": 4, "keep_h": 2, "keep_w": 2, "slots": 4, "residual_text": 0.5, "residual_vis": 0.5}),
    ("cosre", {"block": 4, "keep_h": 2, "keep_w": 2, "slots": 4, "residual_text": 0.5, "every": 2, "recent": 2}),
    ("kvpress:snapkv", {"compression_ratio": 0.5, "window_size": 4}),
    ("kvpress:streaming_llm", {"compression_ratio": 0.5}),
    ("kvpress:knorm", {"compression_ratio": 0.5}),
    ("kvpress:expected_attention", {"compression_ratio": 0.5}),
    ("kvpress:tova", {"compression_ratio": 0.5}),
]
SETTINGS = GenerationSettings(max_new_tokens=6)
MEASURED = ("kv_bytes_prefill", "kv_bytes_peak", "kv_bytes_full_final", "kv_fraction_peak", "kv_fraction_prefill",
            "retained_text_prefill", "retained_vision_prefill", "retained_text_final")


@pytest.fixture(scope="module")
def recorded():
    """tiny-internvl (images and text), a left-padded batch, its prompt run once under PromptRecorder."""
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, rows())
    with torch.no_grad(), PromptRecorder()(fam) as session:
        out = prefill(fam, batch)
    return fam, batch, session, out.logits[:, -1]


@pytest.mark.parametrize("name,settings", PRESSES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PRESSES)])
def test_a_replayed_press_decodes_and_meters_as_the_press_run_on_the_prompt(recorded, name, settings):
    fam, batch, source, logits = recorded
    press = make_press(name, settings)
    with press(fam) as session, KVMeter(fam.model, session) as meter:
        expected = generate(fam, batch, 0, SETTINGS)
        cache = session.cache
    with press(fam) as replay, KVMeter(fam.model, replay) as replay_meter:
        replay.replay_prompt(source)
        replay_meter.prompt_done(replay.cache, batch["input_ids"].shape[1], 0.0)
        mask = batch["attention_mask"]
        got = decode(fam, logits, replay.cache, mask, position_ids(mask)[:, -1:] + 1, SETTINGS)
    assert got == expected
    for a, b in zip(cache.layers, replay.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert session.compressed and replay.compressed
    want, have = meter.summary(), replay_meter.summary()
    assert {k: want.get(k) for k in MEASURED} == {k: have.get(k) for k in MEASURED}
    assert want["kv_fraction_peak"] < 0.9


def test_replaying_leaves_the_recording_as_it_was_and_refuses_what_it_cannot_replay(recorded):
    fam, _, source, _ = recorded
    before = [(layer.keys.clone(), source.states[i].col.clone()) for i, layer in enumerate(source.cache.layers)]
    with make_press("tova", {"factor": 0.25, "min_size": 2})(fam) as session:
        session.replay_prompt(source)
        assert session.cache.layers[0].keys.shape[2] < before[0][0].shape[2]
    for (keys, col), layer, i in zip(before, source.cache.layers, range(len(before))):
        assert torch.equal(layer.keys, keys) and torch.equal(source.states[i].col, col)
    dare = DarePress(rho_text=0.5, rho_vis=0.5, layer=0)  # its fresh router: only whether it replays matters
    with dare(fam) as session, pytest.raises(ValueError, match="acts before attention"):
        session.replay_prompt(source)
    with make_press("tova", {"factor": 0.5})(fam) as session, pytest.raises(ValueError, match="PromptRecorder"):
        session.replay_prompt(session)
