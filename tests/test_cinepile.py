"""CinePile without Ray: the official scoring on tricky replies, accuracy breakdowns, reading every
source format with the official columns, bad rows named, filters, prompts, and the URL allow-list."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmreason.config import ConfigError, load_config
from mmreason.data.cinepile import (
    COLUMNS,
    CinepileConfig,
    attach_frames,
    cinepile_prompt,
    plan_clips,
    question_rows,
    read_source,
)
from mmreason.data.download import DownloadConfig, InvalidUrl, check_url, classify, clip_id_for_url, youtube_id
from mmreason.data.schema import BadRowError, validate_row
from mmreason.data.shards import SourceError
from mmreason.eval.cinepile import cinepile_accuracy, score_cinepile
from tests.media import cinepile_row, cinepile_rows

KEY = "The red car"  # the right option is B (position 1)
SCORER_TABLE = [
    ("B", True), ("b", True), ("B.", True), (" (B) ", True), ("C", False), ("e", False),
    ("Answer: B", True), ("answer: b", True), ("**Answer:** B", True), ("Answer: B.", True),
    ("Answer: B) The red car", True), ("Answer: B) the red car.", True), ("Answer: (B) THE RED CAR", True),
    ("Answer: B) A blue car", False),            # the letter is right, the option text is not
    ("Answer: C) The red car", False),           # the text is right, the letter is not
    ("B) The red car", True), ("B. the red car", True), ("D) The red car", False),
    ("The red car", True), ("the red car.", True),  # no letter: the text must equal answer_key
    ("The red car, obviously", False), ("I think it is the red car", False),
    ("The answer is B", False),                  # no `Answer:` and not one letter
    ("Answer a question about the car", False),  # "Answer" without the colon is no answer
    ("", False), ("Answer:", False),
]


@pytest.mark.parametrize("reply, right", SCORER_TABLE)
def test_score_cinepile_follows_the_official_rules(reply, right):
    assert score_cinepile(reply, 1, KEY) is right


def test_accuracy_by_category_and_hard_split():
    records = [
        {"correct": True, "question_category": "Temporal", "hard_split": True},
        {"correct": False, "question_category": "Temporal", "hard_split": False},
        {"correct": True, "question_category": "Theme Exploration", "hard_split": False},
        {"correct": True, "question_category": "Theme Exploration", "hard_split": False},
    ]
    acc = cinepile_accuracy(records)
    assert acc["accuracy"] == 0.75 and acc["n"] == 4
    assert acc["by_category"]["Temporal"] == {"accuracy": 0.5, "n": 2}
    assert acc["by_hard_split"] == {"hard": {"accuracy": 1.0, "n": 1}, "not hard": {"accuracy": 2 / 3, "n": 3}}


URLS = {"https://www.youtube.com/watch?v=AAAAAAAAAAA": 3, "https://youtu.be/BBBBBBBBBBB": 2,
        "http://127.0.0.1:9/c.mp4": 4}


@pytest.fixture
def rows() -> list[dict]:
    return cinepile_rows(URLS)


def write_source(kind: str, rows: list[dict], tmp_path):
    """The same rows as each source format the adapter reads."""
    import datasets

    if kind == "save_to_disk":
        path = tmp_path / "hf"
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows),
                              "train": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
        return path
    if kind == "parquet_file":
        path = tmp_path / "cinepile-test.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if kind == "hub_snapshot":  # the hub's layout: files named after their split
        (tmp_path / "snap" / "v2").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "snap" / "v2" / "test-00000-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "snap" / "v2" / "test-00001-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "snap" / "v2" / "train-00000-of-00001.parquet")
        return tmp_path / "snap"
    if kind == "json":
        path = tmp_path / "test.json"
        path.write_text(json.dumps(rows))
        return path
    if kind == "jsonl":  # what `Dataset.to_json` writes
        path = tmp_path / "test.jsonl"
        datasets.Dataset.from_list(rows).to_json(str(path))
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet_file", "hub_snapshot", "json", "jsonl"])
def test_every_source_format_reads_the_same_rows(kind, rows, tmp_path):
    table = read_source(str(write_source(kind, rows, tmp_path)), "test")
    assert table.num_rows == len(rows)
    assert table.select(list(COLUMNS)).to_pylist() == rows


def test_missing_columns_are_named(rows, tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows).drop_columns(["answer_key_position", "subtitles"]), path)
    with pytest.raises(SourceError, match=r"lacks the columns \['subtitles', 'answer_key_position'\]"):
        read_source(str(path), "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(str(tmp_path / "nope"), "test")
    with pytest.raises(SourceError, match="no split 'val'"):
        read_source(str(write_source("save_to_disk", rows, tmp_path)), "val")


def test_plan_groups_by_clip_and_names_bad_rows(rows):
    rows[1] = {**rows[1], "choices": rows[1]["choices"][:4]}
    rows[2] = {**rows[2], "answer_key_position": 7}
    rows[5] = {**rows[5], "answer_key": "something else"}
    plans, errors = plan_clips(pa.Table.from_pylist(rows), CinepileConfig())
    assert [e["id"] for e in errors] == ["cinepile-test-0000001", "cinepile-test-0000002", "cinepile-test-0000005"]
    assert "row 1: choices must be a list of 5 option strings, got 4 entries" in errors[0]["error"]
    assert "answer_key_position must be an integer 0–4, got 7" in errors[1]["error"]
    assert "answer_key 'something else' is not choices[0] 'option 0-0'" in errors[2]["error"]
    assert [(p.clip_id, len(p.questions)) for p in plans] == [
        ("yt-AAAAAAAAAAA", 1), ("yt-BBBBBBBBBBB", 2), (clip_id_for_url("http://127.0.0.1:9/c.mp4"), 3)]
    q = plans[0].questions[0]
    assert q["id"] == "cinepile-test-0000000" and q["answer"] == "A" and q["meta"]["hard_split"] is False


def test_filters(rows):
    table = pa.Table.from_pylist(rows)

    def kept(*overrides):
        plans, _ = plan_clips(table, load_config(CinepileConfig, None, overrides))
        return [q["meta"]["source_row"] for p in plans for q in p.questions]

    assert kept() == list(range(9))
    assert kept("hard_split=true") == [1, 4, 6, 8]  # k odd within each clip
    assert kept("visual_reliance=false") == [0, 3, 5, 8]
    assert kept("question_category=[Temporal]") == [2, 7]
    assert kept("max_videos=2") == [0, 1, 2, 3, 4]
    assert kept("hard_split=true", "max_videos=2") == [1, 4]  # filters first, then the first clips
    with pytest.raises(ConfigError, match="max_videos"):
        load_config(CinepileConfig, None, ["max_videos=0"])


def test_prompt_rows_and_frames_join():
    prompt = cinepile_prompt("  Hi there.\n", "Why?", ["a", "b", "c", "d", "e"])
    assert prompt.count("<video>") == 1 and "Subtitles:\nHi there." in prompt and "Question: Why?" in prompt
    assert "- A) a\n- B) b\n- C) c\n- D) d\n- E) e" in prompt
    (plan,), _ = plan_clips(pa.Table.from_pylist([cinepile_row("https://youtu.be/CCCCCCCCCCC", 0)]), CinepileConfig())
    (row,) = question_rows(plan, {"frame_times": [0.5, 1.5], "duration": 2.0, "frame_size": [8, 6]})
    validate_row(row)
    assert json.loads(row["meta"])["frame_times"] == [0.5, 1.5] and row["images"] == []
    joined = attach_frames(row, {"yt-CCCCCCCCCCC": {"images": [b"f0", b"f1"], "meta": {}}})
    assert joined["images"] == [b"f0", b"f1"] and joined["prompt"].count("<image>") == 2
    validate_row(joined)
    with pytest.raises(BadRowError, match="at most one <video>"):
        validate_row({**row, "images": [b"x"], "prompt": row["prompt"] + "<image>"})


@pytest.mark.parametrize("url", [
    "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "https://youtube.com/watch?v=dQw4w9WgXcQ&t=30",
    "https://m.youtube.com/watch?v=dQw4w9WgXcQ", "https://youtu.be/dQw4w9WgXcQ", "http://127.0.0.1:8000/a.mp4",
])
def test_allowed_urls(url):
    check_url(url, ["127.0.0.1"])


@pytest.mark.parametrize("url, why", [
    ("file:///etc/passwd", "scheme 'file'"), ("ftp://127.0.0.1/a.mp4", "scheme 'ftp'"),
    ("https://www.youtube.com/channel/UC123", "not a YouTube watch URL"),
    ("https://www.youtube.com/watch?v=short", "not a YouTube watch URL"),
    ("https://evil.example.com/a.mp4", "host 'evil.example.com' is not on download.allowed_hosts"),
    ("http://127.0.0.1:8000/a.mp4", "host '127.0.0.1' is not on"), ("not a url", "scheme '(none)'"),
])
def test_refused_urls(url, why):
    allowed = ["127.0.0.1:9999"] if "8000" in url else ["127.0.0.1"]
    with pytest.raises(InvalidUrl, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_url(url, allowed)


def test_url_ids_and_error_kinds():
    assert youtube_id("https://youtu.be/dQw4w9WgXcQ") == "dQw4w9WgXcQ"
    assert clip_id_for_url("https://www.youtube.com/watch?v=dQw4w9WgXcQ") == "yt-dQw4w9WgXcQ"
    assert clip_id_for_url("http://h/a.mp4") == clip_id_for_url("http://h/a.mp4") != clip_id_for_url("http://h/b.mp4")
    assert classify("HTTP Error 429: Too Many Requests") == "rate-limited"
    assert classify("Sign in to confirm you’re not a bot") == "rate-limited"
    assert classify("Video unavailable. This video is private") == "unavailable"
    assert classify("File is larger than max-filesize (9 bytes > 1 bytes)") == "too-large"
    with pytest.raises(ConfigError, match="allowed_hosts"):
        DownloadConfig(allowed_hosts=["http://x/"])
