"""Seed 001 end to end on a real pretrained backbone: A-OKVQA-format annotations and COCO-layout
images (written here: COCO is not available offline) → `pipelines.aokvqa` → the shipped
configs/train/cot-aokvqa.yaml and coconut-aokvqa.yaml, unchanged but for paths and toy sizes, on
internvl-smollm2 through Ray Train + DeepSpeed → exports scored as multiple choice and with
A-OKVQA's direct-answer rule on val."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import train
from mmreason.config import load_config
from mmreason.data.aokvqa import AokvqaConfig, direct_answer_score, image_path
from mmreason.eval.runner import direct_answer
from mmreason.train.config import TrainConfig
from pipelines import aokvqa

REPO = Path(__file__).resolve().parents[1]
THINGS = ["a bus", "a cat", "a tree", "a boat"]


def records(split: str, n: int, first_image: int) -> list[dict]:
    out = []
    for i in range(n):
        answer = i % 4
        thing = THINGS[answer].split()[-1]
        out.append({"split": split, "image_id": first_image + i, "question_id": f"{split}{i}",
                    "question": "What is the main object in the picture?", "choices": THINGS,
                    "correct_choice_idx": answer, "direct_answers": [thing] * 7 + ["vehicle"] * 3,
                    "difficult_direct_answer": i == 3,
                    "rationales": [f"The picture shows {THINGS[answer]}.", f"It is {THINGS[answer]}, not anything else.",
                                   "So that option is right."]})
    return out


@pytest.fixture(scope="module")
def aokvqa_data(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("aokvqa")
    ann, coco = root / "annotations", root / "coco"
    ann.mkdir()
    rng = np.random.default_rng(0)
    for split, n, first in (("train", 8, 1), ("val", 4, 101)):
        (coco / f"{split}2017").mkdir(parents=True)
        recs = records(split, n, first)
        for rec in recs:  # 160×120: InternVL's processor cuts these into tiles plus a thumbnail
            pixels = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image_path(coco, split, rec["image_id"]))
        (ann / f"aokvqa_v1p0_{split}.json").write_text(json.dumps(recs))
    cfg = load_config(AokvqaConfig, REPO / "configs/data/aokvqa.yaml",
                      [f"source={ann}", f"coco_dir={coco}", f"output_dir={root / 'data'}"])
    manifest = aokvqa.run(cfg, log=lambda *_: None)
    assert not manifest.get("errors")
    return root / "data"


def stage(config: str, data: Path, storage: Path, model: Path, *extra: str) -> TrainConfig:
    """The shipped config, its paths moved here and its sizes cut to a test's."""
    return load_config(TrainConfig, REPO / "configs/train" / config, [
        f"data.path={data}", f"storage={storage}", f"model.checkpoint={model}", "optim.batch_size=4",
        "eval.max_examples=4", "eval.epoch_examples=0", "eval.batch_size=4",
        "eval.modes.vanilla.max_new_tokens=8", "eval.modes.cot.max_new_tokens=48", *extra])


def test_direct_answer_follows_the_official_rule():
    answers = ["bus"] * 2 + ["vehicle"] * 8
    assert direct_answer_score("bus", answers) == pytest.approx(2 / 3)
    assert direct_answer_score("vehicle", answers) == 1.0
    assert direct_answer_score("Bus", answers) == 0.0 and direct_answer_score(None, answers) == 0.0  # exact match
    row = {"choices": ["a cat", "bus", "c", "d"]}
    assert direct_answer(row, {"direct_answers": answers}, "B") == {"direct_answer": pytest.approx(2 / 3)}
    assert direct_answer(row, {"direct_answers": answers}, None) == {"direct_answer": 0.0}
    assert direct_answer(row, {"direct_answers": answers, "difficult_direct_answer": True}, "B") == {}
    assert direct_answer(row, {"size": 3}, "B") == {}  # not an A-OKVQA row


def test_seed_001_cot_then_coconut_on_internvl_smollm2(aokvqa_data, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    cot = train.run_stage(stage("cot-aokvqa.yaml", aokvqa_data, runs, smollm2, "optim.epochs=1"))
    assert cot["train"]["steps_per_epoch"] == 8 // (4 * 2)  # 8 train rows, 2 workers × 4
    for mode in ("vanilla", "cot"):
        res = cot["eval"][mode]
        assert res["n"] == 4 and 0.0 <= res["accuracy"] <= 1.0
        assert 0.0 <= res["direct_answer"] <= 1.0  # 3 of the 4 val rows count (one is difficult)
    preds = [json.loads(line) for line in
             (Path(cot["run_dir"]) / "eval" / "predictions-cot.jsonl").read_text().splitlines()]
    assert {p["id"] for p in preds} == {f"aokvqa-val-val{i}" for i in range(4)}  # selected and reported on val
    assert sum("direct_answer" in p for p in preds) == 3
    assert all(p["output"] for p in preds)

    coconut = train.run_stage(stage("coconut-aokvqa.yaml", aokvqa_data, runs, smollm2, f"init_from={cot['export']}",
                                    "optim.epochs=2", "coconut.epochs_per_stage=1",
                                    "eval.modes.coconut.max_new_tokens=48"))
    assert coconut["train"]["stage"] == 1  # the second epoch trained with the first rationale as a thought
    res = coconut["eval"]["coconut"]
    assert res["n"] == 4 and res["latents_per_answer"] == 6 and "direct_answer" in res
