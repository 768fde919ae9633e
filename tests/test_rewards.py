"""Rewards: correctness (grid-world regex, CinePile's official rules) and every length penalty on
hand-computed cases; composition and logging names; bad paths, signatures and settings named."""

from __future__ import annotations

import json
import math

import pytest

from mmreason.config import ConfigError, load_config
from mmreason.train.config import TrainConfig
from mmreason.train.rewards import RewardTerm, Rewards, check_terms
from mmreason.train.rewards.correctness import cinepile_correct, gridworld_correct, multiple_choice_correct
from mmreason.train.rewards.length import dapo_overlong_penalty, kimi_length_penalty, threshold_length_penalty

LENGTH = "mmreason.train.rewards.length"


@pytest.mark.parametrize("reply, right", [
    ("Go up. Now at row 0, column 1.\nThe answer is B.", True),
    ("The answer is C.", False),
    ("The answer is C.\nThe answer is B.", True),   # the last answer counts
    ("B", False),                                   # no answer sentence
    ("", False),
])
def test_gridworld_correct_reads_the_answer_sentence(reply, right):
    assert gridworld_correct("maze", reply, "B", {}) == {"accuracy": float(right)}


@pytest.mark.parametrize("reply, right", [
    ("The answer is B.", True), ("The answer is C.", False),             # our models' sentence → its letter
    ("Answer: B) The red car", True), ("Answer: B) A blue car", False),  # official rules otherwise
    ("the red car", True), ("the red car.", False),  # official: the text as the key but for case
    ("B", True), ("I think so", False),
])
def test_cinepile_correct_uses_the_official_rules(reply, right):
    extra = {"meta": {"answer_key": "The red car", "answer_key_position": 1}, "choices": []}
    assert cinepile_correct("cinepile", reply, "B", extra) == {"accuracy": float(right)}
    assert multiple_choice_correct("cinepile", reply, "B", extra) == {"accuracy": float(right)}


def test_multiple_choice_correct_dispatches_on_the_task():
    # "Answer: B" is right for CinePile's rules, not for the grid-world regex
    assert multiple_choice_correct("cinepile", "Answer: B", "B", {"meta": {"answer_key": "x"}})["accuracy"] == 1.0
    assert multiple_choice_correct("maze", "Answer: B", "B", {"meta": {}})["accuracy"] == 0.0


def _len(n: int, **more) -> dict:
    return {"length": n, **more}


@pytest.mark.parametrize("kind, factor, length, expected", [
    ("linear", 0.01, 5, 0.0),               # under the threshold: nothing
    ("linear", 0.01, 10, 0.0),              # at it: nothing
    ("linear", 0.01, 30, -0.2),             # 20 over × 0.01
    ("quadratic", 0.001, 30, -0.4),         # 20² × 0.001
    ("quadratic", 0.001, 20, -0.1),         # 10² × 0.001
    ("exponential", 0.01, 30, -(math.e ** 0.2 - 1)),   # e^(0.01·20) − 1 = 0.2214
    ("exponential", 0.05, 30, -0.5),        # e − 1 = 1.718, capped at max_penalty 0.5
    ("linear", 0.01, 110, -0.5),            # 1.0, capped
])
def test_threshold_length_penalty_by_hand(kind, factor, length, expected):
    out = threshold_length_penalty("maze", "", "A", _len(length), threshold=10, factor=factor, kind=kind)
    assert out == {"length_penalty": pytest.approx(expected, abs=1e-12)}


def test_threshold_penalty_keeps_the_accuracy_component():
    rewards = Rewards([RewardTerm(), RewardTerm(f"{LENGTH}.threshold_length_penalty",
                                                kwargs={"threshold": 10, "factor": 0.01, "kind": "linear"})])
    right_long = rewards.score("maze", "The answer is A.", "A", _len(1000))
    wrong_short = rewards.score("maze", "The answer is B.", "A", _len(3))
    right_short = rewards.score("maze", "The answer is A.", "A", _len(3))
    assert right_long == {"accuracy": 1.0, "length_penalty": -0.5, "total": 0.5}   # capped: still above wrong
    assert wrong_short == {"accuracy": 0.0, "length_penalty": 0.0, "total": 0.0}
    assert right_short["total"] == 1.0


@pytest.mark.parametrize("length, correct, expected", [
    (10, True, 0.5), (20, True, 0.0), (30, True, -0.5),      # λ = 0.5 − (len − 10) / (30 − 10)
    (10, False, 0.0), (20, False, 0.0), (30, False, -0.5),   # wrong: min(0, λ)
])
def test_kimi_length_penalty_by_hand(length, correct, expected):
    extra = _len(length, group_lengths=[10, 20, 30], accuracy=float(correct))
    assert kimi_length_penalty("maze", "", "A", extra) == {"length_penalty": expected}


def test_kimi_penalty_is_zero_for_a_group_of_equal_lengths_and_reads_accuracy_from_the_term_before():
    assert kimi_length_penalty("maze", "", "A", _len(7, group_lengths=[7, 7], accuracy=1.0)) == {"length_penalty": 0.0}
    rewards = Rewards([RewardTerm(), RewardTerm(f"{LENGTH}.kimi_length_penalty", weight=0.5)])
    out = rewards.score("maze", "The answer is A.", "A", _len(10, group_lengths=[10, 30]))
    assert out == {"accuracy": 1.0, "length_penalty": 0.25, "total": 1.25}


@pytest.mark.parametrize("length, expected", [(50, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (120, -1.0)])
def test_dapo_overlong_penalty_by_hand(length, expected):
    # L_max 100, L_cache 20: zero up to 80, linear to −1 at 100
    assert dapo_overlong_penalty("maze", "", "A", _len(length), cache_length=20, max_length=100) == \
        {"length_penalty": expected}
    # L_max defaults to the sampling budget
    assert dapo_overlong_penalty("maze", "", "A", _len(length, max_new_tokens=100), cache_length=20) == \
        {"length_penalty": expected}


def test_a_float_reward_is_one_component_named_after_the_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(data_source, solution_str, ground_truth, extra):\n    return -0.1 * extra['length']\n"
        "def wrong(solution_str):\n    return 1.0\n"
        "def nan(data_source, solution_str, ground_truth, extra):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = Rewards([RewardTerm(), RewardTerm("my_rewards.brevity", weight=2.0)]).score(
        "maze", "The answer is A.", "A", _len(3))
    assert out == {"accuracy": 1.0, "brevity": pytest.approx(-0.6), "total": pytest.approx(0.4)}
    with pytest.raises(ConfigError, match=r"rl.rewards\[0\].fn: reward 'my_rewards.wrong' has the signature "
                                          r"wrong\(solution_str\)"):
        check_terms([RewardTerm("my_rewards.wrong")])
    with pytest.raises(ValueError, match="returned nan=nan"):
        Rewards([RewardTerm("my_rewards.nan")]).score("maze", "", "A", _len(1))


@pytest.mark.parametrize("override, needle", [
    ("rl.rewards=[{fn: mmreason.train.rewards.length.no_such_penalty}]",
     r"rl.rewards\[0\].fn: module 'mmreason.train.rewards.length' has no reward function 'no_such_penalty'"),
    ("rl.rewards=[{fn: no_such_package.rewards.f}]", r"rl.rewards\[0\].fn: cannot import module 'no_such_package.rewards'"),
    ("rl.rewards=[{fn: accuracy}]", r"rl.rewards\[0\].fn: 'accuracy' is not a dotted path"),
    ("rl.rewards=[{fn: mmreason.train.rewards.correctness.LETTERS}]", r"is a str, not a function"),
    ("rl.rewards=[{fn: mmreason.train.stages.rl.group_advantages}]",
     r"reward 'mmreason.train.stages.rl.group_advantages' has the signature group_advantages\(rewards"),
    ("rl.rewards=[{fn: mmreason.train.rewards.length.threshold_length_penalty, kwargs: {threshold: 5}}]",
     r"cannot be called as fn\(data_source, solution_str, ground_truth, extra, \*\*kwargs\) with kwargs "
     r"\['threshold'\]: missing a required argument: 'factor'"),
    ("rl.rewards=[]", "rl.rewards: give at least one reward term"),
    ("rl.group_size=1", "rl.group_size must be >= 2"),
    ("rl.sampling.do_sample=false", "rl.sampling.do_sample must be true"),
])
def test_bad_rl_config_is_named_when_the_config_loads(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainConfig, None, ["stage=rl", override])


def test_bad_reward_settings_fail_on_a_dry_run():
    row = {"id": "maze-1", "task": "maze", "meta": json.dumps({"size": 3}), "choices": ["a", "b", "c", "d"],
           "answer": "A"}
    rewards = Rewards([RewardTerm(), RewardTerm(f"{LENGTH}.threshold_length_penalty",
                                                kwargs={"threshold": 5, "factor": 0.1, "kind": "cubic"})])
    with pytest.raises(ConfigError, match=r"row maze-1 failed: ValueError: threshold_length_penalty: kind must be one "
                                          r"of \('linear', 'quadratic', 'exponential'\), got 'cubic'"):
        rewards.dry_run(row, max_new_tokens=64)
    ok = Rewards([RewardTerm(), RewardTerm(f"{LENGTH}.dapo_overlong_penalty", kwargs={"cache_length": 16})])
    assert ok.dry_run(row, max_new_tokens=64) == {"accuracy": 1.0, "length_penalty": 0.0, "total": 1.0}
