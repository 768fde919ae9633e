"""The visual-thought benchmark (issue 26 items 3-4) without training anything: configs/bench/mvot-cpu.yaml
passes `mmreason quickstart --check` (and so does its text-only control), and benchmarks/kv_presses.py
--model mvot builds its presses — each one `make_press` accepts, at the budgets its settings are
sized for — and its evaluation config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from jobs import quickstart
from mmreason.config import load_config
from mmreason.kv import make_press
from tests.test_check import checked, quiet  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/bench/mvot-cpu.yaml"
IMAGE_TOKENS = 66
"""A drawn tiny-anole image: <racm3:break>, 8 × 8 codes, <eoss>."""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kv_presses", REPO / "benchmarks" / "kv_presses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_mvot_bench_config_trains_visual_thoughts_on_mazes_and_frozenlake_and_passes_check(tmp_path, quiet, capsys):
    root = tmp_path / "mvot"
    report = checked(quickstart.main, [str(CONFIG), f"root={root}"], capsys)
    assert report["steps"] == ["data", "cot"]
    assert report["stages"]["cot"]["starts_from"] == "tiny-anole" and report["stages"]["cot"]["workers"] == 2
    assert report["data"]["shards"]["done"] == 0 and report["data"]["shards"]["to_build"] > 0
    cot = report["config"]["cot"]
    assert cot["visual_thoughts"]["enabled"] and cot["data"]["tasks"] == ["maze", "frozenlake"]
    assert set(report["config"]["data"]["tasks"]) == {"maze", "frozenlake"} and report["config"]["data"]["step_images"]
    # evaluation must be able to draw: the longest 4×4 maze reply draws 10 images
    assert cot["eval"]["modes"]["cot"]["max_new_tokens"] >= 10 * IMAGE_TOKENS + 60
    # the control named in the config's header: same data and epochs, no visual thoughts
    control = checked(quickstart.main, [str(CONFIG), f"root={root}", "cot.visual_thoughts.enabled=false",
                                        "cot.run_name=mvot-cot-text"], capsys)
    assert not control["config"]["cot"]["visual_thoughts"]["enabled"]
    assert control["config"]["cot"]["optim"] == cot["optim"] and control["config"]["data"] == report["config"]["data"]
    assert not root.exists() and not quiet.exists()


def test_kv_presses_mvot_builds_each_press_at_its_budget(bench):
    kept = [0.5, 0.25]
    settings = bench.press_settings("mvot", kept, {k: "/runs/dare" for k in kept}, {k: None for k in kept})
    names = [s["name"] for s in settings]
    assert names[0] == "none" and names.count("mvot_window") == 1 and names.count("dare") == 2
    assert {n for n in names if n.startswith("kvpress:")} == {f"kvpress:{m}" for m in bench.KVPRESS}
    assert not [s for s in settings if s["name"] == "cosre" and "model" in s]  # no fine-tuned CoSRe on mvot
    share = bench.MVOT_IMAGE_SHARE
    for s in settings:
        s = dict(s)
        s.pop("kept", None), s.pop("model", None), s.pop("router_path", None)
        make_press(s.pop("name"), s, pending={"router_path"})  # every setting is one the press takes
    for f in kept:
        one = {s["name"]: s for s in settings if s.get("kept") == f}
        assert one["kvpress:snapkv"]["compression_ratio"] == pytest.approx(1 - f)
        assert one["tova"]["factor"] == f
        dare = one["dare"]
        assert dare["rho_vis"] < 1 and dare["router_path"] == "/runs/dare/dare_router.pt" and dare["model"] == "/runs/dare"
        # the per-modality targets add up to the kept fraction at the model's image share
        assert (1 - share) * dare["rho_text"] + share * dare["rho_vis"] == pytest.approx(f, abs=0.01)
        cosre = one["cosre"]
        assert cosre["keep_h"] * cosre["keep_w"] <= cosre["block"] ** 2 / 4  # drawn images: a quarter or less
    assert "slots" not in bench.mvot_cosre_settings(0.5)  # at 50 % text is left whole
    assert bench.mvot_cosre_settings(0.25)["slots"] > 0  # below, the DCT alone cannot reach it


def test_kv_presses_mvot_evaluates_the_drawing_model_on_both_tasks_with_a_drawing_budget(bench, tmp_path):
    model = bench.MODELS["mvot"]
    cfg = bench.eval_config(model, model.checkpoint, model.data, [3, 4], 20, model.max_new_tokens, tmp_path)
    assert cfg.model.backbone == "tiny-anole" and cfg.data.tasks == ["maze", "frozenlake"]
    assert cfg.mode == "cot" and cfg.generation.max_new_tokens >= 10 * IMAGE_TOKENS + 60
    assert model.out.endswith("kv_presses_mvot.json") and bench.MODELS["maze"].out.endswith("kv_presses.json")
    maze = bench.press_settings("maze", [0.5], {0.5: None}, {0.5: None})
    assert "mvot_window" not in [s["name"] for s in maze]  # the maze model's list is as before
    assert load_config(type(cfg), None, ["press={name: mvot_window, latest: 1}"]).press["name"] == "mvot_window"


def test_mvot_models_scores_each_reasoning_line_without_its_drawing_and_the_majority_p_value():
    """benchmarks/mvot_models.py: a reply's lines after the transcription, drawings left out, are
    compared with the row's steps at their places (move alone, whole line); the p-value is the
    exact chance that always giving the majority answer scores at least as many."""
    spec = importlib.util.spec_from_file_location("mvot_models", REPO / "benchmarks" / "mvot_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reply = ("Start 0. A 4.\nGo down 3.\n<racm3:break>IMGIMGBZ IMGIMGCZ<eoss>Go right 5.\n"
             "<racm3:break>IMGIMGBZ<eoss>The answer is A.")
    steps = ["Start 0. A 7.", "Go down 3.", "Go right 4 D.", "Go up 1."]
    assert module.reasoning_lines(reply, steps) == (2, 1, 3)
    assert module.reasoning_lines("Start 0.", steps) == (0, 0, 3)  # a reply cut short is wrong, not skipped
    assert module.p_at_least(0, 10, 0.3) == pytest.approx(1.0)
    assert module.p_at_least(3, 3, 0.5) == pytest.approx(0.125)
    assert module.p_at_least(2, 3, 0.5) == pytest.approx(0.5)


def test_tokenizer_probe_windows_cover_each_cell_and_read_letters_from_pixels():
    """benchmarks/tokenizer_probe.py: a cell's window is the latent patches its box overlaps; the
    probed cells are a maze's four letters and every FrozenLake cell; and the probe reads the maze
    letters from the windows' pixels (4×4 grids: a cell is 2×2 patches, so a misplaced window would
    hold no letter and score near chance)."""
    spec = importlib.util.spec_from_file_location("tokenizer_probe", REPO / "benchmarks" / "tokenizer_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from mmreason.tasks import TASKS, RenderOptions, generate_example
    from mmreason.tasks.render import GridCanvas

    assert module.patch_window(4, 0, 0, 64, 8) == (range(0, 2), range(0, 2))
    assert module.patch_window(4, 3, 2, 64, 8) == (range(6, 8), range(4, 6))
    for r in range(3):
        for c in range(3):
            (y0, y1, x0, x1), (wy, wx) = GridCanvas(3, 3, 64).box(r, c), module.patch_window(3, r, c, 64, 8)
            assert wy.start * 8 <= y0 and y1 <= wy.stop * 8 and (wy.start + 1) * 8 > y0 and (wy.stop - 1) * 8 < y1
            assert wx.start * 8 <= x0 and x1 <= wx.stop * 8 and len(wy) <= module.WINDOW and len(wx) <= module.WINDOW
    fractions = {"train": 1.0, "val": 0.0, "test": 0.0}
    rows = {task: [dict(generate_example(TASKS[task], 4, "train", i, 0, fractions, RenderOptions()), task=task)
                   for i in range(40)] for task in ("maze", "frozenlake")}
    assert all(len(module.cells(row)) == 4 for row in rows["maze"])
    lake_kinds = [sorted(k for *_, k in module.cells(row)) for row in rows["frozenlake"]]
    assert all(len(k) == 16 and k.count(2) == 1 and k.count(3) == 1 for k in lake_kinds)  # one goal, one start
    train, test = module.features(rows["maze"][:30], None), module.features(rows["maze"][30:], None)
    scores = module.probe(train, test, 4)
    assert scores["train"] == 1.0 and scores["test"] >= 0.9, scores


def test_mvot_models_scores_each_press_evaluation_like_a_model(tmp_path):
    """`mvot_models.py --press-eval`: every RUN/{result.json, predictions.jsonl} kv_presses.py leaves
    is scored like a cot export — transcription and later lines against the row's steps — beside the
    press's accuracy and KV fraction."""
    import json

    spec = importlib.util.spec_from_file_location("mvot_models", REPO / "benchmarks" / "mvot_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gold = {"m0": {"steps": ["Start 0. A 7. B 1.", "Go down 3.", "Go right 4 D."], "answer": "A"},
            "f0": {"steps": ["The agent starts at cell 2.", "Go up. Now at cell 2."], "answer": "C"}}
    replies = {"none": ("Start 0. A 7. B 1.\nGo down 3.\n<racm3:break>IMGIMGBZ<eoss>Go right 4 D.", "A", True),
               "tova": ("Start 0. A 5.\nGo down 3.\nGo right 5.", "B", False)}
    for press, (reply, prediction, correct) in replies.items():
        run = tmp_path / f"mvot-{press}"
        run.mkdir()
        run.joinpath("result.json").write_text(json.dumps({"row": {
            "press": press, "press_settings": "{}", "accuracy": 0.5 if correct else 0.0, "kv_fraction_peak": 0.4}}))
        preds = [{"id": "m0", "task": "maze", "output": reply, "prediction": prediction, "correct": correct},
                 {"id": "f0", "task": "frozenlake", "output": "The agent starts at cell 2.\nGo up. Now at cell 2.",
                  "prediction": "C", "correct": True}]
        run.joinpath("predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    rows = {r["press"]: r for r in module.summarise_presses(tmp_path, gold)}
    assert rows["none"]["transcription_right"] == {"start": 2, "second": 1, "third": 1}
    assert rows["none"]["steps_right"] == {"moves": 3, "lines": 3, "of": 3}
    assert rows["tova"]["transcription_right"] == {"start": 2, "second": 0, "third": 0}
    assert rows["tova"]["steps_right"] == {"moves": 3, "lines": 2, "of": 3}
    assert rows["tova"]["by_task"]["maze"]["accuracy"] == 0.0 and rows["none"]["kv_fraction_peak"] == 0.4
