"""`--check` on every entry point: the real checks run (bad input exits 2 naming it, `use_gpu` on
a cluster without GPUs too), the report names what the job would do and ask Ray for, and nothing
starts — no output folder or manifest, no MLflow store, no model loaded, no Ray task or trial."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from jobs import evaluate, quickstart, sweep, video_qa
from mmreason.config import load_config
from mmreason.data.cinepile import CinepileConfig, outcome, question_info, question_rows
from mmreason.data.download import OK
from mmreason.data.gridworld import GridworldConfig, plan_shards
from mmreason.data.shards import MANIFEST_NAME, write_json_atomic, write_shard
from mmreason.models import build_tiny
from pipelines import aokvqa, cinepile, gridworld, mvot_import
from tests.media import cinepile_rows, write_json_rows
from tests.s3 import s3, s3_server  # noqa: F401  (pytest fixtures)
from tests.test_aokvqa import record

REPO = Path(__file__).resolve().parents[1]
MVOT_SAMPLE = REPO.parent / "shared" / "data" / "mvot" / "data_samples.zip"
GRIDWORLD = ["examples=4", "tasks={maze: {sizes: [3]}}", "splits={train: 0.5, val: 0.0, test: 0.5}",
             "step_images=false"]


def tree(root: Path) -> dict[str, int]:
    """Every file under `root` and its modification time: what a check must leave as it was."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def checked(main, args: list[str], capsys) -> dict:
    """`main(args --check)` exits 0; the report it printed, as data (print_check writes YAML, and
    its last line — that nothing was started — is YAML too). What the test printed before (a tiny
    backbone's build: DeepSpeed, imported by accelerate when a model is saved, logs to stdout) is
    not the job's."""
    capsys.readouterr()
    assert main([*args, "--check"]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("\ncheck: config and inputs are valid; nothing was started")
    return yaml.safe_load(printed)


def no_work(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} started during --check")
    return refuse


@pytest.fixture
def quiet(monkeypatch, mlflow_store, ray_session):
    """The shared local Ray (checks read its resources) and a fresh MLflow store that must stay
    absent; a model load, a Ray task or a Tune run fails the test."""
    import ray
    import ray.tune

    import mmreason.models

    monkeypatch.setattr(mmreason.models, "load_backbone", no_work("a model load"))
    monkeypatch.setattr(ray, "remote", no_work("a Ray task"))
    monkeypatch.setattr(ray.tune, "Tuner", no_work("a Ray Tune run"))
    yield Path(mlflow_store.removeprefix("sqlite:///"))


@pytest.fixture(scope="module")
def maze_dir(tmp_path_factory) -> Path:
    """Four 3×3 mazes (two held out) in two shards, by the grid-world job's own shard writer."""
    out = tmp_path_factory.mktemp("check") / "gw"
    cfg = load_config(GridworldConfig, None, [f"output_dir={out}", *GRIDWORLD])
    specs = plan_shards(cfg)
    entries = [gridworld._render_shard(asdict(s), cfg, str(out)) for s in specs]
    write_json_atomic(out / MANIFEST_NAME, gridworld._manifest(cfg, entries, len(specs)))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny("tiny-internvl", tmp_path_factory.mktemp("check") / "internvl")


@pytest.fixture(scope="module")
def cinepile_source(tmp_path_factory) -> Path:
    """Two clips with 3 and 2 test questions (the URLs are never fetched)."""
    rows = cinepile_rows({"http://127.0.0.1:9/c0.mp4": 3, "http://127.0.0.1:9/c1.mp4": 2})
    return write_json_rows(tmp_path_factory.mktemp("check") / "cinepile_test.json", rows)


@pytest.fixture(scope="module")
def cinepile_questions(tmp_path_factory, cinepile_source) -> Path:
    """The question shards and manifest the CinePile job writes for `cinepile_source`, by its own
    functions, without clips: all video QA's `--check` reads."""
    out = tmp_path_factory.mktemp("check") / "cinepile"
    cfg = load_config(CinepileConfig, None, [f"source={cinepile_source}", "split=test", f"output_dir={out}"])
    work = cinepile.plan(cfg)
    outcomes = {}
    for clip in work.plans:
        rows = question_rows(clip, {"frame_times": [0.0], "duration": 1.0, "frame_size": [8, 8]})
        write_shard(out / clip.relpath, rows, question_info(cfg, clip))
        outcomes[clip.clip_id] = outcome(clip, OK, path=clip.relpath, rows=len(rows),
                                         bytes=(out / clip.relpath).stat().st_size)
    write_json_atomic(out / MANIFEST_NAME, cinepile._manifest(cfg, work.plans, outcomes, [], work.rows_read))
    return out


# ------------------------------------------------------------------------------------------ data jobs

def test_gridworld_check_plans_the_shards_and_writes_nothing(tmp_path, quiet, capsys):
    out = tmp_path / "gw"
    report = checked(gridworld.main, [f"output_dir={out}", *GRIDWORLD, "rows_per_shard=1"], capsys)
    assert report["config"]["rows_per_shard"] == 1 and report["output_dir"] == str(out)
    assert report["shards"] == {"planned": 4, "done": 0, "to_build": 4}
    assert report["rows"] == {"planned": 4, "done": 0, "to_build": 4}
    assert report["ray"] == {"tasks": 4, "per_task": {"CPU": 1}, "concurrency": 2, "cluster": {"CPU": 2.0}}
    assert not out.exists() and not quiet.exists()


def test_gridworld_check_on_a_finished_dataset_finds_it_done_and_overwrite_deletes_nothing(maze_dir, quiet, capsys):
    before = tree(maze_dir)
    report = checked(gridworld.main, [f"output_dir={maze_dir}", *GRIDWORLD], capsys)
    assert report["shards"] == {"planned": 2, "done": 2, "to_build": 0} and report["ray"]["tasks"] == 0
    # a config that no longer produces the train shard: refused, or (--overwrite) listed, not deleted
    other = [f"output_dir={maze_dir}", *GRIDWORLD[:2], "splits={train: 0.0, val: 0.0, test: 1.0}", GRIDWORLD[3]]
    assert gridworld.main([*other, "--check"]) == 2
    assert "holds shards this config does not produce (train/maze-n3-0000.parquet)" in capsys.readouterr().err
    report = checked(gridworld.main, [*other, "--overwrite"], capsys)
    assert report["shards"] == {"planned": 1, "done": 0, "to_build": 1, "strays_to_delete": 1}
    assert tree(maze_dir) == before


def test_gridworld_check_refuses_a_bad_output_dir(tmp_path, quiet, capsys):
    assert gridworld.main(["output_dir=hdfs://x", *GRIDWORLD, "--check"]) == 2
    assert "output_dir: 'hdfs://x' is not a supported location" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert gridworld.main([f"output_dir={tmp_path / 'file' / 'gw'}", *GRIDWORLD, "--check"]) == 2
    assert f"output dir {tmp_path / 'file' / 'gw'} is not writable: {tmp_path / 'file'} is not a folder" \
        in capsys.readouterr().err


def test_gridworld_check_on_an_object_store_lists_the_prefix_and_writes_no_object(s3, quiet, capsys):
    report = checked(gridworld.main, [f"output_dir={s3.uri}/gw", *GRIDWORLD], capsys)
    assert report["output_dir"] == f"{s3.uri}/gw" and report["shards"]["to_build"] == 2
    assert s3.keys() == []  # not even the folder marker a write probe leaves
    assert gridworld.main(["output_dir=s3://no-such-bucket-here/data", *GRIDWORLD, "--check"]) == 2
    assert "output dir s3://no-such-bucket-here/data is not writable" in capsys.readouterr().err


def test_cinepile_check_reads_the_source_and_plans_the_clips_without_fetching(cinepile_source, tmp_path, quiet,
                                                                             capsys):
    out = tmp_path / "cinepile"
    args = [f"source={cinepile_source}", "split=test", f"output_dir={out}", "download.concurrency=1"]
    report = checked(cinepile.main, args, capsys)
    assert report["source"] == {"rows_read": 5, "rows_rejected": 0}
    assert report["clips"] == {"planned": 2, "done": 0, "to_fetch": 2}
    assert report["questions"] == {"planned": 5, "done": 0, "to_build": 5}
    assert report["shards"] == {"planned": 4, "done": 0, "to_build": 4}  # a clip shard and a question shard each
    assert report["videos"] == str(out / "videos") and report["output_dir"] == str(out)
    assert report["ray"] == {"tasks": 2, "per_task": {"CPU": 1}, "concurrency": 1, "cluster": {"CPU": 2.0}}
    assert not out.exists()
    assert cinepile.main([f"source={tmp_path / 'nope.json'}", f"output_dir={out}", "--check"]) == 2
    assert f"CinePile source {tmp_path / 'nope.json'} does not exist" in capsys.readouterr().err


def test_aokvqa_check_checks_every_record_and_plans_the_shards(tmp_path, quiet, capsys):
    ann, coco = tmp_path / "aokvqa", tmp_path / "coco"
    ann.mkdir()
    (coco / "val2017").mkdir(parents=True)
    val = [record("q1", 1), record("q2", 2), record("q3", 3), record("q4", 4, answer=7)]  # q4: no such choice
    (ann / "aokvqa_v1p0_val.json").write_text(json.dumps(val))
    out = tmp_path / "out"
    args = [f"source={ann}", f"coco_dir={coco}", "splits=[val]", f"output_dir={out}", "rows_per_shard=2"]
    report = checked(aokvqa.main, args, capsys)
    assert report["sources"] == {"val": str(ann / "aokvqa_v1p0_val.json")} and report["records_rejected"] == 1
    assert report["shards"] == {"planned": 2, "done": 0, "to_build": 2}
    assert report["rows"] == {"planned": 3, "done": 0, "to_build": 3}
    assert report["ray"]["tasks"] == 2 and report["ray"]["per_task"] == {"CPU": 1}
    assert not out.exists()
    assert aokvqa.main([*args[:1], f"coco_dir={tmp_path / 'nococo'}", *args[2:], "--check"]) == 2
    assert "coco_dir" in capsys.readouterr().err


@pytest.mark.skipif(not MVOT_SAMPLE.is_file(), reason=f"MVoT sample not found at {MVOT_SAMPLE}")
def test_mvot_import_check_reads_the_archive_and_plans_the_shards(tmp_path, quiet, capsys):
    out = tmp_path / "mvot"
    report = checked(mvot_import.main, [str(MVOT_SAMPLE), f"output_dir={out}", "rows_per_shard=4"], capsys)
    assert report["config"]["source"] == str(MVOT_SAMPLE) and report["records_rejected"] == 0
    assert report["sources"] == ["data_samples/frozenlake/level3/data.json", "data_samples/maze/grid3.json"]
    assert report["rows"] == {"planned": 18, "done": 0, "to_build": 18}
    # frozenlake: 12 train rows in 3 shards; maze: 3 train, 1 val, 2 test rows, a shard each
    assert report["shards"] == {"planned": 6, "done": 0, "to_build": 6} and report["ray"]["tasks"] == 6
    assert not out.exists()
    assert mvot_import.main([str(tmp_path / "no.zip"), f"output_dir={out}", "--check"]) == 2
    assert f"MVoT source {tmp_path / 'no.zip'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ evaluation

def eval_args(maze_dir: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "configs/eval/press-maze.yaml"), f"model.checkpoint={model_dir}", f"data.path={maze_dir}",
            "data.sizes=[3]", f"output_dir={out}", "max_examples=2", "press=tova", "press.factor=0.5", *extra]


def test_evaluate_check_names_checkpoint_rows_press_and_task_without_loading_the_model(maze_dir, model_dir, tmp_path,
                                                                                      quiet, capsys):
    out = tmp_path / "eval"
    report = checked(evaluate.main, eval_args(maze_dir, model_dir, out, "threads=2", "precision=bf16"), capsys)
    assert report["config"]["max_examples"] == 2 and report["checkpoint"] == str(model_dir) and report["rows"] == 2
    assert report["press"] == {"name": "tova", "factor": 0.5}
    assert (report["device"], report["precision"], report["task"]) == ("cpu", "bf16", {"CPU": 2, "GPU": 0})
    assert report["writes"]["results"] == f"{out}/results.csv"
    assert report["writes"]["mlflow"]["experiment"] == "mmreason-eval"
    assert not out.exists() and not quiet.exists()


@pytest.mark.parametrize("extra, needle", [
    (["use_gpu=true"], "use_gpu: true asks for 1 GPU(s) per worker, but the cluster has 0 GPU(s)"),
    (["model.checkpoint=/nonexistent/ckpt"], "model.checkpoint: checkpoint /nonexistent/ckpt does not exist"),
    (["output_dir=hdfs://x"], "output_dir: 'hdfs://x'"),
])
def test_evaluate_check_exits_2_naming_the_bad_input(maze_dir, model_dir, tmp_path, quiet, capsys, extra, needle):
    if extra == ["use_gpu=true"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: use_gpu is not refused here")
    assert evaluate.main([*eval_args(maze_dir, model_dir, tmp_path / "eval", *extra), "--check"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "eval").exists() and not quiet.exists()


def test_video_qa_check_names_checkpoint_questions_and_task_without_loading_the_model(cinepile_questions, tmp_path,
                                                                                     quiet, capsys):
    model = build_tiny("tiny-phi4mm", tmp_path / "phi")
    results = tmp_path / "out" / "results.json"
    args = [f"model_path={model}", f"dataset_path={cinepile_questions}", f"output_file={results}"]
    report = checked(video_qa.main, [*args, "hard_split=true"], capsys)
    assert report["config"]["hard_split"] is True
    assert (report["checkpoint"], report["dataset"]) == (str(model), str(cinepile_questions))
    assert (report["rows"], report["clips"]) == (2, 2)  # the hard questions: 1 of c0's 3, 1 of c1's 2
    assert (report["device"], report["precision"], report["task"]) == ("cpu", "fp32", {"CPU": 1, "GPU": 0})
    assert report["writes"]["results"] == str(results) and report["writes"]["mlflow"]["experiment"] == "mmreason-eval"
    assert not results.parent.exists() and not quiet.exists()
    if not torch.cuda.is_available():
        assert video_qa.main([*args, "use_gpu=true", "--check"]) == 2
        assert "use_gpu: true asks for 1 GPU(s) per worker, but the cluster has 0 GPU(s)" in capsys.readouterr().err
    assert video_qa.main([f"model_path={tmp_path / 'missing'}", *args[1:], "--check"]) == 2
    assert f"model_path: checkpoint {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ sweep, quickstart

def sweep_args(maze_dir: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "configs/sweep/presses-maze.yaml"), f"output_dir={out}",
            f"evaluate_overrides=[model.checkpoint={model_dir}, data.path={maze_dir}, 'data.sizes=[3]', "
            "max_examples=2]", *extra]


def test_sweep_check_counts_the_trials_and_their_resources_without_starting_one(maze_dir, model_dir, tmp_path, quiet,
                                                                               capsys):
    out = tmp_path / "sweeps"
    report = checked(sweep.main, sweep_args(maze_dir, model_dir, out, "cpus_per_trial=0.5"), capsys)
    assert (report["trials"], report["search"]) == (15, "grid")  # tova: 3 factors; cosre: 3 × 2 × 2
    resources = report["resources"]
    assert resources["per_trial"] == {"CPU": 0.5, "GPU": 0.0} and resources["cluster"] == {"CPU": 2.0}
    # as many as the free CPUs hold: 4 on an idle 2-CPU Ray (fewer while another test's actors linger)
    assert 1 <= resources["concurrent_trials"] <= 4
    assert resources["total"] == {"CPU": 0.5 * resources["concurrent_trials"], "GPU": 0.0}
    assert report["evaluate"] == {"checkpoint": str(model_dir), "data": str(maze_dir), "max_examples": 2,
                                  "mode": "cot", "precision": "fp32"}
    assert report["run_dir"].startswith(f"{out}/presses-maze-") and report["mlflow"]["experiment"] == "mmreason-sweep"
    assert report["splits"] == {"trials_selected_on": "val", "front_reported_on": "test"}
    assert not out.exists() and not quiet.exists()
    if not torch.cuda.is_available():
        assert sweep.main([*sweep_args(maze_dir, model_dir, out, "use_gpu=true"), "--check"]) == 2
        assert "use_gpu: true asks for 1 GPU(s) per worker, but the cluster has 0 GPU(s)" in capsys.readouterr().err
    bad = sweep_args(maze_dir, model_dir, out)
    bad[2] = bad[2].replace(str(model_dir), "/nonexistent/ckpt")
    assert sweep.main([*bad, "--check"]) == 2
    assert "/nonexistent/ckpt" in capsys.readouterr().err


def test_dare_without_a_trained_router_is_refused_by_evaluate_and_sweep_checks(maze_dir, model_dir, tmp_path, quiet,
                                                                               capsys):
    """`press=dare` needs `router_path`: jobs.evaluate and the shipped configs/sweep/dare-maze.yaml
    refuse it missing or pointing nowhere, naming it, before any model loads; with a router file
    there (here a fresh one saved the way the dare stage saves its own) the sweep checks."""
    from mmreason.kv.dare import DareRouter, save_router

    dare = [*eval_args(maze_dir, model_dir, tmp_path / "eval")[:5], "press=dare", "press.rho_text=0.5"]
    assert evaluate.main([*dare, "--check"]) == 2
    assert "press.router_path: press 'dare' needs it" in capsys.readouterr().err
    assert evaluate.main([*dare, f"press.router_path={tmp_path / 'none.pt'}", "--check"]) == 2
    assert f"router_path: no router file at {tmp_path / 'none.pt'}" in capsys.readouterr().err

    out = tmp_path / "sweeps"
    args = [str(REPO / "configs/sweep/dare-maze.yaml"), f"output_dir={out}",
            f"evaluate_overrides=[model.checkpoint={model_dir}, data.path={maze_dir}, 'data.sizes=[3]', max_examples=2]"]
    assert sweep.main([*args, "presses.dare.router_path=null", "--check"]) == 2
    assert "press.router_path: press 'dare' needs it" in capsys.readouterr().err
    assert sweep.main([*args, f"presses.dare.router_path={tmp_path / 'none.pt'}", "--check"]) == 2
    assert f"router_path: no router file at {tmp_path / 'none.pt'}" in capsys.readouterr().err
    save_router(DareRouter(32), tmp_path / "dare_router.pt")
    report = checked(sweep.main, [*args, f"presses.dare.router_path={tmp_path / 'dare_router.pt'}"], capsys)
    assert report["trials"] == 9  # rho_text × rho_vis
    assert not out.exists() and not (tmp_path / "eval").exists() and not quiet.exists()


def test_quickstart_check_lists_the_steps_and_each_stages_resources_and_starts_none(tmp_path, quiet, capsys):
    root = tmp_path / "qs"
    args = [f"root={root}", "data.tasks={maze: {sizes: [3], examples: 20}}", "data.rows_per_shard=8",
            "sweep.presses={tova: {factor: {grid: [0.5, 0.75]}}}"]
    report = checked(quickstart.main, args, capsys)
    assert report["steps"] == ["data", "cot", "coconut", "dare", "presses", "sweep"]
    assert report["data"]["output_dir"] == f"{root}/data/gridworld"
    assert report["data"]["shards"] == {"planned": 4, "done": 0, "to_build": 4}  # 16 train rows in 2, val, test
    assert report["stages"]["cot"] == {"run": f"{root}/train/quickstart-cot", "starts_from": "tiny-internvl",
                                       "epochs": 10, "workers": 2, "per_worker": {"CPU": 1.0}, "total": {"CPU": 2.0}}
    assert {report["stages"][s]["starts_from"] for s in ("coconut", "dare")} == {f"{root}/train/quickstart-cot/export"}
    assert "quickstart-eval-kvpress-snapkv" in report["presses"]["runs"] and report["presses"]["device"] == "cpu"
    assert report["sweep"] == {"trials": 2, "per_trial": {"CPU": 1.0, "GPU": 0.0}, "output_dir": f"{root}/sweep"}
    assert report["mlflow"]["experiment"] == "mmreason-pipeline"
    assert not root.exists() and not quiet.exists()
    if not torch.cuda.is_available():
        assert quickstart.main([*args, "dare.use_gpu=true", "--check"]) == 2
        assert "dare.use_gpu: true asks for 1 GPU(s) per worker, but the cluster has 0" in capsys.readouterr().err
    assert quickstart.main([*args, "cot.deepspeed=configs/deepspeed/nope.json", "--check"]) == 2
    assert "cot: deepspeed: config file not found: configs/deepspeed/nope.json" in capsys.readouterr().err
    assert not root.exists()
