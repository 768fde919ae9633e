"""CinePile's scoring (Rawal et al., arXiv 2405.08813), and accuracy by question category and
hard split.

    score_cinepile("Answer: B) The red car", answer_key_position=1, answer_key="The red car")  # True

`scoring="official"` (the default) is CinePile's own evaluation code, transcribed: `normalize_string`
and `evaluate_semantic_similarity` as lmms-eval runs them for its `cinepile` task
(EvolvingLMMs-Lab/lmms-eval, `lmms_eval/tasks/cinepile/utils.py`, commit 08c9bda), which adds the
one-letter rule to the benchmark's first release. It reads, after deleting every `*` and
surrounding whitespace:
1. a reply that is one letter A–E, any case (`b`, `**B**`): judged by that letter alone;
2. else the first `Answer:` (any case) followed by a letter, an optional `)` then `.`, and text to
   the end of that line (`Answer: B) The red car`, `answer:b.`): the letter must be right and, when
   text follows, the text must equal `answer_key` ignoring case only. The letter is not a word
   (`Answer: Because…` says B) and nothing may stand before it (`Answer: (B)` says no letter);
3. else the whole reply must equal `answer_key` ignoring case only (`the red car.` is wrong;
   `(B)`, `B.`, `B)` and our models' `The answer is B.` are wrong too).

`scoring="lenient"` is ours, and results scored with it say so: it first reads the last `The
answer is X.` (how models trained here end) as the reply, takes one letter in brackets or with a
trailing period (`(B)`, `B.`), an option line without `Answer:` (`B) The red car`), and compares
option text ignoring case, runs of spaces and surrounding punctuation.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Literal

LETTERS = "ABCDE"
SCORINGS = ("official", "lenient")
Scoring = Literal["official", "lenient"]


def normalize_string(reply: str) -> tuple[str | None, str]:
    """CinePile's `normalize_string`: (option letter or None, option text) of a reply."""
    reply = reply.replace("*", "").strip()
    if re.match(r"^[A-E]$", reply, re.IGNORECASE):
        return reply.upper(), ""
    found = re.search(r"Answer:\s*([A-E])\)?\.?\s*(.*)", reply, re.IGNORECASE)
    if found:
        return found.group(1).upper(), found.group(2).strip()
    return None, reply.strip()


def _official(reply: str, letter: str, answer_key: str) -> bool:
    """CinePile's `evaluate_semantic_similarity` (its score, as a bool)."""
    said, text = normalize_string(reply)
    if said:  # the answer key's letter is never empty
        if said != letter:
            return False
        return not (answer_key and text) or answer_key.lower() == text.lower()
    return answer_key.lower() == text.lower()


_STRIP = " \t\n\r.,;:!?\"'`*()[]"
_BARE = re.compile(r"[\s(\[]*([A-Ea-e])[\s)\].:]*")
_ANSWER = re.compile(r"answer\s*:\**\s*[(\[]?([A-E])\b[)\].:]?(.*)", re.IGNORECASE | re.DOTALL)
_OPTION = re.compile(r"\s*[(\[]?([A-E])[)\].:]\s+(.*)", re.IGNORECASE | re.DOTALL)


def _norm(text: str) -> str:
    return " ".join(text.strip(_STRIP).split()).casefold()


def _lenient(reply: str, letter: str, answer_key: str) -> bool:
    from mmreason.tasks import parse_answer

    reply = parse_answer(reply) or reply
    bare = _BARE.fullmatch(reply)
    if bare:
        return bare.group(1).upper() == letter
    found = _ANSWER.search(reply) or _OPTION.match(reply)
    if found:
        said, text = found.group(1).upper(), _norm(found.group(2).splitlines()[0] if found.group(2).strip() else "")
        return said == letter and (not text or text == _norm(answer_key))
    return _norm(reply) == _norm(answer_key)


def score_cinepile(reply: str, answer_key_position: int, answer_key: str, scoring: Scoring = "official") -> bool:
    """True when `reply` answers the question whose right option is `LETTERS[answer_key_position]`
    with text `answer_key`, by the rules of `scoring` (module docstring)."""
    letter = LETTERS[answer_key_position]
    if scoring == "official":
        return _official(reply, letter, answer_key)
    if scoring == "lenient":
        return _lenient(reply, letter, answer_key)
    raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")


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
