"""The one example schema every pipeline writes and every stage reads (see DESIGN.md).

Rows are plain dicts with encoded images (`bytes`) — that is what sits in Parquet. `Example` is
the decoded view (PIL images, `meta` as a dict) for notebooks, collators and tests.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

SCHEMA_VERSION = 1

TASK_NAMES = ("maze", "frozenlake", "minibehavior", "cinepile", "aokvqa")
SPLITS = ("train", "val", "test")
IMAGE_PLACEHOLDER = "<image>"
# A video question's prompt holds one <video> where its clip's frames go; the frames are stored
# once, in a clip row that `meta.clip_id` names, and `images` stays empty until they are joined in
# (`mmreason.data.cinepile.attach_frames` turns <video> into one <image> per frame).
VIDEO_PLACEHOLDER = "<video>"

EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("steps", pa.list_(pa.string()), nullable=False),
        pa.field("step_images", pa.list_(pa.binary()), nullable=False),
        pa.field("choices", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
    ]
)
COLUMNS = tuple(EXAMPLE_SCHEMA.names)


class BadRowError(ValueError):
    """A row breaks the example schema; the message names the row id and the column."""


def validate_row(row: dict[str, Any]) -> None:
    """Check one encoded row against the schema's invariants."""
    rid = row.get("id", "<no id>")
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise BadRowError(f"row {rid}: missing columns {missing}")
    if row["task"] not in TASK_NAMES:
        raise BadRowError(f"row {rid}: unknown task {row['task']!r}")
    if row["split"] not in SPLITS:
        raise BadRowError(f"row {rid}: unknown split {row['split']!r}")
    n_placeholders = row["prompt"].count(IMAGE_PLACEHOLDER)
    if n_placeholders != len(row["images"]):
        raise BadRowError(
            f"row {rid}: prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
            f"but 'images' has {len(row['images'])} entries"
        )
    n_videos = row["prompt"].count(VIDEO_PLACEHOLDER)
    if n_videos > 1 or (n_videos and row["images"]):
        raise BadRowError(
            f"row {rid}: a prompt holds at most one {VIDEO_PLACEHOLDER}, and only with 'images' empty "
            f"(got {n_videos} and {len(row['images'])} images)"
        )
    if row["step_images"] and len(row["step_images"]) != len(row["steps"]):
        raise BadRowError(
            f"row {rid}: 'step_images' has {len(row['step_images'])} entries for {len(row['steps'])} steps"
        )
    if not isinstance(row["meta"], str):
        raise BadRowError(f"row {rid}: 'meta' must be a JSON string")


@dataclass
class Example:
    """A decoded example: images as PIL, meta as a dict."""

    id: str
    task: str
    split: str
    prompt: str
    images: list[Image.Image]
    steps: list[str]
    step_images: list[Image.Image]
    choices: list[str]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def decode_image(data: bytes) -> Image.Image:
    """PIL image (RGB) from encoded PNG/JPEG bytes."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_row(row: dict[str, Any]) -> Example:
    """Decode one Parquet row (dict) into an `Example`."""
    return Example(
        id=row["id"],
        task=row["task"],
        split=row["split"],
        prompt=row["prompt"],
        images=[decode_image(b) for b in row["images"]],
        steps=list(row["steps"]),
        step_images=[decode_image(b) for b in row["step_images"]],
        choices=list(row["choices"]),
        answer=row["answer"],
        meta=json.loads(row["meta"]),
    )
