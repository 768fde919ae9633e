"""Parquet shards of the example schema, written atomically, with a manifest.

A dataset lives at a location (`mmreason.storage`: a local folder, or an `s3://` / `gs://` prefix).
A shard is serialised in memory and written in one atomic step (locally a temporary name renamed
into place; on an object store one upload that publishes only when whole), so a shard that exists
is complete; its Parquet footer carries `info` (the spec and config hash that produced it) so a
re-run can tell a finished shard from one some other config wrote. The manifest (`manifest.json`)
lists the shards of a dataset and is rewritten (atomically) only after the shards it names are
written; readers go through it, so files it does not name are never read. Every data pipeline
(grid worlds, CinePile, A-OKVQA, MVoT import) writes through here.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mmreason import storage
from mmreason.data.schema import EXAMPLE_SCHEMA, SCHEMA_VERSION, SPLITS, validate_row

MANIFEST_NAME = "manifest.json"
INFO_KEY = b"mmreason"
TMP_MARK = storage.TMP_MARK


class CorruptShardError(ValueError):
    """A shard on disk cannot be read as an example shard; the message names the file."""


class SourceError(ValueError):
    """A data source a user named (folder, archive) cannot be read or holds nothing to import; the
    message names it."""


def write_shard(path: str | Path, rows: Iterable[dict[str, Any]], info: dict[str, Any]) -> int:
    """Validate `rows`, write them to the location `path` atomically with `info` in the footer; returns
    the row count."""
    rows = list(rows)
    for row in rows:
        validate_row(row)
    table = pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)
    info = {"schema_version": SCHEMA_VERSION, **info, "rows": len(rows)}
    table = table.replace_schema_metadata({INFO_KEY: json.dumps(info, sort_keys=True).encode()})
    buffer = pa.BufferOutputStream()  # the whole file first: an object-store upload cut short must not publish
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(path, buffer.getvalue())
    return len(rows)


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of the shard at the location `path` (all columns, or `columns`), in the example schema."""
    fs, where = storage.filesystem(path)
    return pq.read_table(where, columns=columns, schema=EXAMPLE_SCHEMA, filesystem=fs)


def read_shard_info(path: str | Path) -> dict[str, Any]:
    """The `info` a shard was written with (plus its row count); corrupt files raise naming the path."""
    try:
        fs, where = storage.filesystem(path)
        with fs.open_input_file(where) as f:  # the footer only: a few ranged reads on an object store
            parquet = pq.ParquetFile(f)
            meta, schema = parquet.metadata, parquet.schema_arrow.remove_metadata()
        raw = (meta.metadata or {}).get(INFO_KEY)
        if raw is None:
            raise ValueError("no mmreason shard info in the footer (not written by mmreason)")
        info = json.loads(raw)
        if not schema.equals(EXAMPLE_SCHEMA):
            raise ValueError("columns differ from the example schema")
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise CorruptShardError(f"corrupt shard {path}: {exc}") from exc
    if meta.num_rows != info.get("rows"):
        raise CorruptShardError(f"corrupt shard {path}: footer says {info.get('rows')} rows, file has {meta.num_rows}")
    return info


def remove_temp_files(root: str | Path) -> list[str]:
    """Delete leftovers of interrupted local writes (never complete shards) under `root`. An object store
    has none: an upload cut short never becomes an object."""
    if storage.is_remote(root):
        return []
    removed = []
    for tmp in Path(root).rglob(f".*{TMP_MARK}*"):
        tmp.unlink(missing_ok=True)
        removed.append(str(tmp))
    return removed


def write_json_atomic(path: str | Path, data: Any) -> None:
    storage.write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = storage.join(root, MANIFEST_NAME)
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: not a dataset directory, or the job writing it has not finished"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptShardError(f"corrupt manifest {path}: {exc}") from exc


def ensure_writable_dir(root: str | Path) -> str:
    """Create `root` if needed and prove a file can be written (and deleted) there; returns it as a
    location. Errors name the directory (on an object store: a missing bucket, no credentials, no access).
    On an object store the probe leaves an empty folder marker (`prefix/`) behind, as mkdir leaves a folder."""
    root = os.fspath(root)
    probe = storage.join(root, f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}")
    if not storage.is_remote(root):
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            Path(probe).write_bytes(b"")
            Path(probe).unlink()
        except OSError as exc:
            raise PermissionError(f"output dir {root} is not writable: {exc.strerror or exc}") from exc
        return root
    try:
        storage.write_bytes_atomic(probe, b"")
        storage.remove(probe)
    except OSError as exc:
        raise PermissionError(f"output dir {root} is not writable: {exc}") from exc
    return root


def check_existing(
    root: str | Path, planned: dict[str, dict[str, Any]], overwrite: bool, differs: str = ""
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Sort the planned shards (relative path → the info its footer must carry) into finished ones
    (relative path → footer info; a re-run skips them) and ones to (re)build.

    A shard the plan does not name, a corrupt shard, or one whose config hash differs stops the job
    naming the file, unless `overwrite` (then strays are deleted and every planned shard is rebuilt).
    A shard that recorded failed rows is rebuilt, so its failures are retried and listed again.
    `differs` hints at what a different config means for this dataset.
    """
    found = {rel for rel in storage.list_files(root) if rel.endswith(".parquet")}
    strays = sorted(rel for rel in found if rel not in planned)
    if strays:
        if not overwrite:
            raise FileExistsError(
                f"output dir {root} holds shards this config does not produce ({', '.join(strays[:5])}"
                f"{' …' if len(strays) > 5 else ''}); use --overwrite to replace them, or another output_dir"
            )
        for rel in strays:
            storage.remove(storage.join(root, rel))
    done, todo = {}, []
    for rel, want in planned.items():
        path = storage.join(root, rel)
        if rel not in found or overwrite:
            todo.append(rel)
            continue
        info = read_shard_info(path)  # CorruptShardError names the file
        if info.get("config_hash") != want["config_hash"]:
            raise FileExistsError(
                f"shard {path} was written by a different config{f' ({differs})' if differs else ''}; "
                f"use --overwrite to regenerate it, or another output_dir"
            )
        if info.get("errors"):
            todo.append(rel)
            continue
        done[rel] = info
    return done, todo


def build_manifest(
    dataset: str,
    config: dict[str, Any],
    entries: list[dict[str, Any]],
    n_planned: int,
    shard_keys: tuple[str, ...],
    errors: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """The manifest of a dataset from its finished shards' entries (each with `path`, `task`,
    `split`, `rows` and its failed rows as a JSON string `errors`) plus failures outside any shard."""
    rows: dict[str, dict[str, int]] = {}
    all_errors = list(errors)
    for e in entries:
        by_task = rows.setdefault(e["split"], {})
        by_task[e["task"]] = by_task.get(e["task"], 0) + e["rows"]
        all_errors += json.loads(e["errors"])
    return {
        "dataset": dataset,
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "complete": len(entries) == n_planned and not all_errors,
        "rows": rows,
        "total_rows": sum(e["rows"] for e in entries),
        "shards": sorted(({k: e[k] for k in shard_keys} for e in entries), key=lambda e: e["path"]),
        "errors": all_errors,
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """Rows per task and split, as a small text table."""
    tasks = sorted({t for by_task in manifest["rows"].values() for t in by_task})
    lines = [f"{'task':<14}" + "".join(f"{s:>8}" for s in SPLITS)]
    for t in tasks:
        lines.append(f"{t:<14}" + "".join(f"{manifest['rows'].get(s, {}).get(t, 0):>8}" for s in SPLITS))
    return "\n".join(lines)
