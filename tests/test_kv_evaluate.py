"""`python -m jobs.evaluate` end to end on a tiny model saved to disk and a few generated maze rows,
the evaluation in a Ray task in the configured precision; bad input (use_gpu on a cluster without
GPUs too) fails before any model loads or task starts, naming the input."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict

import pytest
import torch

from jobs import evaluate as job
from mmreason.config import load_config
from mmreason.data.gridworld import GridworldConfig, plan_shards
from mmreason.data.shards import MANIFEST_NAME, write_json_atomic
from mmreason.models import build_tiny
from pipelines import gridworld
from tests.kv_helpers import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def maze_dir(tmp_path_factory):
    """Four 3×3 maze rows (two held out) through the grid-world job's own shard writer, without Ray."""
    out = tmp_path_factory.mktemp("kvdata") / "gw"
    cfg = load_config(GridworldConfig, None, [f"output_dir={out}", "examples=4", "tasks={maze: {sizes: [3]}}",
                                              "splits={train: 0.5, val: 0.0, test: 0.5}", "step_images=false"])
    specs = plan_shards(cfg)
    entries = [gridworld._render_shard(asdict(s), cfg, str(out)) for s in specs]
    write_json_atomic(out / MANIFEST_NAME, gridworld._manifest(cfg, entries, len(specs)))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny("tiny-internvl", tmp_path_factory.mktemp("kvmodel") / "m")


def args(maze_dir, model_dir, out, *extra):
    return ["configs/eval/press-maze.yaml", f"model.checkpoint={model_dir}", f"data.path={maze_dir}", "data.sizes=[3]",
            f"output_dir={out}", "generation.max_new_tokens=12", "max_examples=2", "batch_size=2", *extra]


def test_evaluate_runs_end_to_end_and_writes_csv_json_and_mlflow(maze_dir, model_dir, tmp_path, mlflow_store):
    import mlflow

    out = tmp_path / "eval"
    assert job.main(args(maze_dir, model_dir, out, "run_name=full")) == 0
    assert job.main(args(maze_dir, model_dir, out, "run_name=tova", "press=tova", "press.cache_size=20",
                         "press.min_size=1")) == 0
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["press"] for r in table] == ["none", "tova"]
    full, tova = table
    assert int(full["n"]) == 2 and float(full["kv_fraction_prefill"]) == 1.0
    assert float(tova["kv_bytes_prefill"]) < float(full["kv_bytes_prefill"])
    assert float(tova["kv_fraction_prefill"]) < 1.0
    assert json.loads(tova["press_settings"]) == {"cache_size": 20, "min_size": 1}
    for r in table:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["decode_tokens_per_s"]) > 0 and float(r["prefill_ms_per_example"]) > 0
    assert float(tova["retained_text_prefill"]) < 1.0 and float(tova["retained_vision_prefill"]) <= 1.0
    detail = json.loads((out / "tova" / "result.json").read_text())
    assert len(detail["kv_bytes_prefill_per_layer"]) == 2
    assert len((out / "tova" / "predictions.jsonl").read_text().splitlines()) == 2
    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["mmreason-eval"], filter_string="tags.stage = 'evaluate'")
    assert set(runs["tags.press"]) == {"none", "tova"}
    assert "metrics.kv_fraction_prefill" in runs and "metrics.accuracy" in runs


@pytest.mark.parametrize("extra, needle", [
    (["press=h2o"], "unknown press 'h2o'"),
    (["press=tova", "press.budget=3"], "press.budget"),
    (["press=dare", "press.rho_vis=0"], "rho_vis"),
    (["press=dare", "press.rho_text=1.5"], "rho_text"),
    (["press=kvpress:knorm", "press.compression_ratio=1.0"], "compression_ratio"),
    (["press=cosre", "press.keep_h=8"], "keep_h"),
    (["press=tova", "press.factor=abc"], "press.factor"),
    (["model.backbone=tiny-gpt"], "model.backbone"),
    (["data.path=/nonexistent/data"], "/nonexistent/data"),
])
def test_bad_input_is_named_before_any_model_loads(maze_dir, model_dir, tmp_path, capsys, monkeypatch, extra, needle):
    import mmreason.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(mmreason.models, "load_backbone", no_load)
    assert job.main(args(maze_dir, model_dir, tmp_path / "eval", *extra)) == 2
    assert needle in capsys.readouterr().err


def test_a_checkpoint_of_another_family_is_named(maze_dir, model_dir, tmp_path, capsys):
    assert job.main(args(maze_dir, model_dir, tmp_path / "eval", "model.backbone=tiny-anole")) == 2
    assert "tiny-anole" in capsys.readouterr().err


def test_the_evaluation_runs_in_a_ray_task_in_the_configured_precision(maze_dir, model_dir, tmp_path, monkeypatch,
                                                                      mlflow_store):
    """The job's driver only checks, writes and logs: `measure_press` runs in the Ray task (a patch
    of it here cannot fire), which loads the model in `precision` — bf16 halves every KV byte."""
    def not_here(*a, **k):
        raise AssertionError("the evaluation ran in the job's driver")

    monkeypatch.setattr(job, "measure_press", not_here)
    out = tmp_path / "eval"
    for precision in ("fp32", "bf16"):
        assert job.main(args(maze_dir, model_dir, out, f"run_name={precision}", f"precision={precision}")) == 0
    fp32, bf16 = (json.loads((out / p / "result.json").read_text()) for p in ("fp32", "bf16"))
    assert (fp32["device"], fp32["dtype"]) == ("cpu", "torch.float32")
    assert (bf16["device"], bf16["dtype"]) == ("cpu", "torch.bfloat16") and bf16["config"]["precision"] == "bf16"
    assert bf16["row"]["n"] == fp32["row"]["n"] == 2
    assert bf16["row"]["kv_bytes_full_prefill"] == fp32["row"]["kv_bytes_full_prefill"] / 2
    with open(out / "results.csv") as fh:
        assert [r["run_name"] for r in csv.DictReader(fh)] == ["fp32", "bf16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: use_gpu is not refused here")
def test_use_gpu_on_a_cluster_without_gpus_is_refused_before_the_task_starts(maze_dir, model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    import ray
    import ray.data

    # Ray Data declares remote functions of its own as it loads (the job's console switches its
    # progress bars off): load it first, so only a task the evaluation starts trips the check
    ray.data.DataContext.get_current()

    def no_task(*a, **k):
        raise AssertionError("an evaluation task was started")

    monkeypatch.setattr(ray, "remote", no_task)
    assert job.main(args(maze_dir, model_dir, tmp_path / "eval", "use_gpu=true")) == 2
    err = capsys.readouterr().err
    assert "use_gpu" in err and "0 GPU" in err
    # no result: the run directory holds only the job's log (the error line names it)
    assert [p.relative_to(tmp_path / "eval").parts[0] for p in (tmp_path / "eval").iterdir()] == ["logs"]
    assert not list((tmp_path / "eval").glob("*.csv"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_the_gpu_in_bf16(maze_dir, model_dir, tmp_path, mlflow_store):
    out = tmp_path / "eval"
    assert job.main(args(maze_dir, model_dir, out, "run_name=gpu", "use_gpu=true", "precision=bf16", "press=tova",
                         "press.cache_size=20", "press.min_size=1")) == 0
    detail = json.loads((out / "gpu" / "result.json").read_text())
    assert detail["device"].startswith("cuda") and detail["dtype"] == "torch.bfloat16"
    assert detail["row"]["n"] == 2 and detail["row"]["kv_fraction_prefill"] < 1.0
