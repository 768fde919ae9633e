"""The cosre stage: teacher forcing over the cache CoSRe compresses (`mmreason.kv.training`), and the
stage that fine-tunes a cot model that way (Ray Train + DeepSpeed)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mmreason.config import ConfigError, load_config
from mmreason.kv import CosrePress, DarePress
from mmreason.kv.dare import DareRouter
from mmreason.kv.training import compressed_forward, distillation, prompt_width
from mmreason.latent.coconut import latent_forward
from mmreason.models import build_tiny, load_backbone
from mmreason.models.base import IGNORE, position_ids
from mmreason.train.config import TrainConfig
from jobs import train
from tests.kv_helpers import one_thread, rows, tiny_family  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PRESS = dict(block=4, keep_h=2, keep_w=2, slots=4, residual_text=0.5, residual_vis=0.5, every=4, recent=2)


def cot_batch(fam):
    return fam.collate([fam.encode(r, "cot") for r in rows()], align_latents=True)


def chunked(family_name: str):
    """A tiny family, its cot batch, the test press, and the batch's logits under chunked teacher
    forcing (no grad)."""
    fam = tiny_family(family_name)
    batch = cot_batch(fam)
    press = CosrePress(**PRESS)
    with torch.no_grad():
        _, logits = compressed_forward(fam, batch, press, chunk=press.every)
    return fam, batch, press, logits


@pytest.mark.parametrize("family_name", ["tiny-internvl", "tiny-anole", "tiny-phi4mm"])
def test_chunked_teacher_forcing_gives_the_logits_of_decoding_one_token_at_a_time(family_name):
    fam, batch, press, logits = chunked(family_name)
    with torch.no_grad():
        # the reference: the prompt, then the answer fed one token per forward, as decoding feeds it
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lead, pos = prompt_width(batch), position_ids(mask)
        with press(fam) as session:
            embeds = fam.embed(batch)
            out = fam.model(inputs_embeds=embeds[:, :lead], attention_mask=mask[:, :lead],
                            position_ids=pos[:, :lead], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(lead, ids.shape[1]):
                out = fam.model(inputs_embeds=embeds[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                position_ids=pos[:, t:t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
                cache = out.past_key_values
            shared = [int((st.mod == 2).any()) for st in session.states.values()]
    reference = torch.cat(steps, dim=1)
    assert all(shared), "the press made no slots: nothing was compared"
    answer = batch["labels"][:, 1:] != IGNORE  # the positions the loss reads
    assert ids.shape[1] - lead > 2 * press.every  # the answer spans several folds
    diff = (logits[:, :-1] - reference[:, :-1]).abs().amax(-1)[answer]
    assert float(diff.max()) < 1e-4, float(diff.max())


@pytest.mark.parametrize("family_name", ["tiny-internvl", "tiny-phi4mm"])
def test_each_row_of_a_batch_is_compressed_and_folded_as_it_would_be_alone(family_name):
    # rows of different prompt and answer lengths: the batch is padded on both sides, so its rows
    # hold different numbers of entries, slots and generated tokens to fold at each fold point
    fam, batch, press, logits = chunked(family_name)
    with torch.no_grad():
        answer = batch["labels"] != IGNORE
        assert len(set(answer.sum(-1).tolist())) > 1, "the answers should differ in length"
        for b, row in enumerate(rows()):
            alone = fam.collate([fam.encode(row, "cot")], align_latents=True)
            _, own = compressed_forward(fam, alone, press, chunk=press.every)
            mine = logits[b][answer[b]]
            theirs = own[0][alone["labels"][0] != IGNORE]
            assert mine.shape == theirs.shape and mine.shape[0] > 2 * press.every
            assert float((mine - theirs).abs().max()) < 2e-4, (b, float((mine - theirs).abs().max()))


def test_the_loss_reaches_the_model_through_the_compressed_prompt():
    fam = tiny_family("tiny-internvl")
    batch = cot_batch(fam)
    fam.model.zero_grad()
    loss, _ = compressed_forward(fam, batch, CosrePress(**PRESS), chunk=4)
    loss.backward()
    # the prompt's own positions carry no label: the image encoder's gradient came through the
    # prompt's cache entries (DCT-compressed, then slot-merged) that the answer read
    vision = [p.grad for n, p in fam.model.named_parameters() if "vision_tower" in n]
    assert vision and all(g is not None for g in vision)
    assert sum(float(g.abs().sum()) for g in vision) > 0
    fam.model.zero_grad()


def test_distillation_reads_only_the_answer_and_vanishes_when_the_student_matches_the_teacher():
    fam = tiny_family("tiny-internvl")
    batch = cot_batch(fam)
    with torch.no_grad():
        _, student = compressed_forward(fam, batch, CosrePress(**PRESS), chunk=4)
        _, teacher = latent_forward(fam, batch)
    labels = batch["labels"]
    kl = distillation(student, teacher, labels)
    assert float(kl) > 0 and float(distillation(teacher, teacher, labels)) < 1e-6
    # the prompt's logits (no label follows them) do not count; an answer position's do
    prompt = torch.zeros_like(labels, dtype=torch.bool)
    prompt[:, : prompt_width(batch) - 1] = True
    assert torch.allclose(distillation(student.masked_fill(prompt[..., None], 0.0), teacher, labels), kl)
    changed = student.clone()
    changed[:, prompt_width(batch)] += torch.randn_like(changed[:, 0])
    assert not torch.allclose(distillation(changed, teacher, labels), kl)


def test_the_distill_teacher_reads_the_whole_cache_while_the_dare_stages_press_is_on():
    # the dare stage keeps its press's hooks on for the whole loop, so the teacher's forward runs
    # inside them (the cosre stage's press is on only within compressed_forward): a press on one
    # model must leave another — here an exact copy — untouched
    student = tiny_family("tiny-internvl")
    teacher = copy.deepcopy(student)
    batch = cot_batch(student)
    press = DarePress(rho_text=0.5, rho_vis=0.5, layer=1)
    press.router = DareRouter(student.model.config.get_text_config().hidden_size).train()
    with torch.no_grad():
        _, plain = latent_forward(teacher, batch)
        with press(student):
            _, pressed = latent_forward(student, batch)
            _, during = latent_forward(teacher, batch)
    assert torch.equal(during, plain)
    answer = batch["labels"][:, 1:] != IGNORE
    assert not torch.allclose(pressed[:, :-1][answer], plain[:, :-1][answer], atol=1e-4)  # the press acted


def test_batches_whose_answers_do_not_start_together_are_refused():
    fam = tiny_family("tiny-internvl")
    batch = fam.collate([fam.encode(r, "cot") for r in rows()])  # right-padded: prompts end apart
    with pytest.raises(ValueError, match="align_latents=True"):
        compressed_forward(fam, batch, CosrePress(**PRESS))


def test_cosre_stage_settings_are_checked_when_the_config_loads():
    base = REPO / "configs/train/cosre-maze.yaml"
    with pytest.raises(ConfigError, match="cosre: these settings keep every cache entry"):
        load_config(TrainConfig, base, ["cosre={block: 4, keep_h: 4, keep_w: 4, slots: 0, every: 0}"])
    with pytest.raises(ConfigError, match="cosre.keep_w must be in \\[1, block=4\\], got 5"):
        load_config(TrainConfig, base, ["cosre.keep_w=5"])
    with pytest.raises(ConfigError, match="needs slots > 0"):
        load_config(TrainConfig, base, ["cosre.slots=0"])
    with pytest.raises(ConfigError, match="distill must be >= 0, got -1"):
        load_config(TrainConfig, base, ["distill=-1"])
    with pytest.raises(ConfigError, match="distill: .* stage 'cot' compresses nothing"):
        load_config(TrainConfig, base, ["stage=cot", "distill=0.5"])
    cfg = load_config(TrainConfig, base, [])
    assert cfg.stage == "cosre" and cfg.cosre.every > 0 and cfg.cosre.slots > 0


def test_cosre_stage_fine_tunes_the_model_under_the_press_and_decodes_with_it(maze_data, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    start = build_tiny("tiny-internvl", tmp_path / "start")
    cfg = load_config(TrainConfig, REPO / "configs/train/cosre-maze.yaml", [
        f"data.path={maze_data}", f"storage={tmp_path / 'runs'}", f"init_from={start}", "run_name=c",
        "optim={lr: 0.001, batch_size: 8, epochs: 1, warmup_steps: 2}", "eval.max_examples=8",
        "eval.epoch_examples=8", "eval.batch_size=8", "eval.modes={cot: {max_new_tokens: 24}}", "distill=0.5"])
    out = train.run_stage(cfg)

    assert out["train"]["steps_per_epoch"] == 5  # 80 rows, 2 workers × 8
    before, after = load_backbone("tiny-internvl", start), load_backbone("tiny-internvl", Path(out["export"]))
    changed = [n for (n, a), b in zip(before.model.state_dict().items(), after.model.state_dict().values())
               if not torch.equal(a, b)]
    assert any("vision_tower" in n for n in changed) and any("layers.1." in n for n in changed)
    cot = out["eval"]["cot"]  # the export decodes under the stage's press: a compressed cache
    assert cot["n"] == 8 and cot["kv_fraction_prefill"] < 0.8 and cot["retained_shared_prefill"] > 0
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.params["stage"] == "cosre" and "cot_kv_fraction_peak" in run.data.metrics
    assert run.data.metrics["distill_kl"] > 0  # the starting model, reading the whole cache, taught it
