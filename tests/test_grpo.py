"""GRPO: advantages, log-probs and the clipped loss on hand-computed cases; a rollout + update on a
tiny model moves probability towards the better replies (cot and coconut sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from mmreason.latent.coconut import GenerationSettings
from mmreason.models import build_tiny, load_backbone
from mmreason.models.base import IGNORE
from mmreason.tasks import RenderOptions, generate_example, get_task
from mmreason.train.stages.rl import (RLConfig, TorchEngine, group_advantages, grpo_step, policy_loss, rollout,
                                 sequence_logprobs, token_logprobs)
from mmreason.train.rewards import RewardTerm, Rewards

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_group_advantages_by_hand():
    # group [1, 0, 0, 1]: mean .5, sample std √(4·.25/3) = .57735 → ±.866
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]]))
    assert adv[0].tolist() == pytest.approx([0.8660, -0.8660, -0.8660, 0.8660], abs=1e-4)
    # [2, 0, 1, 1]: mean 1, std √(2/3) = .8165 → [1.2247, −1.2247, 0, 0]
    assert adv[1].tolist() == pytest.approx([1.2247, -1.2247, 0.0, 0.0], abs=1e-4)
    assert adv[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # every reply scored the same: no signal
    centred = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale_by_std=False)
    assert centred.tolist() == [[0.5, -0.5, -0.5, 0.5]]
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))


def test_token_logprobs_by_hand():
    # vocabulary of 2, logits [0, ln 3] → p = [1/4, 3/4]; position t predicts label t+1
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    logp, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True]]
    assert logp.flatten().tolist() == pytest.approx([math.log(0.75), math.log(0.25)])


def test_policy_loss_by_hand():
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    same = torch.zeros(2, 2)
    # ρ = 1: per token −A → [−1, −1], [1]; token-mean (−1 −1 +1)/3; per reply first: (−1 + 1)/2
    loss, stats = policy_loss(same, same, adv, mask)
    assert float(loss) == pytest.approx(-1 / 3) and stats["clip_frac"] == 0.0
    loss, _ = policy_loss(same, same, adv, mask, agg="seq-mean-token-mean")
    assert float(loss) == pytest.approx(0.0)
    # ρ = 1.5 (ε = .2): A = +1 clips to −1.2; A = −1 keeps 1.5 (pessimistic max)
    up = torch.full((2, 2), math.log(1.5))
    loss, stats = policy_loss(up, same, adv, mask)
    assert float(loss) == pytest.approx((-1.2 - 1.2 + 1.5) / 3)
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    # ρ = .5: A = +1 keeps −.5; A = −1 clips to .8
    down = torch.full((2, 2), math.log(0.5))
    loss, _ = policy_loss(down, same, adv, mask)
    assert float(loss) == pytest.approx((-0.5 - 0.5 + 0.8) / 3)
    # DAPO's clip-higher: ε_high = .28 lets ρ = 1.5 pass up to 1.28
    loss, _ = policy_loss(up, same, adv, mask, clip_eps_high=0.28)
    assert float(loss) == pytest.approx((-1.28 - 1.28 + 1.5) / 3)
    # KL (k3) to the reference: d = log π_ref − log π = ln 2 → 2 − ln 2 − 1 = .30685 per token
    ref = torch.full((2, 2), math.log(2.0))
    loss, stats = policy_loss(same, same, adv, mask, ref_logp=ref, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(1 - math.log(2))
    assert float(loss) == pytest.approx(-1 / 3 + 0.1 * (1 - math.log(2)))


def test_policy_gradient_at_ratio_one_is_minus_advantage_over_tokens():
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), mask)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, 2 / 3, 0.0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny("tiny-internvl", tmp_path_factory.mktemp("tiny"), seed=0)
    rows = [generate_example(get_task("maze"), 3, "train", i, 0, FRACTIONS, RenderOptions(64, False))
            for i in range(3)]
    return path, rows


def test_a_grpo_step_moves_probability_towards_the_better_replies(tiny, tmp_path, monkeypatch):
    path, rows = tiny
    (tmp_path / "toy_reward.py").write_text(  # shorter text is better
        "def brief(data_source, solution_str, ground_truth, extra):\n    return -len(solution_str) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    family = load_backbone("tiny-internvl", path)
    family.model.train()
    rl = RLConfig(group_size=4, rewards=[RewardTerm("toy_reward.brief")],
                  sampling=GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5))
    rewards = Rewards(rl.rewards)
    rows = rows[:2]
    ro = rollout(family, rows, rl, rewards, torch.Generator().manual_seed(1))
    assert ro.batch["input_ids"].shape[0] == len(rows) * 4 == len(ro.texts)
    assert ro.rewards.tolist() == pytest.approx([-len(t) / 100 for t in ro.texts])
    assert set(ro.components) == {"brief"}
    # labels are exactly the reply tokens (+ eos unless cut), prompt and padding ignored
    n_labelled = (ro.batch["labels"] != IGNORE).sum(1)
    assert n_labelled.tolist() == [int(n + (1 - t)) for n, t in zip(ro.lengths.tolist(), ro.truncated.tolist())]

    adv = group_advantages(ro.rewards.view(len(rows), 4)).flatten()
    assert (adv != 0).any(), "pick another seed: every group scored flat"
    with torch.no_grad():
        before, mask = sequence_logprobs(family, ro.batch)
    engine = TorchEngine(family.model, torch.optim.SGD(family.model.parameters(), lr=0.05))
    # replay the same replies: a step = this rollout's update (no sampling in between)
    logp, mask = sequence_logprobs(family, ro.batch)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask)
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after, _ = sequence_logprobs(family, ro.batch)
    gain = ((after - before) * mask).sum(1)
    assert float(gain[adv > 0].mean()) > float(gain[adv < 0].mean())


@pytest.mark.parametrize("mode", ["cot", "coconut"])
def test_grpo_step_reports_generation_and_update_and_changes_the_model(tiny, mode):
    path, rows = tiny
    family, reference = load_backbone("tiny-internvl", path), load_backbone("tiny-internvl", path)
    family.model.train()
    rl = RLConfig(group_size=2, mode=mode, kl_coef=0.05, updates_per_batch=2,
                  rewards=[RewardTerm(), RewardTerm("mmreason.train.rewards.length.threshold_length_penalty",
                                                    kwargs={"threshold": 4, "factor": 0.01})],
                  sampling=GenerationSettings(max_new_tokens=8, do_sample=True))
    weights = family.model.get_input_embeddings().weight.detach().clone()
    engine = TorchEngine(family.model, torch.optim.AdamW(family.model.parameters(), lr=1e-3))
    m = grpo_step(engine, family, rows[:2], rl, Rewards(rl.rewards), torch.Generator().manual_seed(0), reference,
                  n_latent_steps=2 if mode == "coconut" else 0)
    assert {"reward_total", "reward_accuracy", "reward_length_penalty", "response_length", "kl", "clip_frac",
            "gen_seconds", "update_seconds"} <= set(m)
    assert m["samples"] == 4 and m["gen_seconds"] > 0 and m["update_seconds"] > 0
    assert m["reward_total"] == pytest.approx(m["reward_accuracy"] + m["reward_length_penalty"])
    assert not torch.equal(weights, family.model.get_input_embeddings().weight)
