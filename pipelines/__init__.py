"""Ray Data jobs. Each is thin: build a Dataset from a config and call into `mmreason`."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.
    `log_to_driver` stays on: the workers' output reaches this process's stdout, which a job's console
    session (`mmreason.console`) sends to the run's log file."""
    import ray

    from mmreason import console

    if console.quiet():  # redraws would fill the log file; the job shows its own progress
        ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    _start_ray(num_cpus)
    if console.redirected():
        _worker_output_to_log()


def _start_ray(num_cpus: int | None) -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs: without
        # it a training run that Tune stops (ASHA) keeps its workers' CPUs for good (measured:
        # 1.8 of 2 CPUs held after the sweep, the next Train run waits forever)
        ray.init(num_cpus=num_cpus, include_dashboard=True, configure_logging=True, logging_level="warning")


def _worker_output_to_log() -> None:
    """Ray prints the workers' output in a thread of this process to whatever sys.stdout is when it
    arrives, and some arrives after the job's console session closed and the terminal is back (a
    DeepSpeed warning, seen here). From a quiet session on, it goes to the latest log file for the
    rest of the process (a later verbose session prints it). Ray has no public hook for this: the
    handler is swapped where Ray keeps it, and left alone if that moves."""
    from ray._private import worker as ray_worker

    from mmreason import console

    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or not hasattr(ray_worker, "print_worker_logs"):
        return

    def to_log(data: dict[str, Any]) -> None:
        log = console.last_log()
        if log is None or (console.active() and not console.quiet()):
            ray_worker.print_to_stdstream(data, ignore_prefix=False)
            return
        with open(log, "a") as fh:
            ray_worker.print_worker_logs(data, fh)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log)


AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where `ray up` leaves the cluster's launcher config on the head node (the job drivers' node)."""


def cluster_gpus() -> tuple[float, float]:
    """(GPUs the running cluster has, GPUs of the largest GPU node type its autoscaler can still
    start). A cluster launched from cluster.yaml starts with no GPU node; a stage that asks for GPUs
    makes the autoscaler add them, so both numbers decide whether `use_gpu` can be served."""
    import ray
    import yaml

    init_ray()
    now = float(ray.cluster_resources().get("GPU", 0.0))
    path = os.path.expanduser(os.environ.get("MMREASON_AUTOSCALER_CONFIG", AUTOSCALER_CONFIG))
    scalable = 0.0
    if os.path.isfile(path):
        with open(path) as fh:
            types = (yaml.safe_load(fh) or {}).get("available_node_types", {})
        scalable = max([float((t.get("resources") or {}).get("GPU", 0)) for t in types.values()
                        if t.get("max_workers", 0) > 0] or [0.0])
    return now, scalable


TASK_CPUS = 1
"""What each `map_shards` task (one shard to build) asks Ray for."""


def shard_tasks(n_tasks: int, concurrency: int | None = None) -> dict[str, Any]:
    """What `map_shards` would ask Ray for (a data job's `--check`): `n_tasks` tasks of TASK_CPUS CPU,
    at most `concurrency` at once, and no more than the cluster's CPUs hold now. Starts or joins Ray
    to read the cluster's resources; starts no task."""
    import ray

    init_ray()
    cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    fits = int(cluster.get("CPU", 0) // TASK_CPUS)
    at_once = min(n_tasks, fits if concurrency is None else min(fits, concurrency))
    return {"tasks": n_tasks, "per_task": {"CPU": TASK_CPUS}, "concurrency": at_once, "cluster": cluster}


def map_shards(
    items: list[dict[str, Any]], fn: Callable[..., dict[str, Any]], fn_kwargs: dict[str, Any],
    concurrency: int | None = None, desc: str = "shards",
) -> Iterator[dict[str, Any]]:
    """Run `fn(item, **fn_kwargs)` as one Ray task per item (a shard to build, TASK_CPUS each), at most
    `concurrency` at once (None: as many as there are CPUs); yield each result row as it finishes, so
    the caller can record progress (the manifest) shard by shard. The console shows `desc` done/total."""
    import ray

    from mmreason import console

    init_ray()
    # One map operator whose outputs are a few bytes each: Ray Data's per-operator resource
    # reservation only holds CPUs back from it (measured: ~1 of 2 CPUs idle, 2x slower).
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    bar = console.progress(len(items), desc)
    for row in ds.map(fn, fn_kwargs=fn_kwargs, num_cpus=TASK_CPUS, concurrency=concurrency).iter_rows():
        bar.update(1)
        yield dict(row)
    bar.close()
