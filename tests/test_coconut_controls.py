"""CoCoNuT's controls (`coconut.thought`): `pause` — the same curriculum, each latent one learned
token read in an ordinary forward — and `none` — the replaced steps gone, nothing in their place.
Their batches, their forward, their generation and evaluation, the export carrying the kind, and
the coconut stage trained with each through Ray Train."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from mmreason.config import ConfigError, load_config
from mmreason.eval.runner import evaluate
from mmreason.latent.coconut import CurriculumSchedule, GenerationSettings, generate, generate_uncached, latent_forward
from mmreason.models import load_backbone
from mmreason.models.base import IGNORE, position_ids
from mmreason.tasks import TASKS, RenderOptions, answer_sentence, generate_example
from mmreason.train.config import TrainConfig
from mmreason.train.stages.base import StageEnv
from mmreason.train.stages.sft import SFT, encode_batch
from tests.test_coconut import family  # noqa: F401  (the same spread-weight tiny model, a fixture)

ALL_TRAIN = {"train": 1.0, "val": 0.0, "test": 0.0}
SCHEDULE = "coconut={c_thought: 2, epochs_per_stage: 1, max_latent_stage: 2, thought: %s}"


@pytest.fixture(scope="module")
def rows():
    return [generate_example(TASKS[t], s, "train", i, 0, ALL_TRAIN, RenderOptions(step_images=False))
            for i, (t, s) in enumerate([("maze", 4), ("maze", 5), ("frozenlake", 3), ("maze", 3)])]


@contextmanager
def trained_as(family, thought: str):
    """`family` as the coconut stage with `coconut.thought=thought` sets it up (through the recipe)."""
    before = family.thought
    cfg = load_config(TrainConfig, None, ["stage=coconut", SCHEDULE % thought])
    recipe = SFT(cfg, family, StageEnv(model_path=""))
    try:
        assert family.thought == thought
        yield recipe
    finally:
        family.thought = before


def stage_batch(recipe, rows, epoch):
    return encode_batch(recipe.family, rows, recipe.cfg, epoch, random.Random(0))


def test_pause_rows_hold_the_pause_token_exactly_where_latent_rows_hold_latents(family, rows):
    with trained_as(family, "latent") as recipe:
        latent = stage_batch(recipe, rows, epoch=1)
    with trained_as(family, "pause") as recipe:
        pause = stage_batch(recipe, rows, epoch=1)
    is_latent = latent["input_ids"] == family.latent_id
    assert (is_latent.sum(1) == 2).all()  # stage 1 × c_thought 2
    # the pause token is `<|latent|>` itself: the same ids and labels, only the forward differs
    assert torch.equal(pause["input_ids"], latent["input_ids"]) and torch.equal(pause["labels"], latent["labels"])
    assert ((pause["input_ids"] == family.latent_id) == is_latent).all()
    assert (pause["labels"][is_latent] == IGNORE).all()


@pytest.mark.parametrize("epoch", [1, 3])
def test_none_rows_drop_the_replaced_steps_and_put_nothing_in_their_place(family, rows, epoch):
    tok = family.tokenizer
    with trained_as(family, "none") as recipe:
        cfg = recipe.cfg
        batch = stage_batch(recipe, rows, epoch)
        encoded = [family.encode(r, "latent", cfg.coconut.latent_steps(cfg.coconut.stage(epoch)), 2,
                                 replaced_steps=cfg.coconut.replaced_steps(cfg.coconut.stage(epoch), len(r["steps"])))
                   for r in rows]
    markers = {family.latent_id, family.start_latent_id, family.end_latent_id}
    assert not any(int(t) in markers for t in batch["input_ids"].flatten())
    replaced = 1 if epoch == 1 else None  # epoch 3 is the last stage: every step goes
    for row, enc, labels in zip(rows, encoded, batch["labels"]):
        # the prompt runs straight into the kept steps: every input after it is labelled
        assert enc.n_latents == 0 and enc.input_ids[enc.prompt_len:] == enc.labels[enc.prompt_len:]
        assert all(label == IGNORE for label in enc.labels[: enc.prompt_len])
        assert enc.input_ids[: enc.prompt_len] == family.encode(row, "cot", with_target=False).input_ids
        kept = row["steps"][replaced:] if replaced else []
        target = tok.decode([int(t) for t in labels if t != IGNORE], skip_special_tokens=True)
        assert target.split() == " ".join([*kept, answer_sentence(row["answer"])]).split()


def test_pause_forward_is_one_ordinary_forward_and_trains_the_pause_embedding(family, rows):
    """pause: the loss of one plain forward on the ids (no hidden state fed back), unlike latent's;
    the gradient reaches the pause positions' input embeddings (latent overwrites them: none)."""
    with trained_as(family, "latent") as recipe:
        batch = stage_batch(recipe, rows, epoch=2)
    is_latent = batch["input_ids"] == family.latent_id
    assert (is_latent.sum(1) == 4).all()
    mask = batch["attention_mask"]
    plain = family.model(inputs_embeds=family.embed(batch), attention_mask=mask, position_ids=position_ids(mask)).logits
    plain_loss = F.cross_entropy(plain[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)

    def loss_and_input_grad(thought):
        captured = []
        hook = family.model.get_input_embeddings().register_forward_hook(
            lambda _m, _i, out: captured.append(out) or out.retain_grad())
        try:
            with trained_as(family, thought):
                loss, _ = latent_forward(family, batch)
            loss.backward()
        finally:
            hook.remove()
            family.model.zero_grad()
        return loss.detach(), captured[0].grad

    pause_loss, pause_grad = loss_and_input_grad("pause")
    latent_loss, latent_grad = loss_and_input_grad("latent")
    assert torch.allclose(pause_loss, plain_loss.detach(), atol=1e-5)
    assert not torch.allclose(pause_loss, latent_loss, atol=1e-3)
    assert pause_grad[is_latent].abs().sum(-1).min() > 0
    assert latent_grad[is_latent].abs().max() == 0


@pytest.mark.parametrize("thought", ["pause", "none"])
def test_coconut_generation_of_pause_and_none_equals_a_plain_uncached_loop(family, rows, thought):
    settings = GenerationSettings(max_new_tokens=16)
    with trained_as(family, "latent"):
        latent_items = [family.encode(r, "latent", 2, c_thought=1, with_target=False) for r in rows]
        fed = generate(family, family.collate(latent_items, pad_side="left"), 2, settings)
    with trained_as(family, thought):
        items = [family.encode(r, "latent", 2, c_thought=1, with_target=False) for r in rows]
        batched = generate(family, family.collate(items, pad_side="left"), 2, settings)
    expected_ids = ([it.input_ids for it in latent_items] if thought == "pause"
                    else [family.encode(r, "cot", with_target=False).input_ids for r in rows])
    assert [it.input_ids for it in items] == expected_ids
    # the reference: the prompt (+ pauses) as ordinary tokens, continued greedily without a cache
    reference = [generate_uncached(family, family.collate([it], pad_side="left"), 0, 16) for it in items]
    assert batched == reference
    assert len({tuple(g) for g in batched}) > 1, "outputs are degenerate; the comparison would prove little"
    assert batched != fed  # no hidden state was fed


def test_evaluation_reads_the_models_thought_kind_and_counts_its_latents(family, rows):
    """coconut mode: latent and pause count their n latents, none 0; none's replies are the cot
    prompt's (nothing between prompt and reply); pause's equal generate on the pause rows."""
    settings = GenerationSettings(max_new_tokens=12)
    results = {}
    for thought in ("latent", "pause", "none"):
        with trained_as(family, thought):
            results[thought] = evaluate(family, rows, "coconut", settings, n_latent_steps=2, c_thought=2)
            if thought == "none":
                cot = evaluate(family, rows, "cot", settings)
            if thought == "pause":
                items = [family.encode(r, "latent", 2, 2, with_target=False) for r in rows]
                pause_ids = generate(family, family.collate(items, pad_side="left"), 4, settings)
    assert [results[t].latents_per_answer for t in ("latent", "pause", "none")] == [4, 4, 0]
    assert [p["output"] for p in results["none"].predictions] == [p["output"] for p in cot.predictions]
    assert [p["n_tokens"] for p in results["pause"].predictions] == [len(ids) for ids in pause_ids]
    assert [p["output"] for p in results["pause"].predictions] != [p["output"] for p in results["latent"].predictions]


@pytest.mark.parametrize("thought", ["pause", "none"])
def test_an_export_carries_its_thought_kind(family, tmp_path, thought):
    with trained_as(family, thought):
        family.save(tmp_path / "export")
    assert family.thought == "latent"
    assert load_backbone("tiny-internvl", tmp_path / "export").thought == thought
    assert json.loads((tmp_path / "export/config.json").read_text())["coconut_thought"] == thought


def test_bad_thought_kinds_are_named(family):
    with pytest.raises(ConfigError, match="coconut.thought"):
        load_config(TrainConfig, None, ["stage=coconut", "coconut.thought=foo"])
    with pytest.raises(ConfigError, match="coconut.thought must be one of latent, pause, none, got 'foo'"):
        CurriculumSchedule(thought="foo")
    with pytest.raises(ConfigError, match="coconut.thought: the coconut stage sets"):
        load_config(TrainConfig, None, ["stage=cot", "coconut.thought=pause"])
    with pytest.raises(ValueError, match="thought: unknown kind 'foo'"):
        family.thought = "foo"
    assert family.thought == "latent"


@pytest.mark.integration
@pytest.mark.parametrize("thought", ["pause", "none"])
def test_the_coconut_stage_trains_and_evaluates_each_control_through_ray_train(maze_data, tmp_path, monkeypatch,
                                                                               thought):
    """One worker, one epoch at stage 1 (2 latents per row): the stage's own evaluation of its export
    and `jobs.evaluate`'s measurement of it both read the export's thought kind."""
    from jobs import train
    from mmreason.eval.press_eval import PressEvalConfig, held_out, measure_press
    from mmreason.kv.accounting import KVMeter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(TrainConfig, None, [
        "stage=coconut", f"data.path={maze_data}", f"storage={tmp_path / 'runs'}", "run_name=c", "workers=1",
        "optim.batch_size=16", "optim.epochs=1", "eval.max_examples=4", "eval.batch_size=4", "eval.epoch_examples=4",
        "eval.modes={coconut: {max_new_tokens: 8}}",
        f"coconut={{c_thought: 2, epochs_per_stage: 1, max_latent_stage: 1, first_stage: 1, thought: {thought}}}"])
    out = train.run_stage(cfg)
    assert out["train"]["stage"] == 1 and out["train"]["loss"] > 0 and "eval_accuracy" in out["train"]
    latents = 2 if thought == "pause" else 0
    assert out["eval"]["coconut"]["latents_per_answer"] == latents and out["eval"]["coconut"]["n"] == 4
    assert load_backbone("tiny-internvl", out["export"]).thought == thought
    press_cfg = load_config(PressEvalConfig, None, [
        f"data.path={maze_data}", f"model.checkpoint={out['export']}", "mode=coconut", "n_latent_steps=1",
        "c_thought=2", "max_examples=4", "generation.max_new_tokens=8"])
    measured = measure_press(press_cfg, out["export"])
    stage_outputs = [json.loads(line)["output"]
                     for line in (cfg.run_dir / "eval/predictions-coconut.jsonl").read_text().splitlines()]
    assert [p["output"] for p in measured["predictions"]] == stage_outputs
    # against the same export read as a latent model (its replies are too alike to tell apart after
    # one epoch; the cache is not): latent prefills up to <|start-latent|> and feeds each thought in
    # a forward of its own; pause prefills the pauses and <|end-latent|> too; none holds no markers
    as_latent = load_backbone("tiny-internvl", out["export"])
    as_latent.thought = "latent"
    with KVMeter(as_latent.model, None) as meter:
        evaluate(as_latent, held_out(press_cfg), "coconut", press_cfg.generation, n_latent_steps=1, c_thought=2)
    # one left-padded batch: its cache is as wide as the longest prompt and what follows it
    width = max(as_latent.encode(r, "cot", with_target=False).prompt_len for r in held_out(press_cfg))
    per_column = meter.summary()["kv_bytes_prefill"] / (width + 1)
    extra = {"pause": 4, "none": 0}[thought]  # columns prefilled after the prompt
    assert measured["row"]["kv_bytes_prefill"] == pytest.approx(per_column * (width + extra))
