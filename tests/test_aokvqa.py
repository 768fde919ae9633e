"""A-OKVQA annotations + a COCO-layout image folder → example rows (rationales as steps), in plain
Python and through the Ray Data job; bad records and missing images named and skipped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmreason.cli import main as cli_main
from mmreason.config import ConfigError, load_config
from mmreason.data import load_examples, read_table
from mmreason.data.aokvqa import AokvqaConfig, image_path, import_aokvqa
from mmreason.data.schema import validate_row
from mmreason.data.shards import SourceError
from pipelines import aokvqa


def record(qid: str, image_id: int, answer: int = 2, **override) -> dict:
    rec = {"split": "val", "image_id": image_id, "question_id": qid, "question": f"What is in picture {image_id}?",
           "choices": ["a cat", "a dog", "a bus", "a tree"], "correct_choice_idx": answer,
           "direct_answers": ["bus"] * 10, "difficult_direct_answer": False,
           "rationales": [f"There is a bus in {image_id}.", "Buses are big.", "It is yellow."]}
    rec.update(override)
    return rec


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    """A val and a test annotation file, and COCO folders holding images 1–5 (not 99)."""
    coco = tmp_path / "coco"
    rng = np.random.default_rng(0)
    for split, ids in (("val", range(1, 5)), ("test", [5])):
        (coco / f"{split}2017").mkdir(parents=True)
        for i in ids:
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image_path(coco, split, i))
    ann = tmp_path / "aokvqa"
    ann.mkdir()
    val = [record("q1", 1, 0), record("q2", 2, 3), record("q3", 3),
           record("q4", 4, choices=["a", "b", "c", "d", "e"]),   # five choices
           record("q5", 1, answer=7),                              # answer out of range
           record("q6", 99),                                       # no such image
           record("q7", 4)]
    (ann / "aokvqa_v1p0_val.json").write_text(json.dumps(val))
    hidden = ("correct_choice_idx", "rationales", "direct_answers")  # the test split publishes no answers
    test = [{k: v for k, v in record("t1", 5).items() if k not in hidden}]
    (ann / "aokvqa_v1p0_test.json").write_text(json.dumps(test))
    return ann, coco


def test_rows_carry_rationales_answers_and_original_images(data):
    ann, coco = data
    rows, errors = import_aokvqa(ann, coco)
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["aokvqa-test-t1", "aokvqa-val-q1", "aokvqa-val-q2", "aokvqa-val-q3", "aokvqa-val-q7"]
    for row in rows:
        validate_row(row)
    q2 = by_id["aokvqa-val-q2"]
    assert q2["answer"] == "D" and q2["choices"] == ["a cat", "a dog", "a bus", "a tree"]
    assert q2["steps"] == ["There is a bus in 2.", "Buses are big.", "It is yellow."]
    assert q2["prompt"].startswith("<image>\nQuestion: What is in picture 2?")
    assert "A. a cat B. a dog C. a bus D. a tree" in q2["prompt"]
    assert q2["images"] == [image_path(coco, "val", 2).read_bytes()]  # COCO's bytes, untouched
    assert json.loads(q2["meta"])["image_id"] == 2
    test_row = by_id["aokvqa-test-t1"]
    assert test_row["answer"] == "" and test_row["steps"] == [] and test_row["split"] == "test"
    reasons = {e["id"]: e["error"] for e in errors}
    assert reasons.keys() == {"aokvqa-val-q4", "aokvqa-val-q5", "aokvqa-val-q6"}
    assert "aokvqa_v1p0_val.json row 3: choices must hold 4 entries, got 5" in reasons["aokvqa-val-q4"]
    assert "row 4: correct_choice_idx must be an integer 0–3, got 7" in reasons["aokvqa-val-q5"]
    assert "image_id 99" in reasons["aokvqa-val-q6"] and "000000000099.jpg not found" in reasons["aokvqa-val-q6"]


def test_resize_re_encodes(data):
    ann, coco = data
    cfg = load_config(AokvqaConfig, None, [f"source={ann}", f"coco_dir={coco}", "splits=[val]", "max_side=32"])
    from mmreason.data.aokvqa import build_shard, plan_import

    (spec,), _, _ = plan_import(cfg)
    rows, _ = build_shard(cfg, spec)
    img = Image.open(io.BytesIO(rows[0]["images"][0]))
    assert img.format == "JPEG" and img.size == (32, 24)


def test_job_writes_shards_with_errors_listed_and_resumes(data, tmp_path, ray_session):
    ann, coco = data
    out = tmp_path / "out"
    cfg = load_config(AokvqaConfig, None, [f"source={ann}", f"coco_dir={coco}", f"output_dir={out}",
                                           "splits=[val, test]", "rows_per_shard=2"])
    manifest = aokvqa.run(cfg, log=lambda *_: None)
    assert manifest["total_rows"] == 5 and manifest["rows"] == {"val": {"aokvqa": 4}, "test": {"aokvqa": 1}}
    assert {e["id"] for e in manifest["errors"]} == {"aokvqa-val-q4", "aokvqa-val-q5", "aokvqa-val-q6"}
    examples = load_examples(out, split="val", task="aokvqa")
    assert [e.answer for e in examples] == ["A", "D", "C", "C"] and examples[0].images[0].size == (64, 48)
    # the missing image appears: its shard (the only one with a failure) is rebuilt, the rest skipped
    Image.new("RGB", (8, 8)).save(image_path(coco, "val", 99))
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = aokvqa.run(cfg, log=lambda *_: None)
    assert again["total_rows"] == 6 and again["last_run"]["imported_rows"] == 2
    assert sum(p.stat().st_mtime_ns != t for p, t in first.items()) == 1
    ids = read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6


def test_bad_input_is_named(data, tmp_path, capsys):
    ann, coco = data
    assert cli_main(["data", "aokvqa", f"source={tmp_path / 'nope'}", f"coco_dir={coco}"]) == 2
    assert f"A-OKVQA source {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert cli_main(["data", "aokvqa", f"source={ann}", f"coco_dir={tmp_path / 'nococo'}",
                     f"output_dir={tmp_path / 'o'}"]) == 2
    assert "coco_dir" in capsys.readouterr().err
    (tmp_path / "questions.json").write_text("[]")
    with pytest.raises(SourceError, match="file name must be aokvqa_v1p0_<split>.json"):
        import_aokvqa(tmp_path / "questions.json", coco)
    with pytest.raises(ConfigError, match="unknown A-OKVQA split 'dev'"):
        load_config(AokvqaConfig, None, ["splits=[dev]"])
