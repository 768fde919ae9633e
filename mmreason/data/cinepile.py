"""CinePile (Rawal et al., "CinePile: A Long Video Question Answering Dataset and Benchmark",
arXiv 2405.08813; dataset tomg-group-umd/cinepile) → the example schema.

    from mmreason.data.cinepile import load_cinepile
    examples = load_cinepile("runs/data/cinepile", split="test")    # questions with their frames joined in

A source is a local HF `datasets` directory (`save_to_disk`), a Parquet file or folder (a hub
snapshot: files named after their split), a JSON / JSON Lines export, or the hub id itself when a
token (`HF_TOKEN`) and the network are there. It must have the official columns (`COLUMNS`);
a row whose `choices` are not five, whose `answer_key_position` is not 0–4 or whose `answer_key`
is not the option at that position is reported by id and skipped.

One clip serves ~30 questions, so its frames are stored once: a clip row (`clips/<clip_id>.parquet`,
the frames in `images`, their times in `meta`) and the clip's question rows
(`<split>/cinepile-<clip_id>.parquet`), whose prompts hold one `<video>` and whose `meta.clip_id`
names the clip. `attach_frames` joins them. Scoring lives in `mmreason.eval.cinepile`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from mmreason import storage
from mmreason.config import ConfigError, config_hash
from mmreason.data.download import CORRUPT, OK, TOO_LONG, DownloadConfig, clip_id_for_url, download_clip
from mmreason.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Example, decode_row
from mmreason.data.shards import SourceError, read_manifest, read_shard, read_shard_info, write_shard
from mmreason.data.video import CorruptVideoError, FrameSampling, SampledClip, sample_frames

DATASET_NAME = "cinepile"
ADAPTER_VERSION = 1  # bump when rows change for the same input and config
HUB_ID = "tomg-group-umd/cinepile"
COLUMNS = ("movie_name", "year", "genre", "yt_clip_title", "yt_clip_link", "movie_scene", "subtitles", "question",
           "choices", "answer_key", "answer_key_position", "question_category", "hard_split", "visual_reliance")
OPTION_LETTERS = "ABCDE"
ARCHIVE_NAME = "download-archive.txt"  # yt-dlp's record of finished downloads, in output_dir (if local)
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


@dataclass
class CinepileConfig:
    source: str = HUB_ID
    """A local HF datasets directory, Parquet file/folder or JSON export; or the hub id (needs HF_TOKEN)."""
    hub_config: str = "default"
    """The hub config (`default` = v1, `v2`) when reading from the hub."""
    split: Literal["train", "test"] = "test"
    """Which CinePile split to read; rows keep its name."""
    output_dir: str = "runs/data/cinepile"
    """Where shards and manifest.json go (videos too when local): a local folder or an s3:// / gs:// prefix."""
    hard_split: bool | None = None
    """Keep only hard (true) or only not-hard (false) questions; null keeps both."""
    visual_reliance: bool | None = None
    """Keep only questions that do (true) or do not (false) rely on the visuals; null keeps both."""
    question_category: list[str] = field(default_factory=list)
    """Keep only these categories (empty = all)."""
    max_videos: int | None = None
    """At most this many clips (the first in source order, after the filters)."""
    download: DownloadConfig = field(default_factory=DownloadConfig)
    frames: FrameSampling = field(default_factory=FrameSampling)
    overwrite: bool = False
    """Rebuild shards that already exist instead of skipping them."""

    def __post_init__(self) -> None:
        if self.max_videos is not None and self.max_videos < 1:
            raise ConfigError(f"max_videos must be >= 1 or null, got {self.max_videos}")


# --- reading the source --------------------------------------------------------------------------------


def _split_files(root: Path, split: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of a hub snapshot or export folder that hold `split` (`test-0000….parquet`, `test/…`)."""
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    return [p for p in found if split in p.relative_to(root).as_posix().replace("-", "/").replace("_", "/")
            .replace(".", "/").split("/")]


def _read_json(path: Path) -> pa.Table:
    text = path.read_text()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SourceError(f"CinePile source {path} is not JSON or JSON Lines: {exc}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SourceError(f"CinePile source {path} must hold a list of row objects")
    return pa.Table.from_pylist(records)


def read_source(source: str, split: str, hub_config: str = "default") -> pa.Table:
    """The rows of `split` in `source` as an Arrow table, columns checked against `COLUMNS`. A source
    on an object store (s3://, gs://) is copied to the local cache first."""
    if ":" in source:  # a URI (a hub id never has a colon): `http://…` or `s3:/x` stop here, naming it
        source = storage.check_location(source, "source")
    path = storage.local_copy(source) if storage.is_remote(source) else Path(source)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise SourceError(f"CinePile source {path} has no split {split!r} (has: {', '.join(data)})")
            data = data[split]
        table = data.with_format("arrow")[:]
    elif path.is_dir():
        files = _split_files(path, split, (".parquet",)) or _split_files(path, split, (".json", ".jsonl"))
        if not files:
            raise SourceError(f"CinePile source {path} holds no Parquet or JSON file for split {split!r} "
                              f"(looked for file or folder names with '{split}' in them)")
        tables = [pq.read_table(f) if f.suffix == ".parquet" else _read_json(f) for f in files]
        table = pa.concat_tables(tables, promote_options="default")
    elif path.is_file():
        try:
            table = pq.read_table(path) if path.suffix == ".parquet" else _read_json(path)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"CinePile source {path} is not a readable Parquet file: {exc}") from None
    elif source.count("/") == 1 and not source.startswith((".", "/")) and os.environ.get("HF_TOKEN"):
        import datasets

        table = datasets.load_dataset(source, hub_config, split=split, token=True).with_format("arrow")[:]
    else:
        raise FileNotFoundError(f"CinePile source {source} does not exist (a local datasets directory, Parquet "
                                f"or JSON file; the hub id needs HF_TOKEN and network)")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise SourceError(f"CinePile source {source} lacks the columns {missing} "
                          f"(has: {', '.join(table.column_names)})")
    return table


# --- one row → a question draft ------------------------------------------------------------------------


def flag(value: Any) -> bool | None:
    """`hard_split` / `visual_reliance` as a bool ("True"/"False" strings on the hub); None if unreadable."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in TRUE_WORDS else False if text in FALSE_WORDS else None


def question_id(split: str, index: int) -> str:
    """Row `index` of the source split: stable under filters, and it names the row in errors."""
    return f"cinepile-{split}-{index:07d}"


def cinepile_prompt(subtitles: str, question: str, choices: list[str]) -> str:
    """Frames (one `<video>`), the scene's subtitles, the question and its lettered options, in the
    order of CinePile's own evaluation prompt."""
    options = "\n".join(f"- {letter}) {text}" for letter, text in zip(OPTION_LETTERS, choices))
    return (f"You are given frames from a movie scene and its subtitles. Answer the question about the scene.\n"
            f"{VIDEO_PLACEHOLDER}\nSubtitles:\n{subtitles.strip()}\n\nQuestion: {question.strip()}\n{options}\n"
            f"Answer with the letter of the correct option (A, B, C, D or E).")


class RowError(ValueError):
    """One source row is wrong; the message says how."""


def question_draft(row: dict[str, Any], split: str, index: int) -> dict[str, Any]:
    """The schema fields of one source row (no frames yet); a bad row raises `RowError`."""
    for name in ("question", "yt_clip_link"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise RowError(f"{name} must be a non-empty string, got {row[name]!r}")
    choices = row["choices"]
    if not isinstance(choices, (list, tuple)) or len(choices) != len(OPTION_LETTERS) \
            or not all(isinstance(c, str) for c in choices):
        got = f"{len(choices)} entries" if isinstance(choices, (list, tuple)) else repr(choices)
        raise RowError(f"choices must be a list of {len(OPTION_LETTERS)} option strings, got {got}")
    position = row["answer_key_position"]
    if type(position) is not int or not 0 <= position < len(OPTION_LETTERS):
        raise RowError(f"answer_key_position must be an integer 0–{len(OPTION_LETTERS) - 1}, got {position!r}")
    answer_key = row["answer_key"]
    if not isinstance(answer_key, str) or answer_key.strip().casefold() != choices[position].strip().casefold():
        raise RowError(f"answer_key {answer_key!r} is not choices[{position}] {choices[position]!r}")
    url = row["yt_clip_link"].strip()
    return {
        "id": question_id(split, index),
        "task": DATASET_NAME,
        "split": split,
        "prompt": cinepile_prompt(row["subtitles"] or "", row["question"], list(choices)),
        "images": [],
        "steps": [],
        "step_images": [],
        "choices": list(choices),
        "answer": OPTION_LETTERS[position],
        "meta": {
            "source_row": index,
            "clip_id": clip_id_for_url(url),
            "yt_clip_link": url,
            **{k: row[k] for k in ("movie_name", "year", "genre", "yt_clip_title", "movie_scene",
                                   "question_category", "answer_key", "answer_key_position")},
            "hard_split": flag(row["hard_split"]),
            "visual_reliance": flag(row["visual_reliance"]),
            "hard_split_raw": row["hard_split"],
            "visual_reliance_raw": row["visual_reliance"],
        },
    }


def matches_filters(meta: dict[str, Any], hard_split: bool | None = None, visual_reliance: bool | None = None,
                    question_category: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether a question (its meta) passes the hard-split / visual-reliance / category filters
    (None or empty = no filter); the data job and the training and inference jobs share it."""
    return ((hard_split is None or meta.get("hard_split") is hard_split)
            and (visual_reliance is None or meta.get("visual_reliance") is visual_reliance)
            and (not question_category or meta.get("question_category") in question_category))


def _keep(draft: dict[str, Any], cfg: CinepileConfig) -> bool:
    return matches_filters(draft["meta"], cfg.hard_split, cfg.visual_reliance, cfg.question_category)


# --- the plan: questions grouped by clip ---------------------------------------------------------------


@dataclass(frozen=True)
class ClipPlan:
    """One clip to fetch and sample, and the question rows that refer to it."""

    clip_id: str
    url: str
    split: str
    questions: tuple[dict[str, Any], ...]

    @property
    def relpath(self) -> str:
        """The question shard (the dataset's rows)."""
        return f"{self.split}/{DATASET_NAME}-{self.clip_id}.parquet"

    @property
    def clip_relpath(self) -> str:
        """The clip shard: one row holding the frames."""
        return f"clips/{self.clip_id}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ClipPlan":
        data = json.loads(text)
        return cls(**{**data, "questions": tuple(data["questions"])})


def plan_clips(table: pa.Table, cfg: CinepileConfig) -> tuple[list[ClipPlan], list[dict[str, str]]]:
    """Rows checked, filtered and grouped by clip (source order; `max_videos` first clips), and the
    rows that failed their checks (`{"id", "error"}`, the id naming the source row)."""
    errors: list[dict[str, str]] = []
    by_clip: dict[str, list[dict[str, Any]]] = {}
    urls: dict[str, str] = {}
    for index, row in enumerate(table.select(list(COLUMNS)).to_pylist()):
        try:
            draft = question_draft(row, cfg.split, index)
        except RowError as exc:
            errors.append({"id": question_id(cfg.split, index), "error": f"row {index}: {exc}"})
            continue
        if not _keep(draft, cfg):
            continue
        clip_id = draft["meta"]["clip_id"]
        if clip_id not in by_clip and cfg.max_videos is not None and len(by_clip) >= cfg.max_videos:
            continue
        by_clip.setdefault(clip_id, []).append(draft)
        urls.setdefault(clip_id, draft["meta"]["yt_clip_link"])
    plans = [ClipPlan(clip_id, urls[clip_id], cfg.split, tuple(drafts)) for clip_id, drafts in by_clip.items()]
    return plans, errors


def _frames_key(cfg: CinepileConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg.frames).items() if k != "decoder"}


def question_info(cfg: CinepileConfig, plan: ClipPlan) -> dict[str, Any]:
    """What a finished question shard's footer must say for a re-run to skip it."""
    key = {"version": ADAPTER_VERSION, "questions": plan.questions, "frames": _frames_key(cfg)}
    return {"dataset": DATASET_NAME, "kind": "questions", "path": plan.relpath, "clip_id": plan.clip_id,
            "config_hash": config_hash(key)}


def clip_info(cfg: CinepileConfig, plan: ClipPlan) -> dict[str, Any]:
    """What a finished clip shard's footer must say: the clip's URL and the sampling settings."""
    key = {"version": ADAPTER_VERSION, "url": plan.url, "split": plan.split, "frames": _frames_key(cfg)}
    return {"dataset": DATASET_NAME, "kind": "clip", "path": plan.clip_relpath, "clip_id": plan.clip_id,
            "url": plan.url, "config_hash": config_hash(key)}


# --- rows ----------------------------------------------------------------------------------------------


def clip_row(plan: ClipPlan, sampled: SampledClip) -> dict[str, Any]:
    """The clip as one example-schema row: its frames in `images`, times and sizes in `meta`."""
    return {
        "id": plan.clip_id,
        "task": DATASET_NAME,
        "split": plan.split,
        "prompt": IMAGE_PLACEHOLDER * len(sampled.frames),
        "images": sampled.frames,
        "steps": [],
        "step_images": [],
        "choices": [],
        "answer": "",
        "meta": json.dumps({"kind": "clip", "clip_id": plan.clip_id, "url": plan.url, **sampled.meta()},
                           sort_keys=True),
    }


def question_rows(plan: ClipPlan, clip_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The clip's question rows; their meta repeats the clip's frame times (a few numbers)."""
    video = {k: clip_meta[k] for k in ("frame_times", "duration", "frame_size")}
    return [{**q, "meta": json.dumps({**q["meta"], **video}, sort_keys=True)} for q in plan.questions]


def read_clip_meta(path: str | Path) -> dict[str, Any]:
    """The meta of a written clip shard's row (frame times, …) without reading its frames."""
    return json.loads(read_shard(path, columns=["meta"]).column("meta")[0].as_py())


def work_dir(root: str | Path) -> Path:
    """The local folder for a dataset's videos and yt-dlp's download archive: `root` itself when local;
    for a dataset on an object store, a folder of this machine's cache named after it."""
    if not storage.is_remote(root):
        return Path(root)
    return storage.cache_root() / DATASET_NAME / hashlib.sha256(str(root).encode()).hexdigest()[:24]


def video_dir(cfg: CinepileConfig, root: str | Path) -> Path:
    return Path(cfg.download.video_dir) if cfg.download.video_dir else work_dir(root) / "videos"


def outcome(plan: ClipPlan, status: str, reason: str = "", **done: Any) -> dict[str, Any]:
    """One clip's result, the same keys whatever happened (what the manifest lists per clip)."""
    return {"clip_id": plan.clip_id, "url": plan.url, "split": plan.split, "task": DATASET_NAME, "status": status,
            "reason": reason, "questions": len(plan.questions), "attempts": 0, "downloaded": False, "path": "",
            "clip_path": "", "rows": 0, "frames": 0, "frame_bytes": 0, "bytes": 0, "seconds": 0.0, "errors": "[]",
            **done}


def process_clip(plan: ClipPlan, cfg: CinepileConfig, root: str | Path) -> dict[str, Any]:
    """Fetch, sample and write one clip and its questions; a failure comes back as its outcome.

    The clip shard is written first, then the question shard, each atomically, so a clip counts as
    done only when both exist. A clip shard already on disk (the job died between the two) is
    reused unless `overwrite`, and a video already downloaded is not fetched again. A video that does not decode is
    deleted, so a re-run fetches it afresh.
    """
    clip_path, question_path = storage.join(root, plan.clip_relpath), storage.join(root, plan.relpath)
    videos = video_dir(cfg, root)
    started, attempts, downloaded = time.perf_counter(), 0, False
    want = clip_info(cfg, plan)
    reuse = not cfg.overwrite and storage.exists(clip_path)
    if reuse and read_shard_info(clip_path).get("config_hash") == want["config_hash"]:
        clip_meta = read_clip_meta(clip_path)
    else:
        got = download_clip(plan.url, plan.clip_id, videos, cfg.download, archive=work_dir(root) / ARCHIVE_NAME)
        attempts, downloaded = got.attempts, got.downloaded
        if got.status != OK:
            return outcome(plan, got.status, got.reason, attempts=attempts)
        try:
            sampled = sample_frames(got.path, cfg.frames)
            if sampled.duration > cfg.download.max_duration_s:
                raise ValueError(f"{sampled.duration:.0f}s is longer than max_duration_s {cfg.download.max_duration_s}")
        except (CorruptVideoError, ValueError) as exc:
            got.path.unlink(missing_ok=True)
            status = CORRUPT if isinstance(exc, CorruptVideoError) else TOO_LONG
            return outcome(plan, status, str(exc), attempts=attempts, downloaded=downloaded)
        write_shard(clip_path, [clip_row(plan, sampled)], {**want, "frames": len(sampled.frames)})
        clip_meta = read_clip_meta(clip_path)
    rows = question_rows(plan, clip_meta)
    write_shard(question_path, rows, question_info(cfg, plan))
    if not cfg.download.keep_videos:
        for leftover in videos.glob(f"{plan.clip_id}.*"):
            leftover.unlink(missing_ok=True)
    frame_bytes = storage.size(clip_path)
    return outcome(plan, OK, attempts=attempts, downloaded=downloaded, path=plan.relpath,
                   clip_path=plan.clip_relpath, rows=len(rows), frames=len(clip_meta["frame_times"]),
                   frame_bytes=frame_bytes, bytes=storage.size(question_path),
                   seconds=time.perf_counter() - started)


def read_clips(root: str | Path, clip_ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """clip id → its clip row (frames as bytes, meta as a dict), from the clip shards the manifest lists."""
    clips = {}
    for entry in read_manifest(root).get("clip_shards", []):
        if clip_ids is not None and entry["clip_id"] not in clip_ids:
            continue
        (row,) = read_shard(storage.join(root, entry["path"])).to_pylist()
        clips[row["id"]] = {"images": row["images"], "meta": json.loads(row["meta"])}
    return clips


def pick_frames(frames: list[Any], num_frames: int | None) -> list[Any]:
    """`num_frames` of a clip's stored frames, evenly spread (the centre of each of `num_frames`
    equal slices); all of them when None or when the clip has no more."""
    if num_frames is None or num_frames >= len(frames):
        return list(frames)
    return [frames[int((i + 0.5) * len(frames) / num_frames)] for i in range(num_frames)]


def attach_frames(row: dict[str, Any], clips: Any, num_frames: int | None = None,
                  keep_video: bool = False) -> dict[str, Any]:
    """A question row with its clip's frames in `images` (`num_frames` of them, evenly picked) and
    `<video>` replaced by one `<image>` each — or kept (`keep_video`), for a model family that lays
    out a video itself. `clips` maps clip id → clip row (`read_clips`, `ClipCache`)."""
    meta = json.loads(row["meta"])
    clip = clips.get(meta.get("clip_id"))
    if clip is None:
        raise KeyError(f"row {row['id']}: clip {meta.get('clip_id')!r} is not in the clips table")
    frames = pick_frames(clip["images"], num_frames)
    prompt = row["prompt"] if keep_video else row["prompt"].replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER * len(frames))
    return {**row, "prompt": prompt, "images": list(frames)}


class ClipCache:
    """Clip rows of a dataset read on demand from the clip shards its manifest lists, the last
    `max_clips` kept in memory (questions of one clip usually come together). `get(clip_id)` like
    the dict `read_clips` returns."""

    def __init__(self, root: str | Path, max_clips: int = 64):
        self.root, self.max_clips = root, max_clips
        self.paths = {e["clip_id"]: e["path"] for e in read_manifest(self.root).get("clip_shards", [])}
        self._rows: dict[str, dict[str, Any]] = {}

    def get(self, clip_id: str | None) -> dict[str, Any] | None:
        if clip_id not in self.paths:
            return None
        if clip_id not in self._rows:
            (row,) = read_shard(storage.join(self.root, self.paths[clip_id])).to_pylist()
            if len(self._rows) >= self.max_clips:
                self._rows.pop(next(iter(self._rows)))
            self._rows[clip_id] = {"images": row["images"], "meta": json.loads(row["meta"])}
        return self._rows[clip_id]


def video_rows(rows: list[dict[str, Any]], clips: "ClipCache | str | Path", num_frames: int | None = None,
               keep_video: bool = True) -> list[dict[str, Any]]:
    """Rows with the frames of every video question joined in (`attach_frames`); other rows as
    they are. `clips` is a `ClipCache` or the dataset directory to open one on."""
    if not any(VIDEO_PLACEHOLDER in row["prompt"] for row in rows):
        return rows
    cache = clips if isinstance(clips, ClipCache) else ClipCache(clips)
    return [attach_frames(row, cache, num_frames, keep_video) if VIDEO_PLACEHOLDER in row["prompt"] else row
            for row in rows]


def load_cinepile(root: str | Path, split: str | None = None) -> list[Example]:
    """Decoded CinePile questions with their frames joined in (PIL images)."""
    from mmreason.data.reader import read_table

    rows = read_table(root, split=split, task=DATASET_NAME).to_pylist()
    clips = read_clips(root, {json.loads(r["meta"])["clip_id"] for r in rows})
    return [decode_row(attach_frames(r, clips)) for r in rows]
