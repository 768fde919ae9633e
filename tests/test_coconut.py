"""CoCoNuT on a tiny backbone: the multi-pass cached forward against a naive one, batched cached
generation against the batch-1 uncached reference, and the curriculum."""

from __future__ import annotations

import random

import pytest
import torch

from mmreason.latent.coconut import (
    CurriculumSchedule,
    GenerationSettings,
    generate,
    generate_uncached,
    latent_forward,
)
from mmreason.models import build_tiny, load_backbone
from mmreason.models.base import IGNORE
from mmreason.tasks import TASKS, RenderOptions, generate_example

ALL_TRAIN = {"train": 1.0, "val": 0.0, "test": 0.0}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    fam = load_backbone("tiny-internvl", build_tiny("tiny-internvl", tmp_path_factory.mktemp("ti")))
    # a random tiny model greedily repeats one token; spread the weights so outputs differ per row
    with torch.no_grad():
        for p in fam.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return fam


@pytest.fixture(scope="module")
def rows():
    return [generate_example(TASKS[t], s, "train", i, 0, ALL_TRAIN, RenderOptions(step_images=False))
            for i, (t, s) in enumerate([("maze", 3), ("maze", 4), ("frozenlake", 3), ("maze", 5)])]


def naive_latent_loss(family, batch):
    """Fill each latent with the previous position's last hidden state by re-running the whole
    prefix without a cache, one latent at a time; then a single full forward."""
    ids = batch["input_ids"]
    embeds = family.embed(batch)
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for b in range(ids.shape[0]):
        for col in (ids[b] == family.latent_id).nonzero().flatten().tolist():
            out = family.model(inputs_embeds=embeds[b : b + 1, :col], attention_mask=mask[b : b + 1, :col],
                               position_ids=pos[b : b + 1, :col], output_hidden_states=True)
            embeds = embeds.clone()
            embeds[b, col] = out.hidden_states[-1][0, -1]
    logits = family.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE)


def test_latent_forward_matches_the_naive_multipass_forward_and_backprops_through_thoughts(family, rows):
    items = [family.encode(r, "latent", k, c_thought=2) for r, k in zip(rows, [1, 2, 0, 3])]
    batch = family.collate(items, align_latents=True)
    loss, logits = latent_forward(family, batch)
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.allclose(loss, naive_latent_loss(family, batch), atol=1e-4)
    loss.backward()
    grads = [p.grad for p in family.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    family.model.zero_grad()


def test_latent_positions_are_out_of_the_loss_and_replace_the_first_steps(family, rows):
    row = next(r for r in rows if len(r["steps"]) >= 3)
    enc = family.encode(row, "latent", 2, c_thought=1)
    n_lat = enc.input_ids.count(family.latent_id)
    assert n_lat == 2
    start = enc.input_ids.index(family.start_latent_id)
    assert all(label == IGNORE for label in enc.labels[: start + n_lat + 2])
    text = family.tokenizer.decode([t for t in enc.labels if t != IGNORE])
    assert row["steps"][0] not in text and row["steps"][1] not in text and row["steps"][2] in text


def test_unaligned_latents_are_refused(family, rows):
    items = [family.encode(r, "latent", 1) for r in rows[:2]]
    with pytest.raises(ValueError, match="align_latents"):
        latent_forward(family, family.collate(items))


@pytest.mark.parametrize("n_steps", [0, 2])
def test_batched_cached_generation_equals_batch1_uncached(family, rows, n_steps):
    target = "latent" if n_steps else "cot"
    items = [family.encode(r, target, n_steps, c_thought=1, with_target=False) for r in rows]
    batched = generate(family, family.collate(items, pad_side="left"), n_steps, GenerationSettings(max_new_tokens=24))
    reference = [generate_uncached(family, family.collate([it], pad_side="left"), n_steps, 24) for it in items]
    assert batched == reference
    assert len({tuple(g) for g in batched}) > 1, "outputs are degenerate; the comparison would prove little"


def test_sampling_is_reproducible_with_a_seed(family, rows):
    items = [family.encode(r, "cot", with_target=False) for r in rows]
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
    a = generate(family, family.collate(items, pad_side="left"), 0, settings, torch.Generator().manual_seed(3))
    b = generate(family, family.collate(items, pad_side="left"), 0, settings, torch.Generator().manual_seed(3))
    assert a == b


def test_curriculum_stages_and_mixing():
    sched = CurriculumSchedule(c_thought=2, epochs_per_stage=3, max_latent_stage=2, uniform_prob=0.0)
    assert [sched.stage(e) for e in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    from_cot = CurriculumSchedule(epochs_per_stage=2, max_latent_stage=2, first_stage=1)
    # past max_latent_stage comes CoCoNuT's last stage (every step latent), and stays
    assert [from_cot.stage(e) for e in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert [from_cot.latent_steps(s) for s in (0, 1, 2, 3)] == [0, 1, 2, 2]
    assert [from_cot.replaced_steps(s, 5) for s in (0, 1, 2, 3)] == [0, 1, 2, 5]
    assert [from_cot.replaced_steps(s, 1) for s in (0, 1, 2, 3)] == [0, 1, 1, 1]
    keep = CurriculumSchedule(epochs_per_stage=2, max_latent_stage=2, first_stage=1, keep_last_steps=1)
    # the last step stays written at every stage, the last one included; a one-step row keeps its step
    assert [keep.replaced_steps(s, 5) for s in (0, 1, 2, 3)] == [0, 1, 2, 4]
    assert [keep.replaced_steps(s, 2) for s in (0, 1, 2, 3)] == [0, 1, 1, 1]
    assert [keep.replaced_steps(s, 1) for s in (0, 1, 2, 3)] == [0, 0, 0, 0]
    assert [keep.latent_steps(s) for s in (0, 1, 2, 3)] == [0, 1, 2, 2]
    mixed = CurriculumSchedule(epochs_per_stage=1, max_latent_stage=3, uniform_prob=1.0)
    seen = {mixed.row_stage(3, random.Random(i)) for i in range(50)}
    assert seen == {0, 1, 2, 3}


def test_the_last_stage_trains_the_answer_alone_after_max_latent_stage_latents(family):
    """A training batch at the stage after max_latent_stage (CoCoNuT's `n_skip_steps = 10000`):
    every row, whatever its step count, holds max_latent_stage·c_thought latents and no step — its
    labels are the answer sentence and eos; the stage before still writes the steps after its latents."""
    from mmreason.config import load_config
    from mmreason.tasks import answer_sentence
    from mmreason.train.config import TrainConfig
    from mmreason.train.stages.sft import encode_batch

    rows = [generate_example(TASKS["maze"], size, "train", i, 0, ALL_TRAIN, RenderOptions(step_images=False))
            for size, i in ((4, 2), (5, 1))]
    assert len(rows[0]["steps"]) != len(rows[1]["steps"]) and min(len(r["steps"]) for r in rows) > 2
    cfg = load_config(TrainConfig, None, ["stage=coconut", "coconut={c_thought: 2, epochs_per_stage: 1, max_latent_stage: 2}"])
    tok = family.tokenizer
    answer_ids = [i for i in tok(answer_sentence("A"))["input_ids"] if i != tok.bos_token_id]
    keep_last = load_config(TrainConfig, None, ["stage=coconut",
                                                 "coconut={c_thought: 2, epochs_per_stage: 1, max_latent_stage: 2, "
                                                 "keep_last_steps: 1}"])
    for cfg, epoch, kept_steps in ((cfg, 2, lambda r: r["steps"][2:]), (cfg, 3, lambda r: []),
                                   (keep_last, 3, lambda r: r["steps"][-1:])):
        assert cfg.coconut.stage(epoch) == epoch
        batch = encode_batch(family, rows, cfg, epoch, random.Random(0))
        for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
            assert int((ids == family.latent_id).sum()) == 4
            target = tok.decode([int(t) for t in labels if t != IGNORE], skip_special_tokens=True)
            written = " ".join([*kept_steps(row), answer_sentence(row["answer"])])
            assert target.split() == written.split(), (epoch, target)
        if epoch == 3 and not cfg.coconut.keep_last_steps:
            assert all(len([t for t in labels if t != IGNORE]) == len(answer_ids) + 1 for labels in batch["labels"])


@pytest.mark.parametrize("setting", ["c_thought: 0", "epochs_per_stage: 0", "max_latent_stage: -1",
                                     "first_stage: -1", "keep_last_steps: -1", "uniform_prob: 1.5"])
def test_bad_curriculum_settings_are_named(setting):
    from mmreason.config import ConfigError, load_config
    from mmreason.train.config import TrainConfig

    with pytest.raises(ConfigError, match=f"coconut.{setting.split(':')[0]}"):
        load_config(TrainConfig, None, ["stage=coconut", f"coconut={{{setting}}}"])
