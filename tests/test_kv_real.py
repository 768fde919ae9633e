"""benchmarks/kv_real.py's core: RULER-style rows (their answers are in their contexts, prompts fit the budget),
RULER's string-match scorer, and every press of the grid run on a couple of rows of a tiny model."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from tests.kv_helpers import one_thread, tiny_family  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_real.py"


@pytest.fixture(scope="module")
def kv_real():
    spec = importlib.util.spec_from_file_location("kv_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_rows_hold_their_answers_and_fit_the_prompt_budget(kv_real):
    fam = tiny_family("tiny-internvl")
    for task in kv_real.TASKS:
        rows = kv_real.make_rows(fam, task, 3, 600, seed=0, keys=4, hops=3)
        assert rows == kv_real.make_rows(fam, task, 3, 600, seed=0, keys=4, hops=3)  # seeded
        for row in rows:
            context, question = kv_real.split_prompt(fam, row)
            assert 480 < len(context) + len(question) <= 600
            if task == "vt":
                names, value = row["outputs"], row["question"].split("value ")[1].split(" ")[0]
                assert len(names) == 4 and f"VAR {names[0]} = {value}" in row["context"]
                assert all(f"VAR {b} = VAR {a} " in row["context"] for a, b in zip(names, names[1:]))
                assert row["answer_prefix"].startswith(" Answer: According to the chain(s) of variable assignment")
            else:
                key = row["question"].split(" for ")[1].split(" mentioned")[0]
                (value,) = row["outputs"]
                assert f"One of the special magic numbers for {key} is: {value}." in row["context"]
                assert row["context"].count("One of the special magic numbers") == (4 if task == "niah_multikey" else 1)
                assert row["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    vt = kv_real.variable_tracking(random.Random(1), n_noise=6, hops=2)  # the solved example comes first
    assert vt["context"].count("Question: Find all variables") == 1 and vt["context"].startswith("Memorize")
    with pytest.raises(SystemExit, match="too short for vt"):
        kv_real.make_rows(fam, "vt", 1, 40, seed=0)


def test_the_scorer_is_rulers_string_match_all(kv_real):
    assert kv_real.string_match_all(" 4819273.", ["4819273"]) == 1.0
    assert kv_real.string_match_all(" 481927.", ["4819273"]) == 0.0
    assert kv_real.string_match_all("abcde, FGHIJ and more", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)


def test_every_press_of_the_grid_runs_on_two_rows_and_is_metered(kv_real):
    fam = tiny_family("tiny-internvl")
    rows = kv_real.make_rows(fam, "niah_multikey", 2, 300, seed=0, keys=2)
    settings = kv_real.settings_grid((0.5,))
    measured = kv_real.run_task(fam, rows, settings, batch_size=2, log=lambda *a, **k: None)
    results = kv_real.summarise("niah_multikey", settings, measured, fam.model)
    assert [r["press"] for r in results] == ["none", "tova", "cosre"] + [f"kvpress:{m}" for m in kv_real.KVPRESS]
    for r in results:
        assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0
        if r["press"] == "none":
            assert r["kv_fraction_peak"] == 1.0
        else:  # half the context dropped; the question and answer (~50 of ~300 tokens) are not
            assert r["kv_fraction_prefill"] < 0.6 and r["kv_fraction_peak"] < 0.75
    assert "niah_multikey" in kv_real.table(results, ["niah_multikey"]).splitlines()[0]
