"""Video question answering on CinePile-format shards: pick the questions (split, hard /
visual-reliance filters, `max_videos`), answer them with a backbone in any evaluation mode —
`coconut` puts the latent thoughts after the frames — and score them by CinePile's official rules
(`scoring="lenient"`: ours, named in the results; `mmreason.eval.cinepile`).
The result is what seed 004's inference script writes: overall accuracy, accuracy by question
category and hard split, and every question's answer — under a KV press if given, with the KV
cache metered as `jobs.evaluate` meters it.

    rows = select_questions("runs/data/cinepile-test", split="test", hard_split=True)
    results = answer_questions(family, video_rows(rows, "runs/data/cinepile-test", 8), "cot", settings)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmreason.data.cinepile import DATASET_NAME, matches_filters
from mmreason.eval.cinepile import LETTERS, Scoring, cinepile_accuracy, score_cinepile
from mmreason.eval.press_eval import kv_columns, metered_press
from mmreason.eval.runner import evaluate
from mmreason.latent.coconut import GenerationSettings
from mmreason.models.base import Family

_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)


def select_questions(root: str | Path, split: str = "test", hard_split: bool | None = None,
                     visual_reliance: bool | None = None, max_videos: int | None = None) -> list[dict[str, Any]]:
    """Question rows of `split` (frames not joined yet) that pass the filters, from the first
    `max_videos` clips in shard order."""
    from mmreason.data.reader import read_table

    rows, clips = [], []
    for row in read_table(root, split=split, task=DATASET_NAME).to_pylist():
        meta = json.loads(row["meta"])
        if not matches_filters(meta, hard_split, visual_reliance):
            continue
        if meta["clip_id"] not in clips:
            if max_videos is not None and len(clips) >= max_videos:
                continue
            clips.append(meta["clip_id"])
        rows.append(row)
    return rows


def answer_questions(family: Family, rows: list[dict[str, Any]], mode: str, settings: GenerationSettings,
                     n_latent_steps: int = 0, c_thought: int = 1, batch_size: int = 8, seed: int = 0,
                     scoring: Scoring = "official", press: Any = None) -> dict[str, Any]:
    """Answer every row (frames joined) under `press` (a `mmreason.kv` press; None: none) with the
    KV cache metered, and score its whole reply by CinePile's rules (`scoring`); accuracy overall,
    by category and by hard split, the KV columns `jobs.evaluate` reports (`kv_columns`: bytes and
    fractions after the prompt and at the peak, retained per modality, timing) and one record per
    question."""
    with metered_press(family, press) as meter:
        res = evaluate(family, rows, mode, settings, n_latent_steps, c_thought, batch_size, seed)
    samples = score_replies(rows, res.predictions, scoring)
    summary = cinepile_accuracy(samples)
    kv = kv_columns(meter, sum(p["n_tokens"] for p in res.predictions))
    return {"mode": mode, "scoring": scoring, **summary, "tokens_per_answer": res.tokens_per_answer,
            "latents_per_answer": res.latents_per_answer, **kv, "samples": samples}


def score_replies(rows: list[dict[str, Any]], predictions: list[dict[str, Any]],
                  scoring: Scoring = "official") -> list[dict[str, Any]]:
    """One record per question: the row's CinePile fields and its model reply (`predictions`, in
    row order) scored whole by CinePile's rules (`scoring`)."""
    samples = []
    for row, pred in zip(rows, predictions):
        meta = json.loads(row["meta"])
        question = _QUESTION.search(row["prompt"])
        position = LETTERS.index(row["answer"])
        answer_key = meta.get("answer_key", row["choices"][position])
        samples.append({
            "id": row["id"], "clip_id": meta.get("clip_id"), "question": question.group(1) if question else "",
            "question_category": meta.get("question_category"), "hard_split": meta.get("hard_split"),
            "visual_reliance": meta.get("visual_reliance"), "answer": row["answer"],
            "answer_key": meta.get("answer_key"), "prediction": pred["prediction"], "output": pred["output"],
            "correct": score_cinepile(pred["output"], position, answer_key, scoring), "n_tokens": pred["n_tokens"],
        })
    return samples


__all__ = ["answer_questions", "score_replies", "select_questions"]
