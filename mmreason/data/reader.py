"""Read example shards back: by split and task, as decoded `Example`s (no Ray needed), as an Arrow
table, or as a Ray Dataset for training workers. Only shards the manifest lists are read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mmreason.data.schema import EXAMPLE_SCHEMA, SPLITS, TASK_NAMES, Example, decode_row
from mmreason.data.shards import read_manifest


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
                sizes: Sequence[int] | None = None) -> list[Path]:
    """Paths of the manifest's shards for `split` / `task` / grid `sizes` (None = all)."""
    return [Path(root) / shard["path"] for shard in shard_entries(root, split, task, sizes)]


def read_table(
    root: str | Path, split: str | None = None, task: str | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """All matching rows as one Arrow table (empty, with the schema, when nothing matches)."""
    paths = shard_paths(root, split, task)
    schema = EXAMPLE_SCHEMA if columns is None else pa.schema([EXAMPLE_SCHEMA.field(c) for c in columns])
    if not paths:
        return schema.empty_table()
    return pa.concat_tables(pq.read_table(p, columns=columns, schema=EXAMPLE_SCHEMA) for p in paths)


def iter_examples(root: str | Path, split: str | None = None, task: str | None = None) -> Iterator[Example]:
    """Decoded examples, one shard in memory at a time."""
    for path in shard_paths(root, split, task):
        for row in pq.read_table(path, schema=EXAMPLE_SCHEMA).to_pylist():
            yield decode_row(row)


def load_examples(root: str | Path, split: str | None = None, task: str | None = None) -> list[Example]:
    return list(iter_examples(root, split, task))


def ray_dataset(root: str | Path, split: str | None = None, task: str | None = None,
                sizes: Sequence[int] | None = None, **read_kwargs: Any):
    """A Ray Dataset of encoded rows (images stay bytes; collators decode them in the workers)."""
    import ray.data

    paths = shard_paths(root, split, task, sizes)
    if not paths:
        raise FileNotFoundError(f"no shards in {root} for split={split} task={task} sizes={sizes}")
    return ray.data.read_parquet([str(p) for p in paths], schema=EXAMPLE_SCHEMA, **read_kwargs)
