"""A-OKVQA (Schwenk et al., "A-OKVQA: A Benchmark for Visual Question Answering using World
Knowledge", ECCV 2022; allenai/aokvqa) → the example schema, rationales as `steps`.

    from mmreason.data.aokvqa import import_aokvqa
    rows, skipped = import_aokvqa("aokvqa/aokvqa_v1p0_val.json", "coco")   # plain Python; pipelines/aokvqa.py shards it

The annotations are the official `aokvqa_v1p0_{split}.json` files (a list of records with
`question_id, question, choices, correct_choice_idx, direct_answers, rationales, image_id`); the
images are COCO 2017's, found as A-OKVQA's own loader does: `{coco_dir}/{split}2017/{image_id:012d}.jpg`
(both may be local or on an object store, `s3://…` / `gs://…`).
Images are stored as the original JPEG bytes (or resized, with `max_side`). The test split has no
answers or rationales: its rows have an empty `answer` and no steps. A record that breaks the format
or whose image is missing or unreadable is reported (its id and row) and skipped.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmreason import storage
from mmreason.config import ConfigError, config_hash
from mmreason.data.shards import SourceError
from mmreason.data.video import encode_jpeg
from mmreason.tasks.base import LETTERS, lettered

DATASET_NAME = "aokvqa"
ADAPTER_VERSION = 1  # bump when rows change for the same input and config
ANNOTATION_FILE = re.compile(r"aokvqa_v\d+p\d+_(train|val|test)\.json")
SPLITS = ("train", "val", "test")


@dataclass
class AokvqaConfig:
    source: str = ""
    """An `aokvqa_v1p0_{split}.json` file, or a folder holding them (local, s3:// or gs://)."""
    coco_dir: str = ""
    """The COCO 2017 root holding train2017/, val2017/, test2017/ (local, s3:// or gs://)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    """Which A-OKVQA splits to import (test has no answers)."""
    output_dir: str = "runs/data/aokvqa"
    """Where shards and manifest.json go: a local folder (shared storage on a cluster) or an s3:// / gs:// prefix."""
    rows_per_shard: int = 256
    """Rows per Parquet shard; a shard is one Ray task and the unit of resume."""
    max_side: int = 0
    """0 keeps COCO's JPEG bytes as they are; else resize so the longer side is at most this."""
    jpeg_quality: int = 90
    overwrite: bool = False
    """Rebuild shards that already exist instead of skipping them."""

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.max_side < 0:
            raise ConfigError(f"max_side must be >= 0, got {self.max_side}")
        for split in self.splits:
            if split not in SPLITS:
                raise ConfigError(f"splits: unknown A-OKVQA split {split!r} (known: {', '.join(SPLITS)})")


class RecordError(ValueError):
    """One A-OKVQA record is wrong; the message says how."""


def annotation_files(source: str | Path, splits: list[str]) -> dict[str, str]:
    """split → the location of its annotation file in `source` (a file or a folder)."""
    path = str(source)
    if not path or not storage.exists(path):
        raise FileNotFoundError(f"A-OKVQA source {source or '(none)'} does not exist (set source=PATH to an "
                                f"aokvqa_v1p0_<split>.json file or its folder)")
    is_file = not storage.is_dir(path)
    candidates = [path] if is_file else [storage.join(path, name) for name in storage.list_files(path, recursive=False)]
    found = {m.group(1): p for p in candidates if (m := ANNOTATION_FILE.fullmatch(posixpath.basename(p)))}
    if is_file and not found:
        raise SourceError(f"A-OKVQA source {path}: the file name must be aokvqa_v1p0_<split>.json "
                          f"(train, val or test) so its split is known")
    wanted = {s: found[s] for s in splits if s in found}
    if not wanted:
        raise SourceError(f"A-OKVQA source {path} holds no annotation file for splits {splits} "
                          f"(found: {', '.join(sorted(found)) or 'none'})")
    return wanted


def image_path(coco_dir: str | Path, split: str, image_id: int) -> Path | str:
    """Where A-OKVQA's loader finds an image: `{coco_dir}/{split}2017/{image_id:012d}.jpg` (a str URI when
    `coco_dir` is on an object store)."""
    name = f"{split}2017/{image_id:012d}.jpg"
    return storage.join(coco_dir, name) if storage.is_remote(coco_dir) else Path(coco_dir) / name


def _strings(record: dict, name: str, length: int | None = None) -> list[str]:
    value = record.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{name} must be a list of strings, got {value!r}")
    if length is not None and len(value) != length:
        raise RecordError(f"{name} must hold {length} entries, got {len(value)}")
    return value


def record_draft(record: Any, split: str, coco_dir: str) -> dict[str, Any]:
    """The schema fields of one record (the image named, not read); a bad record raises `RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"question must be a non-empty string, got {question!r}")
    image_id = record.get("image_id")
    if type(image_id) is not int or image_id < 0:
        raise RecordError(f"image_id must be a COCO image number, got {image_id!r}")
    choices = _strings(record, "choices", len(LETTERS))
    answered = split != "test"
    answer, steps = "", []
    if answered:
        idx = record.get("correct_choice_idx")
        if type(idx) is not int or not 0 <= idx < len(choices):
            raise RecordError(f"correct_choice_idx must be an integer 0–{len(choices) - 1}, got {idx!r}")
        answer, steps = LETTERS[idx], _strings(record, "rationales")
    prompt = (f"<image>\nQuestion: {question.strip()}\nOptions: {lettered(choices)}\n"
              f"Answer with the letter of the correct option.")
    return {
        "id": f"aokvqa-{split}-{record['question_id']}",
        "task": DATASET_NAME,
        "split": split,
        "prompt": prompt,
        "steps": steps,
        "choices": choices,
        "answer": answer,
        "image": str(image_path(coco_dir, split, image_id)),
        "meta": {k: record.get(k) for k in ("question_id", "image_id", "correct_choice_idx", "direct_answers",
                                            "difficult_direct_answer")},
    }


def direct_answer_score(prediction: str | None, direct_answers: list[str]) -> float:
    """A-OKVQA's direct-answer accuracy of one predicted answer string: min(1, exact matches among the
    ten annotators' `direct_answers` / 3) — `eval_aokvqa(..., multiple_choice=False)` in
    allenai/aokvqa `evaluation/eval_predictions.py`, which also leaves out `difficult_direct_answer`
    questions (`direct_answer_eligible`)."""
    if prediction is None:
        return 0.0
    return min(1.0, sum(prediction == answer for answer in direct_answers) / 3.0)


def direct_answer_eligible(meta: dict[str, Any]) -> bool:
    """Whether a row counts in the direct-answer score: it has direct answers and is not marked
    `difficult_direct_answer` (the official evaluation skips those)."""
    return bool(meta.get("direct_answers")) and meta.get("difficult_direct_answer") is not True


def read_image(path: str, max_side: int, quality: int) -> bytes:
    """The image's JPEG bytes (resized when `max_side`), once they decode; else `RecordError`."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise RecordError(f"image {path} not found") from None
    except OSError as exc:
        raise RecordError(f"image {path} cannot be read: {exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format not in ("JPEG", "PNG"):
                raise RecordError(f"image {path} is {img.format}, not JPEG or PNG")
            if max_side and max(img.size) > max_side:
                img.thumbnail((max_side, max_side))
                return encode_jpeg(img.convert("RGB"), quality)
    except RecordError:
        raise
    except Exception as exc:  # PIL raises many types for damaged data
        raise RecordError(f"image {path} is unreadable: {exc}") from None
    return data


@dataclass(frozen=True)
class AokvqaShard:
    split: str
    part: int
    drafts: tuple[dict[str, Any], ...]

    @property
    def relpath(self) -> str:
        return f"{self.split}/{DATASET_NAME}-{self.part:04d}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "AokvqaShard":
        data = json.loads(text)
        return cls(data["split"], data["part"], tuple(data["drafts"]))


def plan_import(cfg: AokvqaConfig) -> tuple[list[AokvqaShard], list[dict[str, str]], dict[str, str]]:
    """Every record checked and grouped into shards, the records that failed (`{"id", "error"}`, naming
    file and row), and the annotation files read."""
    files = annotation_files(cfg.source, cfg.splits)
    shards, errors = [], []
    for split, path in files.items():
        name = posixpath.basename(path)
        try:
            records = json.loads(storage.read_text(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"A-OKVQA annotations {path} cannot be read: {exc}") from None
        if not isinstance(records, list):
            raise SourceError(f"A-OKVQA annotations {path} must hold a JSON list of records")
        drafts, seen = [], set()
        for row, record in enumerate(records):
            qid = record.get("question_id") if isinstance(record, dict) else None
            rid = f"aokvqa-{split}-{qid}" if isinstance(qid, str) and qid else f"{name}[{row}]"
            try:
                if not isinstance(qid, str) or not qid:
                    raise RecordError(f"question_id must be a string, got {qid!r}")
                if rid in seen:
                    raise RecordError("duplicate question_id")
                drafts.append(record_draft(record, split, cfg.coco_dir))
                seen.add(rid)
            except RecordError as exc:
                errors.append({"id": rid, "error": f"{name} row {row}: {exc}"})
        for part, start in enumerate(range(0, len(drafts), cfg.rows_per_shard)):
            shards.append(AokvqaShard(split, part, tuple(drafts[start : start + cfg.rows_per_shard])))
    return shards, errors, files


def shard_info(cfg: AokvqaConfig, spec: AokvqaShard) -> dict[str, Any]:
    """What a finished shard's footer must say for a re-run to skip it."""
    key = {"version": ADAPTER_VERSION, "spec": asdict(spec), "max_side": cfg.max_side, "quality": cfg.jpeg_quality}
    return {"dataset": DATASET_NAME, "path": spec.relpath, "config_hash": config_hash(key), "records": len(spec.drafts)}


def build_shard(cfg: AokvqaConfig, spec: AokvqaShard) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The rows of one shard, and the records whose image could not be read (recorded, not fatal)."""
    rows, errors = [], []
    for draft in spec.drafts:
        try:
            image = read_image(draft["image"], cfg.max_side, cfg.jpeg_quality)
        except RecordError as exc:
            errors.append({"id": draft["id"], "error": f"image_id {draft['meta']['image_id']}: {exc}"})
            continue
        meta = {**draft["meta"], "image_file": posixpath.basename(draft["image"])}
        rows.append({**{k: draft[k] for k in ("id", "task", "split", "prompt", "steps", "choices", "answer")},
                     "images": [image], "step_images": [], "meta": json.dumps(meta, sort_keys=True)})
    return rows, errors


def import_aokvqa(source: str | Path, coco_dir: str | Path, splits: list[str] | None = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """All rows in one process (no shards, no Ray), and the skipped records."""
    cfg = AokvqaConfig(source=str(source), coco_dir=str(coco_dir), splits=splits or list(SPLITS),
                       rows_per_shard=1 << 30)
    shards, errors, _ = plan_import(cfg)
    rows = []
    for spec in shards:
        built, failed = build_shard(cfg, spec)
        rows += built
        errors += failed
    return rows, errors
