"""Sweeps: the Pareto front on a hand-made results table, its table and plots, the search space
(grid points, Optuna suggestions), every kind of bad input failing before a trial starts — and
real sweeps on Ray Tune (a tiny model saved to disk, a few generated maze rows) whose MLflow store,
read back with MlflowClient, holds the sweep's run, a child run per trial and the Pareto artifacts."""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path
from dataclasses import asdict

import pytest
import torch

from jobs import sweep as job
from mmreason.config import ConfigError, load_config
from mmreason.eval.pareto import front_table, pareto_front, plot_front
from mmreason.sweep import SweepConfig, build_space, check_points

OBJ = [("accuracy", "max"), ("kv_bytes", "min"), ("latency", "min")]
TABLE = [  # by hand: which rows no other row beats on every objective
    {"name": "full", "accuracy": 0.90, "kv_bytes": 100, "latency": 10},     # front: best accuracy
    {"name": "half", "accuracy": 0.85, "kv_bytes": 50, "latency": 9},       # front
    {"name": "worse", "accuracy": 0.80, "kv_bytes": 60, "latency": 9},      # dominated by half
    {"name": "tiny", "accuracy": 0.40, "kv_bytes": 10, "latency": 12},      # front: fewest bytes
    {"name": "fast", "accuracy": 0.40, "kv_bytes": 70, "latency": 5},       # front: fastest
    {"name": "half2", "accuracy": 0.85, "kv_bytes": 50, "latency": 9},      # equal to half: both kept
    {"name": "slow", "accuracy": 0.85, "kv_bytes": 50, "latency": 11},      # dominated by half (latency)
    {"name": "nan", "accuracy": math.nan, "kv_bytes": 1, "latency": 1},     # not a candidate
    {"name": "missing", "accuracy": 0.99, "kv_bytes": 1},                   # not a candidate
]


def test_pareto_front_of_a_hand_made_table():
    front = pareto_front(TABLE, OBJ)
    assert [TABLE[i]["name"] for i in front] == ["full", "half", "half2", "tiny", "fast"]  # best accuracy first
    # accuracy vs bytes only: 'fast' is now beaten by 'tiny' (same accuracy, fewer bytes), and 'slow'
    # ties with 'half'
    two = pareto_front(TABLE[:-1], OBJ[:2])
    assert [TABLE[i]["name"] for i in two] == ["full", "half", "half2", "slow", "tiny"]
    assert [TABLE[i]["name"] for i in pareto_front(TABLE, OBJ[:2])] == ["missing"]  # it has both of these
    # flipping a mode flips the answer: the least accurate, largest, slowest rows
    flipped = pareto_front(TABLE, [("accuracy", "min"), ("kv_bytes", "max")])
    assert {TABLE[i]["name"] for i in flipped} == {"fast", "full"}
    assert pareto_front([], OBJ) == [] and pareto_front([{"accuracy": 1}], OBJ[:1]) == [0]
    with pytest.raises(ValueError, match="'up'"):
        pareto_front(TABLE, [("accuracy", "up")])


def test_front_table_and_plots(tmp_path):
    front = pareto_front(TABLE, OBJ)
    text = front_table(TABLE, front, ["name", "accuracy", "kv_bytes"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "accuracy", "kv_bytes"] and len(lines) == 1 + len(front)
    assert lines[1].split() == ["full", "0.9", "100"]
    plot_front(TABLE, front, OBJ, "name", tmp_path / "p.png", tmp_path / "p.html", title="t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "p.html").read_text()
    assert "plotly" in html and "Pareto front" in html and "kv_bytes: 100" in html  # hover text, self-contained
    assert len(html) > 1_000_000 and "<script src=\"https://cdn" not in html  # plotly.js inlined: opens offline


def sweep(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, list(overrides))


def test_grid_points_cover_every_press_and_value():
    space = build_space(sweep("presses={tova: {factor: {grid: [0.25, 0.5]}, min_size: 4}, "
                              "cosre: {block: 4, keep_h: {grid: [1, 2]}, keep_w: {grid: [1, 4]}}}"))
    points = space.grid_points()
    assert len(points) == 2 + 4 == space.size()
    assert {"group": "tova", "values": {"min_size": 4, "factor": 0.5}} in points
    assert {"group": "cosre", "values": {"block": 4, "keep_h": 2, "keep_w": 4}} in points
    from mmreason.kv import make_press

    assert check_points(space, make_press) == 6


def test_optuna_suggestions_stay_in_their_ranges():
    import optuna

    space = build_space(sweep("search.algorithm=optuna", "presses={cosre: {block: 4, keep_h: {int: [1, 4]}, "
                              "base_delta: {uniform: [0.0, 0.2]}}, tova: {factor: {loguniform: [0.1, 1.0]}}}"))
    assert space.size() == math.inf
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        point = space.suggest(study.ask())["point"]
        seen.add(point["group"])
        v = point["values"]
        if point["group"] == "cosre":
            assert v["block"] == 4 and 1 <= v["keep_h"] <= 4 and 0.0 <= v["base_delta"] <= 0.2
        else:
            assert 0.1 <= v["factor"] <= 1.0
    assert seen == {"cosre", "tova"}


@pytest.mark.parametrize("overrides, needle", [
    (["presses={}"], "presses is empty"),
    (["presses={tova: {factor: {grid: []}}}"], "presses.tova.factor.grid is empty"),
    (["presses={tova: {factor: 0.5}}"], "nothing is swept"),
    (["presses={tova: {factor: {uniform: [0.1, 0.9]}}}"], "needs search.algorithm=optuna"),
    (["search.algorithm=optuna", "presses={tova: {factor: {uniform: [0.9, 0.1]}}}"], "an empty range"),
    (["presses={tova: {factor: {range: [1, 2]}}}"], "a swept setting is one of"),
    (["stage=configs/train/cot-maze.yaml"], "stage_space is empty"),
    (["asha.enabled=true", "presses={tova: {factor: {grid: [0.5, 1.0]}}}"], "a press sweep has no epochs"),
    (["objectives=[]"], "at least one"),
])
def test_search_space_mistakes_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_space(sweep(*overrides))


# ------------------------------------------------------------- bad input through the job, before any trial

@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """A tiny model saved to disk and four generated 3×3 maze rows (val and test ones among them), without Ray."""
    from mmreason.data.gridworld import GridworldConfig, plan_shards
    from mmreason.data.shards import MANIFEST_NAME, write_json_atomic
    from mmreason.models import build_tiny
    from pipelines import gridworld

    root = tmp_path_factory.mktemp("sweepin")
    data = root / "gw"
    cfg = load_config(GridworldConfig, None, [f"output_dir={data}", "examples=4", "tasks={maze: {sizes: [3]}}",
                                              "splits={train: 0.34, val: 0.33, test: 0.33}", "step_images=false"])
    specs = plan_shards(cfg)
    entries = [gridworld._render_shard(asdict(s), cfg, str(data)) for s in specs]
    write_json_atomic(data / MANIFEST_NAME, gridworld._manifest(cfg, entries, len(specs)))
    return {"data": data, "model": build_tiny("tiny-internvl", root / "m"), "root": root}


def sweep_args(inputs, *extra: str) -> list[str]:
    return ["configs/sweep/presses-maze.yaml", f"output_dir={inputs['root'] / 'sweeps'}",
            f"evaluate_overrides=[model.checkpoint={inputs['model']}, data.path={inputs['data']}, 'data.sizes=[3]', "
            "max_examples=2, batch_size=2, generation.max_new_tokens=8]", *extra]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, env, needle", [
    (["presses={tova: {budget: {grid: [4, 8]}}}"], {}, "press.budget: unknown setting for press 'tova'"),
    (["presses={h2o: {ratio: {grid: [0.5]}}}"], {}, "unknown press 'h2o'"),
    (["presses={dare: {rho_text: {grid: [1.5, 0.5]}}}"], {}, "rho_text"),  # a bad value, before the missing router
    (["presses={dare: {rho_text: {grid: [0.5, 0.7]}}}"], {}, "press.router_path: press 'dare' needs it"),
    (["presses={cosre: {block: {grid: [2, 4]}, keep_h: 4}}"], {}, "keep_h must be in [1, block=2], got 4"),
    (["presses={tova: {factor: {grid: []}}}"], {}, "the search space has no point"),
    (["objectives=[{metric: bleu, mode: max}, {metric: kv_bytes_peak, mode: min}]"], {}, "no trial reports 'bleu'"),
    (["evaluate_overrides=[model.checkpoint=/nonexistent/ckpt, data.path={data}]"], {}, "/nonexistent/ckpt"),
    (["presses={}", "stage=configs/train/dare-maze.yaml", "stage_space={dare.rho_x: {grid: [0.5]}}"], {},
     "unknown config key 'dare.rho_x'"),
    (["presses={}", "stage=configs/train/dare-maze.yaml", "stage_space={dare.rho_vis: {grid: [0.5, 0]}}"], {},
     "dare.rho_vis must be in (0, 1], got 0"),
    (["presses={}", "stage=configs/train/cot-maze.yaml", "stage_space={optim.lr: {grid: [0.01]}}", "asha.enabled=true",
      "asha.metric=cot_accuracy", "stage_overrides=[data.path={data}]"], {}, "asha.metric: 'cot_accuracy' is not reported every epoch"),
    (["presses={}", "stage=configs/train/dare-maze.yaml", "stage_space={dare.rho_vis: {grid: [0.5]}}",
      "stage_overrides=[init_from=/nonexistent/cot]"], {}, "init_from: checkpoint /nonexistent/cot does not exist"),
    ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "cannot be reached"),
    ([], {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/dir/mlflow.db"}, "folder /nonexistent/dir does not exist"),
    ([], {"MLFLOW_TRACKING_URI": "/tmp/some/mlruns"}, "file store, which MLflow 3.17 refuses"),
])
def test_bad_sweep_input_fails_before_any_trial(eval_inputs, monkeypatch, capsys, extra, env, needle):
    import ray.tune

    import pipelines
    from jobs import train  # imported now: it binds `init_ray` at import, which must not be the patch below

    def no_trials(*a, **k):
        raise AssertionError("a trial (or Ray) started before the input was checked")

    monkeypatch.setattr(ray.tune, "Tuner", no_trials)
    monkeypatch.setattr(pipelines, "init_ray", no_trials)
    monkeypatch.setattr(train, "init_ray", no_trials)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{eval_inputs['root'] / 'mlflow.db'}")
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(port=_closed_port()))
    extra = [e.replace("{data}", str(eval_inputs["data"])) for e in extra]  # the override list replaces the default's
    assert job.main(sweep_args(eval_inputs, *extra)) == 2
    assert needle in capsys.readouterr().err


def test_use_gpu_and_precision_reach_each_trials_resources_and_evaluation(eval_inputs, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{eval_inputs['root'] / 'mlflow.db'}")
    args = sweep_args(eval_inputs, "use_gpu=true", "gpus_per_trial=0.5", "precision=bf16")
    _, plan = job.prepare(job.load(args[0], args[1:]))
    assert plan["trial_gpus"] == 0.5
    assert plan["evaluate"]["use_gpu"] is True and plan["evaluate"]["precision"] == "bf16"
    _, plan = job.prepare(job.load(args[0], args[1:-3]))  # the defaults: CPU trials in fp32
    assert plan["trial_gpus"] == 0.0
    assert plan["evaluate"]["use_gpu"] is False and plan["evaluate"]["precision"] == "fp32"
    # a stage trial also holds its Ray Train workers' GPUs while it trains
    stage = ["presses={}", "stage=configs/train/cot-maze.yaml", "stage_space={optim.lr: {grid: [0.01, 0.02]}}",
             f"stage_overrides=[data.path={eval_inputs['data']}, workers=2, use_gpu=true, gpus_per_worker=1]",
             "objectives=[{metric: cot_accuracy, mode: max}]"]
    _, plan = job.prepare(job.load(args[0], args[1:-3] + stage + ["use_gpu=true", "gpus_per_trial=0.5"]))
    assert plan["trial_gpus"] == 2.5
    # the evaluation config asking for another precision is named, not silently replaced
    conflicting = args[:2] + [args[2][:-1] + ", precision=fp16]"]
    with pytest.raises(ConfigError, match="precision: the evaluation config .* asks for precision=fp16, the sweep "
                                          "for precision=fp32"):
        job.prepare(job.load(conflicting[0], conflicting[1:]))
    with pytest.raises(ConfigError, match="gpus_per_trial must be > 0 with use_gpu"):
        job.load(args[0], args[1:] + ["gpus_per_trial=0"])


# ------------------------------------------------------------- real sweeps on Ray Tune

@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: use_gpu is not refused")
def test_a_gpu_sweep_on_a_cluster_without_gpus_is_refused_before_any_trial(eval_inputs, ray_session, monkeypatch):
    import ray.tune

    monkeypatch.setattr(ray.tune, "Tuner", lambda *a, **k: pytest.fail("a trial started"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{eval_inputs['root'] / 'mlflow.db'}")
    args = sweep_args(eval_inputs, "use_gpu=true")
    with pytest.raises(ConfigError, match=r"use_gpu: true asks for 1 GPU.*the cluster has 0 GPU"):
        job.run_sweep(job.load(args[0], args[1:]))


@pytest.mark.integration
def test_a_trial_bigger_than_the_cluster_is_refused_before_it_starts(maze_data, ray_session, monkeypatch, tmp_path):
    import ray.tune

    monkeypatch.setattr(ray.tune, "Tuner", lambda *a, **k: pytest.fail("a trial started"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["configs/sweep/stage-asha-maze.yaml", f"output_dir={tmp_path}",
            f"stage_overrides=[data.path={maze_data}, workers=3, cpus_per_worker=1]"]
    with pytest.raises(ConfigError, match=r"a trial needs 3.1 CPU \(trial \+ its Ray Train workers\) but the cluster "
                                          r"has 2 CPU"):
        job.run_sweep(job.load(args[0], args[1:]))


def _children(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.integration
def test_press_grid_sweep_tracks_each_trial_and_the_pareto_front(eval_inputs, ray_session, mlflow_store, capsys):
    import mlflow

    args = sweep_args(eval_inputs, "name=grid", "presses={tova: {factor: {grid: [0.25, 1.0]}, min_size: 1}, "
                      "cosre: {block: 4, keep_h: {grid: [1]}, keep_w: 1}}")
    cfg = job.load(args[0], args[1:])
    out = job.run_sweep(cfg)
    assert "Pareto front" in capsys.readouterr().out

    client = mlflow.MlflowClient(mlflow_store)
    parent = client.get_run(out["parent_run_id"])
    assert client.get_experiment(parent.info.experiment_id).name == "mmreason-sweep"
    assert parent.data.tags["stage"] == "sweep" and parent.data.metrics["trials"] == 4  # 3 + uncompressed
    children = _children(client, parent.info.run_id)
    assert {r.info.status for r in children} == {"FINISHED"}
    on_val = [r for r in children if r.data.params["data.evaluate_on"] == "val_split"]
    on_test = {r.info.run_name: r for r in children if r.data.params["data.evaluate_on"] == "eval_split"}
    trials = [r for r in on_val if r.data.tags["trial_id"]]
    uncompressed, = [r for r in on_val if not r.data.tags["trial_id"]]
    assert len(trials) == 3 and len(on_val) + len(on_test) == len(children)
    assert {r.data.tags["press"] for r in trials} == {"tova", "cosre"} and uncompressed.data.tags["press"] == "none"
    assert len({r.data.tags["trial_id"] for r in trials}) == 3
    assert {r.data.tags["sweep"] for r in children} == {"grid"}
    for run in trials:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["git_commit"] == parent.data.tags["git_commit"] and len(tags["config_hash"]) == 16
        assert tags["dataset_manifest_hash"] and tags["stage"] == "evaluate"
        assert {"accuracy", "kv_bytes_peak", "latency_ms_per_example", "retained_vision_prefill"} <= set(metrics)
    by_factor = {r.data.params.get("press.factor"): r.data.metrics["kv_bytes_peak"] for r in trials}
    assert by_factor["0.25"] < by_factor["1.0"]  # a quarter of the budget: fewer bytes

    names = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert names == {f"pareto/{f}" for f in ("pareto.csv", "pareto.txt", "pareto.png", "pareto.html", "trials.csv")}
    with open(client.download_artifacts(parent.info.run_id, "pareto/pareto.csv")) as fh:
        logged = {row["run_name"]: row for row in csv.DictReader(fh)}
    # selected on val: the front the sweep logged is the front of what its trials (and the
    # uncompressed reference) measured on the validation rows
    rows = [{"run_name": r.info.run_name, **r.data.metrics} for r in on_val]
    objectives = [("accuracy", "max"), ("kv_bytes_peak", "min"), ("latency_ms_per_example", "min")]
    assert set(logged) == {rows[i]["run_name"] for i in pareto_front(rows, objectives)}
    assert parent.data.metrics["pareto_size"] == len(logged) >= 1
    # reported on test: each front member evaluated again on the test rows, and only those
    assert set(on_test) == {f"{name}-test" for name in logged}
    for name, row in logged.items():
        test = on_test[f"{name}-test"]
        assert float(row["test_accuracy"]) == test.data.metrics["accuracy"]
        assert float(row["test_kv_bytes_peak"]) == test.data.metrics["kv_bytes_peak"]
        if row["trial_id"]:  # the trial's own run carries its test numbers too
            trial, = [r for r in trials if r.info.run_name == name]
            assert client.get_run(trial.info.run_id).data.metrics["test_accuracy"] == test.data.metrics["accuracy"]
    with open(Path(out["run_dir"]) / "trials" / "results.csv") as fh:
        splits = {row["run_name"]: row["split"] for row in csv.DictReader(fh)}
    assert {splits[r.info.run_name] for r in on_val} == {"val"} and {splits[n] for n in on_test} == {"test"}
    assert any(r["label"] == "uncompressed" for r in out["rows"])


@pytest.mark.integration
def test_optuna_multi_objective_sweep(eval_inputs, ray_session, mlflow_store):
    import mlflow

    args = sweep_args(eval_inputs, "name=opt", "search={algorithm: optuna, num_samples: 2, seed: 3}",
                      "presses={tova: {factor: {uniform: [0.2, 1.0]}, min_size: 1}}", "precision=bf16",
                      "objectives=[{metric: accuracy, mode: max}, {metric: kv_bytes_peak, mode: min}]")
    out = job.run_sweep(job.load(args[0], args[1:]))
    assert [(r["label"] == "uncompressed", r["status"]) for r in out["rows"]] == [(False, "done")] * 2 + [(True, "done")]
    children = _children(mlflow.MlflowClient(mlflow_store), out["parent_run_id"])
    assert {r.data.params["precision"] for r in children} == {"bf16"}  # each trial evaluated in the sweep's dtype
    trials = [r for r in children if r.data.tags["trial_id"] and r.data.params["data.evaluate_on"] == "val_split"]
    factors = sorted(float(r.data.params["press.factor"]) for r in trials)
    assert len(factors) == 2 and factors[0] != factors[1] and 0.2 <= factors[0] and factors[1] <= 1.0


@pytest.mark.integration
def test_dare_stage_sweep_over_retention_targets_reports_every_epoch_to_tune(maze_data, eval_inputs, ray_session,
                                                                            mlflow_store, tmp_path):
    """Train V2 inside Tune: each trial runs jobs.train's dare stage (its own TorchTrainer) at its
    retention target; the per-epoch reports reach Tune (what ASHA acts on), the export's pruned KV
    cache is measured, and no trial's MLflow run is left RUNNING."""
    import mlflow

    args = ["configs/sweep/dare-stage-asha-maze.yaml", "name=st", f"output_dir={tmp_path / 'sweeps'}",
            f"stage_overrides=[init_from={eval_inputs['model']}, data.path={maze_data}, optim.epochs=2, "
            "optim.batch_size=16, workers=1, cpus_per_worker=0.9, eval.max_examples=2, eval.epoch_examples=0, "
            "dare.fit_rows=4, dare.fit_epochs=2, "
            "'eval.modes={cot: {max_new_tokens: 8}}']",
            "stage_space={dare.rho_vis: {grid: [0.25, 1.0]}}", "asha.grace_period=1",
            "objectives=[{metric: cot_accuracy, mode: max}, {metric: cot_kv_bytes_peak, mode: min}]"]
    out = job.run_sweep(job.load(args[0], args[1:]))
    rows = out["rows"]
    assert len(rows) == 2 and any(r["status"] == "done" for r in rows)
    for row in rows:  # 2 epochs reported as they ended (+ the trial's final report), or stopped by ASHA
        assert row["training_iteration"] == 3 if row["status"] == "done" else row["status"] == "stopped", row
    done = {json.loads(r["settings"])["dare.rho_vis"]: r for r in rows if r["status"] == "done"}
    for row in done.values():
        assert row["epoch"] == 1 and 0 <= row["cot_accuracy"] <= 1 and row["cot_kv_bytes_peak"] > 0
    if len(done) == 2:  # keeping a quarter of the image entries holds fewer bytes than keeping all
        assert done[0.25]["cot_retained_vision_prefill"] < done[1.0]["cot_retained_vision_prefill"]
    for row in done.values():  # each trial's export evaluated on the validation rows: what the front is chosen on
        results = json.loads((Path(out["run_dir"]) / "train" / row["run_name"] / "eval" / "results.json").read_text())
        assert results["cot"]["split"] == "val"
    assert out["front"] and all(rows[i]["status"] == "done" for i in out["front"])
    for i in out["front"]:  # and the front's exports on the test rows
        assert 0 <= rows[i]["test_cot_accuracy"] <= 1 and rows[i]["test_cot_n"] == 2 and rows[i]["test_cot_kv_bytes_peak"] > 0
    client = mlflow.MlflowClient(mlflow_store)
    children = _children(client, out["parent_run_id"])
    assert {r.data.tags["stage"] for r in children} == {"dare"} and len(children) == 2
    # a finished trial's run FINISHED, one ASHA stopped KILLED (however the stop reached it)
    want = {r["trial_id"]: {"done": "FINISHED", "stopped": "KILLED"}[r["status"]] for r in rows}
    assert {r.data.tags["trial_id"]: r.info.status for r in children} == want


def _tune_stops_a_training_run(tmp_path) -> None:
    """Two Tune trials, each a Ray Train run (1 worker × 0.9 CPU) reporting through
    TuneReportCallback, both stopped by Tune after their second report."""
    import time

    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def loop(config):
        for i in range(60):
            time.sleep(0.5)
            ray.train.report({"it": i})

    def trial(config):
        TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.9}),
                     run_config=ray.train.RunConfig(name=f"t{config['x']}", storage_path=str(tmp_path / "train"),
                                                    callbacks=[TuneReportCallback()])).fit()

    ray.tune.Tuner(ray.tune.with_resources(trial, {"cpu": 0.1}), param_space={"x": ray.tune.grid_search([1, 2])},
                   tune_config=ray.tune.TuneConfig(max_concurrent_trials=2),
                   run_config=ray.tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0,
                                                 stop={"training_iteration": 2})).fit()


@pytest.mark.integration
def test_a_training_run_that_tune_stops_gives_its_cpus_back(ray_session, tmp_path):
    """What ASHA does to a stage sweep's trial. Ray Train's placement-group cleaner frees a stopped
    run's workers through Ray's state API, which the dashboard serves: with the local Ray started
    without it, 1.8 of 2 CPUs stayed held and the next training run waited forever."""
    import time

    _tune_stops_a_training_run(tmp_path)
    deadline = time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    live = [pg for pg in ray_session.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not live and ray_session.available_resources().get("CPU", 0) == 2


@pytest.mark.parametrize("where, needle", [
    ("s3://bucket/sweeps", "a sweep writes its trials, Tune state and plots to a local or mounted path"),
    ("hdfs://nn/sweeps", "output_dir: 'hdfs://nn/sweeps' is not a supported location"),
])
def test_a_sweep_output_dir_on_object_storage_or_an_unknown_scheme_is_refused_naming_it(where, needle):
    cfg = load_config(SweepConfig, Path(__file__).resolve().parents[1] / "configs/sweep/presses-maze.yaml",
                      [f"output_dir={where}"])
    with pytest.raises(ConfigError, match=needle):
        job.prepare(cfg)
