"""The quickstart's whole flow at toy size — data → cot → coconut → dare → each press → a sweep →
Pareto front — on the real Ray, Ray Train + DeepSpeed, Ray Tune and MLflow; the MLflow store is
read back with MlflowClient (the run tree, metrics and artifacts), not the logs."""

from __future__ import annotations

import pytest

from jobs import quickstart
from mmreason.config import ConfigError, load_config

TOY = [
    "data.tasks={maze: {sizes: [3], examples: 60}, frozenlake: {sizes: [3], examples: 10}, "
    "minibehavior: {sizes: [8], examples: 10}}",
    *(f"{stage}.{key}" for stage in ("cot", "coconut", "dare")
      for key in ("optim.batch_size=4", "optim.epochs=1", "eval.max_examples=4", "eval.epoch_examples=0")),
    "coconut.coconut.epochs_per_stage=1", "dare.dare.fit_rows=4",
    "evaluate.max_examples=4", "evaluate.batch_size=4", "evaluate.generation.max_new_tokens=48",
    "presses={none: {}, tova: {factor: 0.5, min_size: 4}, dare: {}, cosre: {block: 4, keep_h: 2, keep_w: 2}, "
    "'kvpress:snapkv': {compression_ratio: 0.5, window_size: 4}}",
    "sweep.presses={tova: {factor: {grid: [0.5, 0.75]}, min_size: 4}}",
    "sweep.evaluate_overrides=[max_examples=4, batch_size=4, generation.max_new_tokens=48]",
]


def toy(tmp_path, *extra: str) -> quickstart.QuickstartConfig:
    return load_config(quickstart.QuickstartConfig, None, [f"root={tmp_path / 'qs'}", *TOY, *extra])


@pytest.mark.integration
def test_quickstart_full_flow_leaves_one_pipeline_run_with_stages_presses_and_sweep_trials(
        tmp_path, mlflow_store, ray_session):
    import mlflow

    out = quickstart.run(toy(tmp_path))

    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("mmreason-pipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["mlflow.runName"] for r in parents] == ["quickstart"]
    parent = parents[0]
    assert parent.info.run_id == out["parent_run_id"] and parent.info.status == "FINISHED"

    def children(run_id: str) -> dict[str, mlflow.entities.Run]:
        return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id}

    top = children(parent.info.run_id)
    evals = {f"quickstart-eval-{n}" for n in ("none", "tova", "dare", "cosre", "kvpress-snapkv")}
    assert set(top) == {"quickstart-cot", "quickstart-coconut", "quickstart-dare", "quickstart-sweep"} | evals
    assert all(r.info.status == "FINISHED" for r in top.values())
    for name in ("quickstart-cot", "quickstart-coconut", "quickstart-dare"):
        metrics = top[name].data.metrics
        assert {"loss", "cot_accuracy", "cot_tokens_per_answer"} <= set(metrics), name
        assert top[name].data.tags["stage"] == name.split("-")[1]
    assert "coconut_accuracy" in top["quickstart-coconut"].data.metrics
    # the dare stage's own evaluation prunes the cache with its router; its press evaluation too
    assert top["quickstart-dare"].data.metrics["cot_kv_fraction_prefill"] < 1.0
    kv = {name: top[name].data.metrics for name in evals}
    assert kv["quickstart-eval-none"]["kv_fraction_peak"] == pytest.approx(1.0)
    for name in evals - {"quickstart-eval-none"}:
        assert kv[name]["kv_bytes_peak"] < kv["quickstart-eval-none"]["kv_bytes_peak"], name
        assert 0.0 <= kv[name]["accuracy"] <= 1.0
    assert top["quickstart-eval-dare"].data.params["press.router_path"].endswith("quickstart-dare/export/dare_router.pt")

    sweep = top["quickstart-sweep"]
    on_val = {n: r for n, r in children(sweep.info.run_id).items() if r.data.params["data.evaluate_on"] == "val_split"}
    trials = {n: r for n, r in on_val.items() if r.data.tags["trial_id"]}
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials.values())
    assert all("accuracy" in r.data.metrics and "kv_bytes_peak" in r.data.metrics for r in trials.values())
    assert set(on_val) - set(trials) == {"quickstart-sweep-uncompressed"}  # the plot's reference point
    front = [row for i, row in enumerate(out["sweep"]["rows"]) if i in out["sweep"]["front"]]
    assert front and all(0 <= row["test_accuracy"] <= 1 for row in front)  # selected on val, reported on test
    artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id, "pareto")}
    assert {"pareto/pareto.png", "pareto/pareto.html", "pareto/pareto.csv", "pareto/trials.csv"} <= artifacts
    assert sweep.data.metrics["trials_done"] == 2 and sweep.data.metrics["pareto_size"] >= 1
    # nothing outside the tree: every run of the experiment descends from the one pipeline run
    for run in runs:
        while "mlflow.parentRunId" in run.data.tags:
            run = by_id[run.data.tags["mlflow.parentRunId"]]
        assert run.info.run_id == parent.info.run_id
    assert (tmp_path / "qs" / "eval" / "results.csv").is_file()


@pytest.mark.parametrize("extra, needle", [
    (["steps=[coconut]"], "keep 'cot'"),
    (["steps=[cot, distill]"], "unknown step(s) 'distill'"),
    (["steps=[cot, presses]"], "presses.dare evaluates the router the dare step trains"),
    (["presses={tova: {budget: 3}}"], "presses.tova: press.budget: unknown setting"),
    (["presses={h2o: {}}"], "presses.h2o: press: unknown press 'h2o'"),
    (["sweep.presses={cosre: {block: 2, keep_h: {grid: [4]}}}"], "keep_h must be in [1, block=2], got 4"),
])
def test_bad_quickstart_input_fails_before_any_work(tmp_path, monkeypatch, mlflow_store, extra, needle):
    import pipelines

    def no_work(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(pipelines.gridworld, "run", no_work)
    with pytest.raises(ConfigError) as err:
        quickstart.run(toy(tmp_path, *extra))
    assert needle in str(err.value)
    assert not (tmp_path / "qs").exists()
