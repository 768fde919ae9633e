"""CinePile without Ray: scoring equal to CinePile's own code on every reply shape (lenient opt-in),
accuracy breakdowns, reading every source format with the official columns, bad rows named,
filters, prompts, and the URL allow-list."""

from __future__ import annotations

import itertools
import json
import re

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
from mmreason.eval.cinepile import cinepile_accuracy, normalize_string, score_cinepile
from tests.media import cinepile_row, cinepile_rows

# --- CinePile's own scoring, as the reference ----------------------------------------------------
# A faithful transcription of `normalize_string` and `evaluate_semantic_similarity` from
# EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/cinepile/utils.py (commit 08c9bda; CinePile's
# evaluation code plus its one-letter rule), kept in upstream's shape — if/elif and all — so that
# `score_cinepile`, written differently, is checked against it rather than against itself.


def official_normalize_string(input_string):
    input_string = input_string.replace("*", "").strip()
    if re.match(r"^[A-E]$", input_string, re.IGNORECASE):
        return input_string.upper(), ""
    match = re.search(r"Answer:\s*([A-E])\)?\.?\s*(.*)", input_string, re.IGNORECASE)
    if match:
        return match.group(1).upper(), match.group(2).strip()
    return None, input_string.strip()


def official_evaluate_semantic_similarity(response, answer_key_number, answer_key_text):
    student_response_number, student_response_text = official_normalize_string(response)
    if answer_key_number and student_response_number:
        if answer_key_number == student_response_number:
            if answer_key_text and student_response_text:
                return 1 if answer_key_text.lower() == student_response_text.lower() else 0
            return 1
    elif answer_key_text.lower() == student_response_text.lower():
        return 1
    return 0


KEY = "The red car"  # the right option is B (position 1)
CHOICES = ["A blue car", KEY, "A green bike", "Nobody", "The red car park"]
# Reply shapes models produce: bare letters in every dress, `Answer:` lines, option lines, option
# text alone, markdown, punctuation, prose that names an option, nothing at all.
REPLY_SHAPES = [
    "B", "b", " B ", "B\n", "(B)", "(b)", "[B]", "B.", "b.", "B)", "B:", "**B**", "*B*", "__B__", "`B`", "B!",
    "A", "a", "C", "e", "F", "(E)", "AB", "B C",
    "Answer: B", "Answer:B", "answer: b", "ANSWER: B", "Answer : B", "Answer: (B)", "answer: (b)", "Answer: B.",
    "Answer: B)", "Answer: B).", "Answer: b) the red car", "Answer: B) The red car", "Answer: B) The red car.",
    "Answer: B. The red car", "Answer: B The red car", "Answer: B) THE RED CAR", "Answer: B) A blue car",
    "Answer: C) The red car", "Answer: B - The red car", "Answer: B\nThe red car", "Answer: B\n\nbecause it is red",
    "**Answer:** B", "**Answer: B) The red car**", "**Answer:** (B)", "Final Answer: B", "My answer: B",
    "Answer: Because of the car", "Answer: Everyone", "Answer: the red car", "Answer:", "Answer: ",
    "The answer is B.", "The answer is B", "I think the answer is B", "Answer is B", "Option B", "B) The red car",
    "B. The red car", "(B) The red car", "B: The red car", "D) The red car",
    "The red car", "the red car", "THE RED CAR", "The red car.", " The red car ", "The  red car", "The red car!",
    "**The red car**", "The red car, obviously", "I think it is the red car", "The red car park", "A blue car",
    "Answer a question about the car", "It's B, the red car.", "Both B and C", "Answer: B\nAnswer: C",
    "", " ", "\n", "*", "**", ".", "N/A",
]
CASES = [(reply, position, key) for reply in REPLY_SHAPES
         for position, key in [(1, KEY), (1, "the red car"), (0, CHOICES[0]), (4, CHOICES[4]), (1, "")]]


@pytest.mark.parametrize("reply, position, key", CASES)
def test_score_cinepile_is_the_official_scoring_by_default(reply, position, key):
    official = official_evaluate_semantic_similarity(reply, "ABCDE"[position], key)
    assert score_cinepile(reply, position, key) is bool(official)
    assert score_cinepile(reply, position, key, scoring="official") is bool(official)
    assert normalize_string(reply) == official_normalize_string(reply)


def test_score_cinepile_is_the_official_scoring_on_generated_replies():
    """Every combination of a prefix, a dressed letter and a tail, against the reference."""
    prefixes = ["", "Answer:", "answer: ", "**Answer:** ", "Answer : ", "Reply: ", "\n"]
    letters = ["B", "b", "C", "(B)", "B)", "B.", "B).", "**B**", "B:", ""]
    tails = ["", " ", ".", " The red car", ") The red car", " the red car.", "\nThe red car", " A blue car", "**"]
    n = 0
    for prefix, letter, tail in itertools.product(prefixes, letters, tails):
        reply = prefix + letter + tail
        for position, key in [(1, KEY), (2, CHOICES[2])]:
            assert score_cinepile(reply, position, key) is bool(
                official_evaluate_semantic_similarity(reply, "ABCDE"[position], key)), (reply, key)
            n += 1
    assert n == 2 * 7 * 10 * 9


# What the official rules say on shapes where a reader might expect otherwise (checked above
# against the reference too; spelled out here so the rules are visible).
OFFICIAL = [
    ("B", True), ("b", True), ("**B**", True), ("Answer: B", True), ("answer:b", True), ("**Answer:** B", True),
    ("Answer: B) The red car", True), ("Answer: b. the RED car", True), ("Answer: B\nThe red car", True),
    ("(B)", False), ("B.", False), ("B)", False), ("B) The red car", False),  # no `Answer:`, more than a letter
    ("Answer: (B)", False),                      # a bracket before the letter: no letter read
    ("Answer: B) The red car.", False),          # option text must equal the key but for case
    ("Answer: B) A blue car", False), ("Answer: C) The red car", False),
    ("Answer: Bthe red car", True),              # the letter need not be a word: "B" + "the red car"
    ("Answer: Because of the car", False),       # "B" + "ecause of the car", which is not the key
    ("The red car", True), ("the red car", True), ("The red car.", False), (" The red car ", True),
    ("The answer is B.", False),                 # our models' sentence is not read
    ("", False),
]


@pytest.mark.parametrize("reply, right", OFFICIAL)
def test_official_scoring_on_surprising_shapes(reply, right):
    assert score_cinepile(reply, 1, KEY) is right
    assert official_evaluate_semantic_similarity(reply, "B", KEY) == int(right)


LENIENT = [
    ("B", True), ("b", True), ("B.", True), (" (B) ", True), ("C", False), ("e", False),
    ("Answer: B", True), ("answer: b", True), ("**Answer:** B", True), ("Answer: B.", True),
    ("Answer: B) The red car", True), ("Answer: B) the red car.", True), ("Answer: (B) THE RED CAR", True),
    ("Answer: B) A blue car", False),            # the letter is right, the option text is not
    ("Answer: C) The red car", False),           # the text is right, the letter is not
    ("B) The red car", True), ("B. the red car", True), ("D) The red car", False),
    ("The red car", True), ("the red car.", True),  # no letter: the text must equal answer_key
    ("The red car, obviously", False), ("I think it is the red car", False),
    ("The answer is B.", True), ("Thinking… The answer is C.\nThe answer is B.", True),  # our sentence, the last
    ("The answer is C.", False), ("The answer is B", False),  # no period: not our sentence
    ("Answer a question about the car", False),  # "Answer" without the colon is no answer
    ("Answer: Because of the car", False),       # a letter must be a word
    ("", False), ("Answer:", False),
]


@pytest.mark.parametrize("reply, right", LENIENT)
def test_lenient_scoring_is_opt_in(reply, right):
    assert score_cinepile(reply, 1, KEY, scoring="lenient") is right


def test_unknown_scoring_is_refused():
    with pytest.raises(ValueError, match="scoring must be one of official, lenient, got 'strict'"):
        score_cinepile("B", 1, KEY, scoring="strict")


def test_video_qa_scores_whole_replies_and_names_the_scoring():
    """score_replies (what answer_questions scores with) on schema rows, the model's replies given:
    official by default; lenient reads our models' answer sentence."""
    from mmreason.data.cinepile import question_draft
    from mmreason.eval import video_qa
    from mmreason.eval.cinepile import cinepile_accuracy

    drafts = [question_draft(cinepile_row("https://youtu.be/BBBBBBBBBBB", k), "test", k) for k in range(3)]
    rows = [{**d, "meta": json.dumps(d["meta"])} for d in drafts]
    # answers A, B, C (position k); replies: official-right, our sentence (right letter), wrong letter
    outputs = ["**Answer:** A", "Reasoning.\nThe answer is B.", "Answer: D"]
    preds = [{"id": r["id"], "prediction": None, "output": o, "n_tokens": 3} for r, o in zip(rows, outputs)]
    official = video_qa.score_replies(rows, preds)
    assert [s["correct"] for s in official] == [True, False, False]
    assert cinepile_accuracy(official)["accuracy"] == pytest.approx(1 / 3)
    lenient = video_qa.score_replies(rows, preds, scoring="lenient")
    assert [s["correct"] for s in lenient] == [True, True, False]


def test_video_qa_config_takes_the_scoring(tmp_path):
    from jobs.video_qa import VideoQAConfig

    assert load_config(VideoQAConfig, None, []).scoring == "official"
    assert load_config(VideoQAConfig, None, ["scoring=lenient"]).scoring == "lenient"
    with pytest.raises(ConfigError, match="scoring"):
        load_config(VideoQAConfig, None, ["scoring=generous"])


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
