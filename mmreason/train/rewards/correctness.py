"""Correctness rewards for multiple-choice answers: +1 for the right option, 0 otherwise.

Every reward in mmreason is a plain function with verl's fixed signature,

    reward(data_source: str, solution_str: str, ground_truth: str, extra: dict) -> float | dict[str, float]

where `data_source` is the row's task, `solution_str` the decoded reply, `ground_truth` the answer
letter and `extra` what else the row carries (`meta`, `choices`) plus facts about the reply
(`length`, …; see `mmreason.train.rewards`). Correctness rewards return `{"accuracy": 0 or 1}`, the
component later length penalties read and MLflow logs as `reward_accuracy`.
"""

from __future__ import annotations

from typing import Any

from mmreason.eval.cinepile import LETTERS, score_cinepile
from mmreason.tasks import parse_answer


def gridworld_correct(data_source: str, solution_str: str, ground_truth: str, extra: dict[str, Any]) -> dict[str, float]:
    """Grid-world tasks (MVoT's rule): the letter of the last `The answer is X.` must be the answer."""
    return {"accuracy": float(parse_answer(solution_str) == ground_truth)}


def cinepile_correct(data_source: str, solution_str: str, ground_truth: str, extra: dict[str, Any]) -> dict[str, float]:
    """CinePile's official scoring (`score_cinepile`). Our models end with `The answer is X.`, which
    the official rules do not read, so that letter is scored as a one-letter reply; any other
    reply (`Answer: B) …`, the option text) goes to the official rules as it is."""
    if ground_truth not in LETTERS:
        raise ValueError(f"cinepile_correct: ground truth {ground_truth!r} is not a letter {LETTERS}")
    meta = extra.get("meta") or {}
    position = LETTERS.index(ground_truth)
    answer_key = meta.get("answer_key")
    if answer_key is None:
        choices = extra.get("choices") or []
        answer_key = choices[position] if position < len(choices) else ""
    reply = parse_answer(solution_str) or solution_str.strip()
    return {"accuracy": float(score_cinepile(reply, position, answer_key))}


def multiple_choice_correct(data_source: str, solution_str: str, ground_truth: str,
                            extra: dict[str, Any]) -> dict[str, float]:
    """+1/0 by the rule of the row's task: CinePile's official scoring for `cinepile`, the answer
    regex for everything else (maze, frozenlake, minibehavior, aokvqa)."""
    if data_source == "cinepile":
        return cinepile_correct(data_source, solution_str, ground_truth, extra)
    return gridworld_correct(data_source, solution_str, ground_truth, extra)
