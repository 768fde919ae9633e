"""CinePile's official scoring (Rawal et al., arXiv 2405.08813; the benchmark's evaluation code),
and accuracy by question category and hard split.

    score_cinepile("Answer: B) The red car", answer_key_position=1, answer_key="The red car")  # True

The rules, in order:
1. A reply that is one letter (surrounding spaces, brackets and a trailing period aside: `b`,
   `(B)`, `B.`) is judged by that letter alone.
2. Else a reply with `Answer: X` (any case), optionally followed by option text (`Answer: B) The
   red car`), is judged by the letter, and, when text follows, that text must equal `answer_key`
   ignoring case, surrounding spaces and trailing punctuation. A reply shaped like an option line
   (`B) The red car`, `B. The red car`) reads the same way.
3. A reply with no letter is right only when it equals `answer_key` (same normalisation).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

LETTERS = "ABCDE"
_STRIP = " \t\n\r.,;:!?\"'`*()[]"
_BARE = re.compile(r"[\s(\[]*([A-Ea-e])[\s)\].:]*")
_ANSWER = re.compile(r"answer\s*:\**\s*[(\[]?([A-E])\b[)\].:]?(.*)", re.IGNORECASE | re.DOTALL)
_OPTION = re.compile(r"\s*[(\[]?([A-E])[)\].:]\s+(.*)", re.IGNORECASE | re.DOTALL)


def _norm(text: str) -> str:
    return " ".join(text.strip(_STRIP).split()).casefold()


def score_cinepile(reply: str, answer_key_position: int, answer_key: str) -> bool:
    """True when `reply` answers the question whose right option is `LETTERS[answer_key_position]`
    with text `answer_key`, by the rules in the module docstring."""
    letter = LETTERS[answer_key_position]
    bare = _BARE.fullmatch(reply)
    if bare:
        return bare.group(1).upper() == letter
    found = _ANSWER.search(reply) or _OPTION.match(reply)
    if found:
        said, text = found.group(1).upper(), _norm(found.group(2).splitlines()[0] if found.group(2).strip() else "")
        return said == letter and (not text or text == _norm(answer_key))
    return _norm(reply) == _norm(answer_key)


def cinepile_accuracy(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per `question_category` and per hard split, from records with `correct`
    (bool), `question_category` and `hard_split` (bool) — e.g. a question's meta plus its score."""
    groups: dict[str, dict[str, list[bool]]] = {"category": {}, "hard_split": {}}
    overall: list[bool] = []
    for r in results:
        overall.append(bool(r["correct"]))
        groups["category"].setdefault(str(r["question_category"]), []).append(bool(r["correct"]))
        split = {True: "hard", False: "not hard"}.get(r.get("hard_split"), "unknown")
        groups["hard_split"].setdefault(split, []).append(bool(r["correct"]))

    def acc(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return {
        "accuracy": acc(overall),
        "n": len(overall),
        "by_category": {k: {"accuracy": acc(v), "n": len(v)} for k, v in sorted(groups["category"].items())},
        "by_hard_split": {k: {"accuracy": acc(v), "n": len(v)} for k, v in sorted(groups["hard_split"].items())},
    }
