"""Which rows a stage reads: the data section of a training or evaluation config, and the held-out
rows (interleaved across tasks and grid sizes) that per-epoch evaluation, the final evaluation and
press evaluation all use."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import zip_longest

from mmreason.data.reader import read_table


@dataclass
class DataConfig:
    path: str = "runs/quickstart/data/gridworld"
    """A dataset directory written by a mmreason pipeline (it holds manifest.json)."""
    tasks: list[str] = field(default_factory=lambda: ["maze"])
    sizes: list[int] | None = field(default_factory=lambda: [3])
    """Grid sizes to train and evaluate on (None = all)."""
    eval_split: str = "test"
    eval_path: str | None = None
    """Dataset directory of the held-out rows (None = `path`; CinePile writes one split per directory)."""
    max_train_rows: int | None = None
    hard_split: bool | None = None
    """CinePile: train and evaluate on hard (true) or not-hard (false) questions only; null = both."""
    visual_reliance: bool | None = None
    """CinePile: only questions that do (true) or do not (false) rely on the visuals; null = both."""


def held_out_rows(data: DataConfig, limit: int | None, num_frames: int | None = None) -> list[dict]:
    """Up to `limit` rows of the eval split (from `data.eval_path`, else `data.path`) for the
    tasks, sizes and CinePile filters of `data`, interleaved across tasks and sizes so a cut keeps
    every one of them; video questions come with their frames
    (`num_frames` of each clip, None = all)."""
    from mmreason.data.cinepile import matches_filters, video_rows

    root = data.eval_path or data.path
    groups: dict[tuple, list[dict]] = {}
    for row in read_table(root, split=data.eval_split).to_pylist():
        meta = json.loads(row["meta"])
        size = meta.get("size")
        if row["task"] in data.tasks and (data.sizes is None or size in data.sizes) \
                and matches_filters(meta, data.hard_split, data.visual_reliance):
            groups.setdefault((row["task"], size), []).append(row)
    interleaved = [row for batch in zip_longest(*groups.values()) for row in batch if row is not None]
    return video_rows(interleaved if limit is None else interleaved[:limit], root, num_frames)
