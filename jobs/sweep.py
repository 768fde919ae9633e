"""Sweep KV-compression settings (or a training stage's settings) with Ray Tune; print and log the
Pareto front.

    python -m jobs.sweep CONFIG.yaml [key=value ...] [--check]
    mmreason sweep configs/sweep/presses-maze.yaml                       # grid over several presses
    mmreason sweep configs/sweep/cosre-optuna-maze.yaml search.num_samples=40
    mmreason sweep configs/sweep/stage-asha-maze.yaml                    # a stage sweep, ASHA

Press trials run `jobs.evaluate`'s code (`run_press_eval`, in the trial's own process, which holds
`cpus_per_trial` CPUs and, with `use_gpu`, `gpus_per_trial` GPUs; the model in `precision`) on the
configured checkpoint under the trial's press setting; stage trials run `jobs.train`'s `run_stage`
and report every epoch to Tune (so ASHA can stop them), then optionally evaluate their export under
a press. Each trial is an MLflow child run of the sweep's run (`<experiment>-sweep`); at the end the
Pareto front over the objectives is printed and written — `pareto.csv`, `pareto.txt`, `pareto.png`,
`pareto.html`, `trials.csv` — to `output_dir/<name>-<time>/` and logged to the sweep's run under
`pareto/`.

Select on validation, report on test: trials are evaluated on the validation rows (`data.val_split`,
carved out of train where a dataset has none — and then never trained on), so the front is chosen
on them; each trial on the front is then evaluated on `data.eval_split` and its numbers join its row
as `test_<metric>`. A press sweep also evaluates the checkpoint with no press (`uncompressed: true`):
a reference row, and a black star in the plots.

Everything a user can get wrong — an unknown press or setting, an empty search space, a bad value,
a continuous range under grid search, an objective no trial reports, a tracking URI that cannot be
reached, a checkpoint or dataset that is not there, trials larger than the cluster, `use_gpu` where
the cluster has no GPU — fails before
any trial starts. Concurrency: as many trials as the free Ray resources hold (`search.max_concurrent`
caps it). `--check` runs every check, prints the resolved config, the trials, the resources per
trial and in total, and starts no trial, MLflow run or output folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from mmreason import console
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import ConfigError, from_dict, load_config, to_dict
from mmreason.hardware import require_gpus
from mmreason.sweep import LATENCY, SearchSpace, SweepConfig, build_space, check_points

TUNE_BOOKKEEPING = {"done", "date", "pid", "hostname", "node_ip", "timestamp", "iterations_since_restore",
                    "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "time_this_iter_s", "time_total_s",
                    "time_since_restore", "checkpoint_path"}
PER_EPOCH_METRICS = ("epoch", "stage", "loss", "lr", "samples_per_s", "data_wait_s", "eval_accuracy",
                     "eval_tokens_per_answer")


def load(config: str | None, overrides: Sequence[str]) -> SweepConfig:
    if config is None:
        raise ConfigError("give a sweep config, e.g. configs/sweep/presses-maze.yaml")
    return load_config(SweepConfig, config, overrides)


def _eval_metrics() -> set[str]:
    from mmreason.eval.press_eval import CSV_COLUMNS

    text = {"run_name", "backbone", "checkpoint", "split", "mode", "press", "press_settings"}
    return {c for c in CSV_COLUMNS if c not in text} | {LATENCY}


def _stage_point(plan: dict[str, Any], values: dict[str, Any], run_name: str) -> Any:
    from mmreason.train.config import TrainConfig

    overrides = list(plan["stage_overrides"]) + [f"{k}={json.dumps(v)}" for k, v in values.items()]
    overrides += [f"run_name={run_name}", f"storage={plan['stage_storage']}"]
    return load_config(TrainConfig, plan["stage"], overrides)


def prepare(cfg: SweepConfig) -> tuple[SearchSpace, dict[str, Any]]:
    """Check everything and return the search space and the plan every trial gets (plain data)."""
    from jobs import evaluate as eval_job
    from mmreason.kv import make_press
    from mmreason.data.selection import held_out_rows
    from mmreason.eval.press_eval import check_inputs, held_out
    from mmreason.models import CheckpointError, check_checkpoint
    from mmreason.tracking import check_tracking_uri, git_state

    from mmreason import storage

    if storage.is_remote(storage.check_location(cfg.output_dir, "output_dir")):
        raise ConfigError(f"output_dir: {cfg.output_dir} — a sweep writes its trials, Tune state and plots to a "
                          f"local or mounted path (e.g. /mnt/shared on the cluster), not to object storage yet")
    space = build_space(cfg)
    uri = check_tracking_uri()
    run_dir = Path(cfg.output_dir).resolve() / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    plan: dict[str, Any] = {
        "name": cfg.name, "run_dir": str(run_dir), "trials_dir": str(run_dir / "trials"),
        "objectives": cfg.objective_pairs, "threads": max(1, int(cfg.cpus_per_trial)),
        "tags": git_state(), "evaluate": None, "press": None, "stage": None,
    }
    known: set[str] = set()
    if cfg.evaluate is None and cfg.presses:
        raise ConfigError("evaluate: presses are evaluated through an evaluation config (configs/eval/*.yaml)")
    if cfg.evaluate is not None and (not cfg.is_stage_sweep or cfg.presses):
        eval_cfg = eval_job.load(cfg.evaluate, cfg.evaluate_overrides)
        data = eval_cfg.data  # trials run in their own folders: absolute paths
        data.path = str(Path(data.path).resolve())
        data.eval_path = str(Path(data.eval_path).resolve()) if data.eval_path else None
        eval_cfg.data.evaluate_on = "eval_split"
        held_out(eval_cfg)  # the data: there, with the rows the front is reported on
        eval_cfg.data.evaluate_on = "val_split"  # trials are evaluated, hence selected, on validation rows
        held_out(eval_cfg)
        if not cfg.is_stage_sweep:
            eval_cfg.model.checkpoint = check_inputs(eval_cfg)
        eval_cfg.use_gpu, eval_cfg.precision = _trial_hardware(cfg, eval_cfg)
        plan["evaluate"] = to_dict(eval_cfg)
        known |= _eval_metrics()

    if cfg.is_stage_sweep:
        from jobs import train

        stage_path = str(Path(cfg.stage).resolve())
        # each trial's export is evaluated (and selected) on validation rows; the front's on eval_split
        plan.update(stage=stage_path, stage_overrides=[*cfg.stage_overrides, "data.evaluate_on=val_split"],
                    stage_storage=str(run_dir / "train"), asha=asdict(cfg.asha) if cfg.asha.enabled else None)
        base = _stage_point(plan, {}, "check")
        check_points(space, lambda _group, values: _stage_point(plan, values, "check"))
        # the data and starting checkpoint, as jobs.train checks them (no worker starts)
        base.data.path = str(Path(base.data.path).resolve())
        plan["stage_overrides"].append(f"data.path={base.data.path}")
        if base.init_from:
            try:
                check_checkpoint(base.model.backbone, base.init_from)
            except CheckpointError as exc:
                raise ConfigError(f"init_from: {exc}") from None
            plan["stage_overrides"].append(f"init_from={Path(base.init_from).resolve()}")
        train.train_shards(base)
        for data in (replace(base.data, evaluate_on=e) for e in ("val_split", "eval_split")):  # selected, reported on
            if not held_out_rows(data, 1, base.video.num_frames):
                raise ConfigError(f"data: no {data.evaluated_split} rows for tasks {data.tasks} and sizes "
                                  f"{data.sizes} in {data.path}")
        known |= set(PER_EPOCH_METRICS) | {"best_eval_accuracy", "train_rows", "steps_per_epoch"}
        per_mode = {"accuracy", "tokens_per_answer", "latents_per_answer", "n", "seconds", LATENCY}
        per_mode |= {m for m in _eval_metrics() if m.startswith(("kv_fraction", "retained_", "kv_bytes_p"))}
        known |= {f"{mode}_{m}" for mode in base.eval.modes for m in per_mode}
        if cfg.asha.enabled and cfg.asha.metric not in PER_EPOCH_METRICS:
            raise ConfigError(f"asha.metric: {cfg.asha.metric!r} is not reported every epoch "
                              f"(known: {', '.join(PER_EPOCH_METRICS)})")
        if cfg.presses:
            (name, settings), = cfg.presses.items()
            if any(isinstance(v, dict) for v in settings.values()):
                raise ConfigError(f"presses.{name}: a stage sweep evaluates exports under constant press settings")
            plan["press"] = {"name": name, **settings}
            later = {k for k, v in settings.items() if isinstance(v, str) and "{export}" in v}  # each trial's export
            make_press(name, {k: v for k, v in settings.items() if k not in later}, pending=later)
        need_cpu = cfg.cpus_per_trial + base.workers * base.cpus_per_worker
        plan["trial_cpus"] = need_cpu
        plan["trial_gpus"] = cfg.trial_gpus + (base.workers * base.gpus_per_worker if base.use_gpu else 0.0)
    else:
        check_points(space, lambda group, values: make_press(group, values))
        plan["trial_cpus"] = cfg.cpus_per_trial
        plan["trial_gpus"] = cfg.trial_gpus
    for metric, _ in cfg.objective_pairs:
        if metric not in known:
            raise ConfigError(f"objectives: no trial reports {metric!r} (known: {', '.join(sorted(known))})")
    plan["tracking_uri"] = uri
    return space, plan


def _trial_hardware(cfg: SweepConfig, eval_cfg: Any) -> tuple[bool, str]:
    """The device and precision of every trial's evaluation: the sweep's (it sizes the trials). An
    evaluation config that asks for others is refused rather than silently overridden."""
    from mmreason.eval.press_eval import PressEvalConfig

    default = PressEvalConfig()
    for key in ("use_gpu", "precision"):
        asked = getattr(eval_cfg, key)
        if asked != getattr(default, key) and asked != getattr(cfg, key):
            raise ConfigError(f"{key}: the evaluation config ({cfg.evaluate} with evaluate_overrides) asks for "
                              f"{key}={asked}, the sweep for {key}={getattr(cfg, key)}; set it on the sweep (it sizes "
                              f"the trials)")
    return cfg.use_gpu, cfg.precision


def check_trial_gpus(plan: dict[str, Any]) -> float:
    """`use_gpu` (the sweep's, or a stage trial's training) on a cluster with fewer GPUs than one
    trial needs — now and on any node its autoscaler can add — fails here, naming use_gpu, before
    any trial starts. Returns the GPUs of the largest node the autoscaler can add."""
    from pipelines import cluster_gpus

    now, scalable = cluster_gpus()
    require_gpus(plan["trial_gpus"] > 0, plan["trial_gpus"], now, scalable=scalable)
    return scalable


def concurrency(cfg: SweepConfig, plan: dict[str, Any], scalable_gpus: float = 0.0) -> int:
    """Trials at once: what the free Ray resources hold, capped by search.max_concurrent (at least
    one: GPUs an autoscaler adds once a trial asks for them count as there)."""
    import ray

    free = ray.available_resources()
    need = {"CPU": plan["trial_cpus"], "GPU": plan["trial_gpus"]}
    fits = [math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    total = ray.cluster_resources()
    if any(total.get(k, 0.0) < v and not (k == "GPU" and scalable_gpus >= v) for k, v in need.items() if v > 0):
        what = ", ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
        have = ", ".join(f"{total.get(k, 0.0):g} {k}" for k, v in need.items() if v > 0)
        raise ConfigError(f"a trial needs {what} (trial + its Ray Train workers) but the cluster has {have}; "
                          f"lower cpus_per_trial, workers or cpus_per_worker")
    n = max(1, min(fits))
    return min(n, cfg.search.max_concurrent) if cfg.search.max_concurrent else n


def prepare_on_cluster(cfg: SweepConfig) -> tuple[SearchSpace, dict[str, Any], int]:
    """`prepare`, then the cluster (starts or joins Ray): `use_gpu` against its GPUs, and how many
    trials fit at once. Returns the search space, the plan and the trials at once."""
    from pipelines import init_ray

    space, plan = prepare(cfg)
    init_ray()
    return space, plan, concurrency(cfg, plan, check_trial_gpus(plan))


def n_trials(cfg: SweepConfig, space: SearchSpace) -> int:
    """Trials the sweep runs: the grid `search.num_samples` times over, or `num_samples` Optuna draws."""
    if cfg.search.algorithm == "grid":
        return int(space.size()) * cfg.search.num_samples
    return cfg.search.num_samples


def check(cfg: SweepConfig) -> dict[str, Any]:
    """`--check`: `prepare_on_cluster`, and the trials and what they ask Ray for."""
    import ray

    from mmreason.tracking import family_experiment

    space, plan, n_parallel = prepare_on_cluster(cfg)
    per_trial = {"CPU": plan["trial_cpus"], "GPU": plan["trial_gpus"]}
    report = {"config": to_dict(cfg), "trials": n_trials(cfg, space), "search": cfg.search.algorithm,
              # a stage trial's CPUs and GPUs include its Ray Train workers'; total: what the sweep holds at once
              "resources": {"per_trial": per_trial, "concurrent_trials": n_parallel,
                            "total": {k: v * n_parallel for k, v in per_trial.items()},
                            "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}}
    if plan["stage"]:
        report["stage"] = {"config": plan["stage"], "overrides": plan["stage_overrides"]}
    if plan["evaluate"]:  # what each trial evaluates (a stage trial: its own export)
        evaluated = plan["evaluate"]
        report["evaluate"] = {"checkpoint": None if cfg.is_stage_sweep else evaluated["model"]["checkpoint"],
                              "data": evaluated["data"]["path"], "max_examples": evaluated["max_examples"],
                              "mode": evaluated["mode"], "precision": evaluated["precision"]}
    split = report_splits(cfg, plan)
    report["splits"] = {"trials_selected_on": split["val"], "front_reported_on": split["test"]}
    report["run_dir"] = plan["run_dir"]
    report["mlflow"] = {"tracking_uri": plan["tracking_uri"], "experiment": family_experiment(cfg.experiment, "sweep")}
    return report


# ---------------------------------------------------------------- inside a trial (a Ray Tune actor)

def _enter_trial(plan: dict[str, Any]) -> str:
    """Point this process at the sweep's MLflow store and run; returns the trial id."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    _mlflow_env(plan, trial_id)
    return trial_id


def _mlflow_env(plan: dict[str, Any], trial_id: str) -> None:
    """MLflow runs this process starts become children of the sweep's run, tagged with the trial."""
    from mmreason.tracking import COMMIT_ENV, PARENT_ENV, TAGS_ENV

    os.environ["MLFLOW_TRACKING_URI"] = plan["tracking_uri"]
    os.environ[PARENT_ENV] = plan["parent_run_id"]
    os.environ[COMMIT_ENV] = plan["tags"]["git_commit"]
    os.environ[TAGS_ENV] = json.dumps({**plan["tags"], "sweep": plan["name"], "trial_id": trial_id})


def _label(point: dict[str, Any]) -> str:
    settings = ",".join(f"{k}={v}" for k, v in point["values"].items())
    return f"{point['group']}({settings})" if settings else point["group"]


def _numeric(data: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _press_eval(plan: dict[str, Any], press: dict[str, Any], run_name: str, **model: Any) -> dict[str, float]:
    from mmreason.eval.press_eval import PressEvalConfig, run_press_eval

    cfg = from_dict(PressEvalConfig, plan["evaluate"])
    cfg.press, cfg.run_name, cfg.output_dir, cfg.threads = press, run_name, plan["trials_dir"], plan["threads"]
    for key, value in model.items():
        setattr(cfg.model, key, value)
    row = run_press_eval(cfg, log=lambda *a, **k: None)
    out = _numeric(row)
    out[LATENCY] = 1000.0 * row["seconds"] / max(1, row["n"])
    _log_to_trial_run(run_name, {LATENCY: out[LATENCY]})
    return out


def _log_to_trial_run(run_name: str, metrics: dict[str, float], parent: str | None = None) -> None:
    """Metrics the sweep derives, added to the child run `run_name` of the sweep's run (`parent`,
    else this trial's)."""
    import mlflow

    from mmreason.tracking import PARENT_ENV

    client = mlflow.MlflowClient()
    parent = parent or os.environ[PARENT_ENV]
    experiment = client.get_run(parent).info.experiment_id
    run, = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' and "
                                            f"attributes.run_name = '{run_name}'")
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)


def press_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    import ray.tune

    trial_id = _enter_trial(plan)
    point = config["point"]
    run_name = f"{plan['name']}-{trial_id}"
    metrics = _press_eval(plan, {"name": point["group"], **point["values"]}, run_name)
    ray.tune.report({**metrics, "label": _label(point), "run_name": run_name})


def stage_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    import ray.tune

    from jobs import train

    trial_id = _enter_trial(plan)
    point = config["point"]
    run_name = f"{plan['name']}-{trial_id}"
    cfg = _stage_point(plan, point["values"], run_name)
    callbacks = []
    if plan.get("asha"):  # every epoch's report reaches Tune, so ASHA can stop the trial
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    out = train.run_stage(cfg, callbacks)
    metrics = _numeric(out["train"])
    for mode, res in out["eval"].items():  # accuracy, tokens, seconds and (measured) KV bytes per eval mode
        metrics.update({f"{mode}_{k}": v for k, v in _numeric(res).items()})
        metrics[f"{mode}_{LATENCY}"] = 1000.0 * res["seconds"] / max(1, res["n"])
    if plan.get("press"):
        metrics.update(_press_eval(plan, _export_press(plan, out["export"]), f"{run_name}-eval", checkpoint=out["export"],
                                   backbone=cfg.model.backbone))
    ray.tune.report({**metrics, "label": _label(point), "run_name": run_name, "export": out["export"]})


# ---------------------------------------------------------------- after the trials: the report split

def _press_on(plan: dict[str, Any], evaluate_on: str) -> dict[str, Any]:
    """The plan with its press evaluations reading `evaluate_on`'s rows."""
    evaluate = dict(plan["evaluate"], data=dict(plan["evaluate"]["data"], evaluate_on=evaluate_on))
    return dict(plan, evaluate=evaluate)


def _press_task(plan: dict[str, Any], press: dict[str, Any], run_name: str, trial_id: str,
                model: dict[str, Any]) -> dict[str, float]:
    """A press evaluation in a Ray task of the driver's (plan's rows), logged as a child of the sweep's run."""
    _mlflow_env(plan, trial_id)
    return _press_eval(plan, press, run_name, **model)


def _stage_test_task(plan: dict[str, Any], cfg_dict: dict[str, Any], export: str, run_name: str,
                     trial_id: str) -> dict[str, float]:
    """A stage trial's export evaluated on the report split: its eval modes (`test_<mode>_<metric>`)
    and, when the sweep has one, the press (`test_<metric>`)."""
    from jobs import train

    results, _ = train._evaluate_task(cfg_dict, export)  # what a stage's own evaluation task runs
    out = {f"{mode}_{k}": v for mode, res in results.items() for k, v in _numeric(res).items()}
    if plan.get("press"):
        _mlflow_env(plan, trial_id)
        out.update(_press_eval(_press_on(plan, "eval_split"), _export_press(plan, export), f"{run_name}-test",
                               checkpoint=export, backbone=cfg_dict["model"]["backbone"]))
    return out


def _export_press(plan: dict[str, Any], export: str) -> dict[str, Any]:
    """A stage sweep's press settings for one trial's export (`{export}` filled in)."""
    return {k: v.replace("{export}", export) if isinstance(v, str) else v for k, v in plan["press"].items()}


def _driver_task(fn: Any, cpus: float, gpus: float) -> Any:
    """`fn` as a Ray task the sweep's driver starts after the trials, outside any trial's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus,
                                  scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


def report_front(cfg: SweepConfig, plan: dict[str, Any], rows: list[dict[str, Any]], front: list[int]) -> None:
    """Select on validation rows, report on the test split: every trial on the front (selected on
    `data.val_split`) is evaluated again on `data.eval_split`, in Ray tasks with a trial's
    resources, all at once; the numbers join its row as `test_<metric>` (and its MLflow run). A
    failed evaluation leaves `test_error` in the row."""
    import ray

    from jobs.train import stage_resources

    refs = {}
    for i in front:
        row = rows[i]
        if cfg.is_stage_sweep:
            stage = _stage_point(plan, json.loads(row["settings"]), row["run_name"])
            stage.data.evaluate_on = "eval_split"
            res = stage_resources(stage)  # one training worker's, as the stage's own evaluation asks
            task = _driver_task(_stage_test_task, res["CPU"], res.get("GPU", 0))
            refs[i] = task.remote(plan, asdict(stage), row["export"], row["run_name"], row["trial_id"])
        else:
            task = _driver_task(_press_task, cfg.cpus_per_trial, cfg.trial_gpus)
            press = {"name": row["group"], **json.loads(row["settings"])}
            refs[i] = task.remote(_press_on(plan, "eval_split"), press, f"{row['run_name']}-test", row["trial_id"], {})
    for i, ref in refs.items():
        try:
            test = {f"test_{k}": v for k, v in ray.get(ref).items()}
        except Exception as exc:  # the trial's own numbers stand; the row says why its test ones are missing
            rows[i]["test_error"] = str(exc).strip().splitlines()[-1][:300]
            continue
        rows[i].update(test)
        if rows[i]["trial_id"]:
            _log_to_trial_run(rows[i]["run_name"], test, plan["parent_run_id"])


def uncompressed_row(cfg: SweepConfig, plan: dict[str, Any]) -> dict[str, Any]:
    """Press sweeps: the checkpoint with no press on the trials' rows, as a row of the table."""
    import ray

    run_name = f"{plan['name']}-uncompressed"
    task = _driver_task(_press_task, cfg.cpus_per_trial, cfg.trial_gpus)
    metrics = ray.get(task.remote(plan, {"name": "none"}, run_name, "", {}))
    return {**metrics, "label": UNCOMPRESSED, "run_name": run_name, "trial_id": "", "group": "none",
            "settings": "{}", "status": "done"}


UNCOMPRESSED = "uncompressed"
"""The label of a press sweep's reference row (no press)."""


# ---------------------------------------------------------------- the driver

def run_sweep(cfg: SweepConfig, log=console.echo) -> dict[str, Any]:
    """Check, run the trials on Ray Tune, compute and log the Pareto front; returns a summary."""
    import mlflow
    import ray.tune
    from ray.tune.search import ConcurrencyLimiter

    from mmreason.eval.pareto import pareto_front
    from mmreason.tracking import pipeline_run

    space, plan, n_parallel = prepare_on_cluster(cfg)
    objectives = cfg.objective_pairs
    split = report_splits(cfg, plan)
    run_dir = Path(plan["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    _csv_header(Path(plan["trials_dir"]))
    log(f"sweep {cfg.name}: {space.size():g} grid points" if cfg.search.algorithm == "grid"
        else f"sweep {cfg.name}: optuna, {cfg.search.num_samples} trials")
    log(f"  {n_parallel} trial(s) at once; output {run_dir}")

    with pipeline_run(cfg.experiment, cfg.name, family="sweep", params=to_dict(cfg)) as parent_id:
        plan["parent_run_id"] = parent_id
        trainable = stage_trial if cfg.is_stage_sweep else press_trial
        # the trial's own share; a stage trial's Ray Train workers ask for theirs when they start
        resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.trial_gpus}
        tune_config: dict[str, Any] = {"max_concurrent_trials": n_parallel, "reuse_actors": not cfg.is_stage_sweep}
        if cfg.search.algorithm == "grid":
            param_space = {"point": ray.tune.grid_search(space.grid_points())}
            tune_config["num_samples"] = cfg.search.num_samples
        else:
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(space=space.suggest, metric=[m for m, _ in objectives],
                                    mode=[m for _, m in objectives], seed=cfg.search.seed)
            param_space = {}
            tune_config.update(search_alg=ConcurrencyLimiter(searcher, max_concurrent=n_parallel),
                               num_samples=cfg.search.num_samples)
        if cfg.asha.enabled:
            from ray.tune.schedulers import ASHAScheduler

            epochs = _stage_point(plan, {}, "check").optim.epochs
            # max_t past the last epoch: the trial's final report (after export and evaluation) must
            # not be the one ASHA stops at
            tune_config["scheduler"] = ASHAScheduler(time_attr="training_iteration", metric=cfg.asha.metric,
                                                     mode=cfg.asha.mode, max_t=epochs + 1,
                                                     grace_period=cfg.asha.grace_period,
                                                     reduction_factor=cfg.asha.reduction_factor)
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(ray.tune.with_parameters(trainable, plan=plan), resources),
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(**tune_config),
            run_config=ray.tune.RunConfig(name=run_dir.name, storage_path=str(run_dir / "tune"), verbose=1,
                                          failure_config=ray.tune.FailureConfig(max_failures=0),
                                          callbacks=[trial_progress(n_trials(cfg, space))]),
        )
        grid = tuner.fit()
        rows = _rows(grid)
        _close_trial_runs(parent_id, rows)
        for row in rows:  # Tune only names an error file; its last line belongs in the sweep's output
            if row["status"] == "error":
                log(f"  trial {row['trial_id'] or row['label']} failed: {row['error']}")
        done = [r for r in rows if r["status"] == "done"]
        if not done:
            errors = [r.get("error", "") for r in rows]
            raise RuntimeError(f"sweep {cfg.name}: every trial failed; first error:\n{errors[0] if errors else '?'}")
        if cfg.uncompressed and not cfg.is_stage_sweep and not any(r["group"] == "none" for r in rows):
            rows.append(uncompressed_row(cfg, plan))
            log(f"  uncompressed: accuracy {rows[-1].get('accuracy', float('nan')):.3f} on {split['val']}")
        front = pareto_front([r if r["status"] == "done" else {} for r in rows], objectives)  # on val
        log(f"  the Pareto front's {len(front)} trial(s), selected on {split['val']}: evaluated on {split['test']}")
        report_front(cfg, plan, rows, front)
        _write_front(rows, front, objectives, run_dir, cfg.name, split)
        mlflow.log_metrics({"trials": len(rows), "trials_done": len(done), "pareto_size": len(front)})
        mlflow.log_artifacts(str(run_dir / "pareto"), artifact_path="pareto")
    table = (run_dir / "pareto" / "pareto.txt").read_text()
    log(f"\nPareto front ({len(front)} of {len(done)} finished trials; "
        + ", ".join(f"{m} {'↑' if d == 'max' else '↓'}" for m, d in objectives)
        + f"; selected on {split['val']}, test_* columns on {split['test']})")
    log(table)
    log(f"\nplots: {run_dir / 'pareto' / 'pareto.png'}  {run_dir / 'pareto' / 'pareto.html'}")
    log(f"MLflow: sweep run {parent_id} ({plan['tracking_uri']}); browse with `mmreason mlflow`")
    return {"parent_run_id": parent_id, "rows": rows, "front": front, "run_dir": str(run_dir)}


def trial_progress(total: int) -> Any:
    """A Tune callback (Tune runs them in this process) that advances the console's trials bar as
    each trial finishes, errs, or is stopped."""
    import ray.tune

    class TrialProgress(ray.tune.Callback):
        def setup(self, **info: Any) -> None:
            self.bar, self.failed = console.progress(total, "trials"), 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.bar.update(1, failed=self.failed or None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.failed += 1
            self.bar.update(1, failed=self.failed)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.close()

    return TrialProgress()


def _csv_header(trials_dir: Path) -> None:
    """Concurrent trials append to one results.csv: write its header once, first."""
    from mmreason.eval.press_eval import CSV_COLUMNS

    trials_dir.mkdir(parents=True, exist_ok=True)
    with open(trials_dir / "results.csv", "w", newline="") as fh:
        csv.writer(fh).writerow(CSV_COLUMNS)


def _rows(grid: Any) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        point = (result.config or {}).get("point", {})
        row = {k: v for k, v in metrics.items() if k not in TUNE_BOOKKEEPING and not k.startswith("config")}
        row.update(trial_id=metrics.get("trial_id", ""), label=metrics.get("label") or (_label(point) if point else ""),
                   group=point.get("group", ""), settings=json.dumps(point.get("values", {}), sort_keys=True))
        finished = result.error is None and "run_name" in metrics
        row["status"] = "done" if finished else "error" if result.error else "stopped"
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        rows.append(row)
    return rows


def _close_trial_runs(parent_id: str, rows: list[dict[str, Any]]) -> None:
    """End the MLflow runs of trials that did not finish. A trial ASHA stops ends KILLED: stopped
    between reports it closed its run itself (KILLED, or FAILED where the stop surfaced as an
    error), killed mid-stage it left the run RUNNING. A trial that errored ends FAILED."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_id).info.experiment_id
    status = {r["trial_id"]: r["status"] for r in rows if r["trial_id"]}
    for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'"):
        trial = status.get(run.data.tags.get("trial_id", ""))
        if trial == "stopped" and run.info.status in ("RUNNING", "FAILED"):
            client.set_terminated(run.info.run_id, "KILLED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED" if trial == "error" else "KILLED")


def report_splits(cfg: SweepConfig, plan: dict[str, Any]) -> dict[str, str]:
    """The splits the sweep selects on (`val`) and reports the front on (`test`), as its tables name them."""
    from mmreason.data.selection import DataConfig

    data = _stage_point(plan, {}, "check").data if cfg.is_stage_sweep else from_dict(DataConfig, plan["evaluate"]["data"])
    return {"val": data.val_split, "test": data.eval_split}


def _write_front(rows: list[dict[str, Any]], front: list[int], objectives: list[tuple[str, str]], run_dir: Path,
                 name: str, split: dict[str, str]) -> None:
    """trials.csv, pareto.csv, pareto.txt (the front, selected on `split['val']`, with its test_*
    columns) and the plots, marking the uncompressed reference."""
    from mmreason.eval.pareto import front_table, plot_front

    out = run_dir / "pareto"
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m, _ in objectives]
    columns = ["label", *metrics, *[f"test_{m}" for m in metrics], "run_name", "trial_id"]
    for path, members in ((out / "trials.csv", range(len(rows))), (out / "pareto.csv", front)):
        keys = columns + ["status"] + sorted({k for i in members for k in rows[i]} - set(columns) - {"status"})
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for i in members:
                writer.writerow(rows[i])
    (out / "pareto.txt").write_text(front_table(rows, front, columns) + "\n")
    if len(objectives) >= 2 and front:
        reference = next((i for i, r in enumerate(rows) if r.get("label") == UNCOMPRESSED), None)
        plot_front(rows, front, objectives, "label", out / "pareto.png", out / "pareto.html",
                   title=f"{name}: Pareto front on {split['val']}", reference=reference)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m jobs.sweep", __doc__, argv)
    cfg = load(args.config, args.overrides)
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(cfg.output_dir, "sweep", args.verbose), console.step(f"sweep: {cfg.name}") as step:
        out = run_sweep(cfg)
        step.done(f"{sum(r['status'] == 'done' for r in out['rows'])} of {len(out['rows'])} trials done, "
                  f"{len(out['front'])} on the Pareto front")
    return 0


if __name__ == "__main__":
    sys.exit(main())
