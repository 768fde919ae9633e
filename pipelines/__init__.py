"""Ray Data jobs. Each is thin: build a Dataset from a config and call into `mmreason`."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs: without
        # it a training run that Tune stops (ASHA) keeps its workers' CPUs for good (measured:
        # 1.8 of 2 CPUs held after the sweep, the next Train run waits forever)
        ray.init(num_cpus=num_cpus, include_dashboard=True, configure_logging=True, logging_level="warning")


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
    concurrency: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Run `fn(item, **fn_kwargs)` as one Ray task per item (a shard to build, TASK_CPUS each), at most
    `concurrency` at once (None: as many as there are CPUs); yield each result row as it finishes, so
    the caller can record progress (the manifest) shard by shard."""
    import ray

    init_ray()
    # One map operator whose outputs are a few bytes each: Ray Data's per-operator resource
    # reservation only holds CPUs back from it (measured: ~1 of 2 CPUs idle, 2x slower).
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    for row in ds.map(fn, fn_kwargs=fn_kwargs, num_cpus=TASK_CPUS, concurrency=concurrency).iter_rows():
        yield dict(row)
