"""The Ray Train side of a stage: `train_loop_per_worker` runs the shared loop
(`mmreason.train.loop.run_loop`) with a `RayWorker` — this worker's rank and device
(`ray.train.torch.get_device()`: its GPU when the trainer asked for GPUs), its shard of the Parquet
dataset cut into micro-batches (video questions joined with their clip's frames here), the last Ray
Train checkpoint, `ray.train.report`, and MLflow metrics from rank 0.
This and `jobs/train.py` are the only places that touch Ray Train.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from mmreason.config import from_dict
from mmreason.train.config import TrainConfig
from mmreason.train.loop import run_loop

__all__ = ["RayWorker", "checkpoint_directory", "train_loop_per_worker"]


@contextmanager
def checkpoint_directory(checkpoint: Any) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder: in place when it is on this machine's filesystem,
    else downloaded into a temporary folder for the block (`storage.download_tree`: Ray's own
    download cannot fetch nested folders from gs://)."""
    import pyarrow.fs as pafs

    from mmreason import storage

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
        yield storage.download_tree(checkpoint.filesystem, checkpoint.path, Path(tmp) / "checkpoint")


class RayWorker:
    """`mmreason.train.loop.Worker` on a Ray Train worker."""

    def __init__(self, cfg: TrainConfig, mlflow_uri: str | None, mlflow_run_id: str | None):
        import ray.train
        import ray.train.torch

        from mmreason.data.cinepile import ClipCache

        ctx = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # DeepSpeed then places the engine on this worker's GPU
        self.checkpoint = ray.train.get_checkpoint()
        self.shard = ray.train.get_dataset_shard("train")
        self.clips = ClipCache(cfg.data.path)
        self.mlflow, self.run_id = None, mlflow_run_id
        if self.rank == 0 and mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.mlflow = MlflowClient(mlflow_uri)

    def has_checkpoint(self) -> bool:
        return self.checkpoint is not None

    def restore(self) -> AbstractContextManager[Path]:
        return checkpoint_directory(self.checkpoint)

    def batches(self, epoch: int) -> Iterator[list[dict]]:
        from mmreason.data.cinepile import video_rows

        b = self.cfg.optim.batch_size
        for table in self.shard.iter_batches(batch_size=b, batch_format="pyarrow", drop_last=True,
                                             local_shuffle_buffer_size=4 * b, local_shuffle_seed=epoch):
            yield video_rows(table.to_pylist(), self.clips, self.cfg.video.num_frames)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg = from_dict(TrainConfig, config["train"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    worker = RayWorker(cfg, config.get("mlflow_uri"), config.get("mlflow_run_id"))
    return run_loop(cfg, config["model_path"], worker, config["deepspeed_config"], config["steps_per_epoch"],
                    config["run_location"], config.get("dare_fit_rows") or [])
