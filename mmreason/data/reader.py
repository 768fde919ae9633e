"""Read example shards back: by split and task, as decoded `Example`s (no Ray needed), as an Arrow
table, or as a Ray Dataset for training workers. Only shards the manifest lists are read. A dataset
root is a location (`mmreason.storage`): a local folder or an `s3://` / `gs://` prefix. Shards are
checked against the manifest before any is read (`mmreason.data.shards.verify_shards`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa

from mmreason import storage
from mmreason.data.schema import EXAMPLE_SCHEMA, SPLITS, TASK_NAMES, Example, decode_row
from mmreason.data.shards import read_manifest, read_shard, verify_shards


def shard_entries(root: str | Path, split: str | None = None, task: str | None = None,
                  sizes: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The manifest's entries (path, task, size, split, rows, …) for `split` / `task` / grid `sizes`
    (None = all)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if task is not None and task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASK_NAMES)})")
    return [
        shard
        for shard in read_manifest(root)["shards"]
        if (split is None or shard["split"] == split) and (task is None or shard["task"] == task)
        and (sizes is None or shard.get("size") in sizes)
    ]


def shard_paths(root: str | Path, split: str | None = None, task: str | None = None,
                sizes: Sequence[int] | None = None) -> list[str]:
    """Locations of the manifest's shards for `split` / `task` / grid `sizes` (None = all), each
    checked against the manifest first (`verify_shards`: missing, truncated or foreign shards are
    named before anything is read)."""
    entries = shard_entries(root, split, task, sizes)
    verify_shards(root, entries)
    return [storage.join(root, shard["path"]) for shard in entries]


def read_table(
    root: str | Path, split: str | None = None, task: str | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """All matching rows as one Arrow table (empty, with the schema, when nothing matches)."""
    paths = shard_paths(root, split, task)
    schema = EXAMPLE_SCHEMA if columns is None else pa.schema([EXAMPLE_SCHEMA.field(c) for c in columns])
    if not paths:
        return schema.empty_table()
    return pa.concat_tables(read_shard(p, columns) for p in paths)


def iter_examples(root: str | Path, split: str | None = None, task: str | None = None) -> Iterator[Example]:
    """Decoded examples, one shard in memory at a time."""
    for path in shard_paths(root, split, task):
        for row in read_shard(path).to_pylist():
            yield decode_row(row)


def load_examples(root: str | Path, split: str | None = None, task: str | None = None) -> list[Example]:
    return list(iter_examples(root, split, task))


def ray_dataset(root: str | Path, split: str | None = None, task: str | None = None,
                sizes: Sequence[int] | None = None, **read_kwargs: Any):
    """A Ray Dataset of encoded rows (images stay bytes; collators decode them in the workers). On an
    object store the read tasks get this process's filesystem (endpoint and credentials included)."""
    import ray.data

    paths = shard_paths(root, split, task, sizes)
    if not paths:
        raise FileNotFoundError(f"no shards in {root} for split={split} task={task} sizes={sizes}")
    fs = storage.filesystem(root)[0] if storage.is_remote(root) else None
    if fs is not None:
        paths = [storage.filesystem(p)[1] for p in paths]
        read_kwargs.setdefault("filesystem", fs)
    return ray.data.read_parquet(paths, schema=EXAMPLE_SCHEMA, **read_kwargs)
