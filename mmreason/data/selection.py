"""Which rows a stage reads: the data section of a training or evaluation config; the validation
rows that training's per-epoch evaluation reads (it picks the `best` export and ranks checkpoints);
and the held-out rows of `eval_split` that the final evaluation and press evaluation report on.
Both are interleaved across tasks and grid sizes, so a cut keeps every one of them.

A dataset without a validation split (CinePile writes train and test) gets one carved out of train:
whole groups (a clip's questions, a layout's examples, else a row) ranked by a seeded hash, the
first `val_fraction` of them held out; the training job leaves the same groups out of the rows it
trains on (`carved_validation`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, Literal

from mmreason.config import ConfigError
from mmreason.data.reader import read_table
from mmreason.data.schema import SPLITS


@dataclass
class DataConfig:
    path: str = "runs/quickstart/data/gridworld"
    """A dataset directory written by a mmreason pipeline (it holds manifest.json)."""
    tasks: list[str] = field(default_factory=lambda: ["maze"])
    sizes: list[int] | None = field(default_factory=lambda: [3])
    """Grid sizes to train and evaluate on (None = all)."""
    eval_split: str = "test"
    """Split of the final evaluation that reports a stage's numbers (its `eval/` results and MLflow
    metrics) and of press evaluation; training never selects anything on it."""
    evaluate_on: Literal["eval_split", "val_split"] = "eval_split"
    """Which rows the final and press evaluations read: `eval_split` (the reported numbers), or the
    validation rows (`val_split`, carved out of train where there are none) — a sweep's trials are
    evaluated on these, because it selects on them; its Pareto front is then evaluated on `eval_split`."""
    eval_path: str | None = None
    """Dataset directory of the `eval_split` rows (None = `path`; CinePile writes one split per directory)."""
    val_split: str = "val"
    """Split of `path` that training's per-epoch evaluation reads: it picks the `best` export and ranks
    checkpoints. Where `path` has no rows in it, a slice of train is carved out (`val_fraction`)."""
    val_fraction: float = 0.05
    """Without `val_split` rows in `path`: the share of training groups (a clip's questions, a
    layout's examples, else a row; at least one) held out as validation rows and never trained on."""
    val_seed: int = 0
    """Seed of the hash that ranks the training groups `val_fraction` carves out."""
    max_train_rows: int | None = None
    hard_split: bool | None = None
    """CinePile: train and evaluate on hard (true) or not-hard (false) questions only; null = both."""
    visual_reliance: bool | None = None
    """CinePile: only questions that do (true) or do not (false) rely on the visuals; null = both."""

    def __post_init__(self) -> None:
        for name in ("eval_split", "val_split"):
            if getattr(self, name) not in SPLITS:
                raise ConfigError(f"data.{name}: unknown split {getattr(self, name)!r} (known: {', '.join(SPLITS)})")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def evaluated_split(self) -> str:
        """The split `held_out_rows` reads (`evaluate_on`): what an evaluation's results say they are on."""
        return self.val_split if self.evaluate_on == "val_split" else self.eval_split


def held_out_rows(data: DataConfig, limit: int | None, num_frames: int | None = None) -> list[dict]:
    """Up to `limit` rows of `data.eval_split` (from `data.eval_path`, else `data.path`) for the
    tasks, sizes and CinePile filters of `data`; video questions come with their frames
    (`num_frames` of each clip, None = all). What final evaluation reports on. With
    `data.evaluate_on: val_split` (a sweep's trials), `validation_rows` instead."""
    if data.evaluate_on == "val_split":
        return validation_rows(data, limit, num_frames)
    root = data.eval_path or data.path
    return _interleaved(_selected(data, root, data.eval_split), root, limit, num_frames)


def validation_rows(data: DataConfig, limit: int | None, num_frames: int | None = None) -> list[dict]:
    """Up to `limit` rows of `data.val_split` in `data.path` for the tasks, sizes and filters of
    `data` — or, where it has none, the train groups `carved_validation` holds out. What training's
    per-epoch evaluation (the `best` export, checkpoint ranking) reads; never `eval_split`."""
    rows = _selected(data, data.path, data.val_split)
    if not rows:
        held = carved_validation(data)
        rows = [row for row in _selected(data, data.path, "train") if validation_group(row) in held]
    return _interleaved(rows, data.path, limit, num_frames)


def training_rows(data: DataConfig, limit: int | None) -> list[dict]:
    """Up to `limit` rows of the train split in `data.path` for the tasks, sizes and filters of
    `data`, round-robin over (task, size) — what a fitting step before training reads (the tiny
    Anole's codebook). Rows a carved validation slice holds out are left out."""
    held = carved_validation(data) if data.val_split else frozenset()
    rows = [row for row in _selected(data, data.path, "train") if validation_group(row) not in held]
    return _interleaved(rows, data.path, limit, None)


def carved_validation(data: DataConfig) -> frozenset[str]:
    """The training groups (`validation_group`) held out as validation rows when `data.path` has no
    `val_split` rows for `data`'s selection; empty when it has some. Groups are ranked by a hash of
    `val_seed` and their key and the first `val_fraction` of them (at least one) taken, so the same
    config always holds out the same groups, whichever process asks."""
    if _selected(data, data.path, data.val_split, columns=("id", "task", "meta")):
        return frozenset()
    groups = sorted({validation_group(row) for row in _selected(data, data.path, "train", ("id", "task", "meta"))},
                    key=lambda key: hashlib.sha256(f"{data.val_seed}/{key}".encode()).digest())
    if len(groups) < 2:
        raise ConfigError(f"data.val_split: {data.path} has no {data.val_split!r} rows for tasks {data.tasks}, sizes "
                          f"{data.sizes} and this filter, and {len(groups)} training group(s): none can be held out "
                          f"for per-epoch evaluation (write a {data.val_split} split, or set eval.epoch_examples=0)")
    return frozenset(groups[: min(len(groups) - 1, max(1, round(data.val_fraction * len(groups))))])


def validation_group(row: dict[str, Any]) -> str:
    """What a carved validation slice keeps together: a CinePile clip's questions, a grid-world
    layout's examples, else the row itself (`row["meta"]` as stored: JSON text)."""
    meta = json.loads(row["meta"])
    if "clip_id" in meta:
        return f"clip:{meta['clip_id']}"
    if "layout_id" in meta:
        return f"layout:{row['task']}/{meta['layout_id']}"
    return f"row:{row['id']}"


def _selected(data: DataConfig, root: str, split: str, columns: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of `split` in `root` for the tasks, sizes and CinePile filters of `data`."""
    from mmreason.data.cinepile import matches_filters

    rows = []
    for row in read_table(root, split=split, columns=list(columns) if columns else None).to_pylist():
        meta = json.loads(row["meta"])
        if row["task"] in data.tasks and (data.sizes is None or meta.get("size") in data.sizes) \
                and matches_filters(meta, data.hard_split, data.visual_reliance):
            rows.append(row)
    return rows


def _interleaved(rows: list[dict], root: str, limit: int | None, num_frames: int | None) -> list[dict]:
    """Up to `limit` of `rows` taken round-robin over (task, size) so a cut keeps every one of them;
    video questions with `num_frames` of their clip's frames (None = all) from `root`."""
    from mmreason.data.cinepile import video_rows

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], json.loads(row["meta"]).get("size")), []).append(row)
    interleaved = [row for batch in zip_longest(*groups.values()) for row in batch if row is not None]
    return video_rows(interleaved if limit is None else interleaved[:limit], root, num_frames)
