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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
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


def verify_shards(root: str | Path, entries: Sequence[dict[str, Any]]) -> None:
    """Before a job reads them: every shard of `entries` (the manifest's, under `root`) is there,
    whole and this dataset's — its size is the manifest's `bytes`, its footer reads, with the
    manifest's row count and dataset name. One `CorruptShardError` names every bad file (missing,
    truncated or damaged, foreign); footers only, so a few ranged reads a shard on an object store."""
    dataset = read_manifest(root).get("dataset") if entries else None
    problems = []
    for entry in entries:
        path = storage.join(str(root), entry["path"])
        try:
            size = storage.size(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if "bytes" in entry and size != entry["bytes"]:
            problems.append(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)")
            continue
        try:
            info = read_shard_info(path)
        except CorruptShardError as exc:
            problems.append(str(exc).removeprefix("corrupt shard "))
            continue
        if info.get("rows") != entry.get("rows"):
            problems.append(f"{path} holds {info.get('rows')} rows, the manifest says {entry.get('rows')}")
        elif dataset and info.get("dataset") not in (None, dataset):
            problems.append(f"{path} is a shard of {info.get('dataset')!r}, not of this {dataset!r} dataset")
    if problems:
        raise CorruptShardError(f"dataset {root}: {len(problems)} bad shard(s): " + "; ".join(problems)
                                + " — rebuild them with the data job (its --overwrite replaces bad shards)")


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


def ensure_writable_dir(root: str | Path, dry_run: bool = False) -> str:
    """Create `root` if needed and prove a file can be written (and deleted) there; returns it as a
    location. Errors name the directory (on an object store: a missing bucket, no credentials, no access).
    On an object store the probe leaves an empty folder marker (`prefix/`) behind, as mkdir leaves a folder.

    `dry_run` (a job's `--check`) creates and writes nothing: a local `root` must be a folder or sit
    under one this process may write to; on an object store the prefix must be listable (the bucket
    there, the credentials accepted) — whether writes are allowed shows only when the job runs."""
    root = os.fspath(root)
    if dry_run:
        return _check_dir_without_writing(root)
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


def _check_dir_without_writing(root: str) -> str:
    if storage.is_remote(root):
        fs, path = storage.filesystem(root)
        bucket = path.split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
            storage.list_files(root, recursive=False)
        except OSError as exc:
            raise PermissionError(f"output dir {root} is not writable: {exc}") from exc
        if missing:
            raise PermissionError(f"output dir {root} is not writable: there is no bucket {bucket}")
        return root
    nearest = Path(root)
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise PermissionError(f"output dir {root} is not writable: {nearest} is not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(f"output dir {root} is not writable: no write permission on {nearest}")
    return root


@dataclass
class OutputPlan:
    """How a data job's planned shards stand at its output location, found by reading only: the
    job's `--check` prints it (`summary`); the run clears the way (`clear_output`) and builds `todo`."""

    root: str
    finished: dict[str, dict[str, Any]]
    """Relative path → footer info of each planned shard this config already wrote (a re-run skips it)."""
    todo: list[str]
    """Planned shards to (re)build."""
    strays: list[str]
    """Shards the plan does not name (there only with `overwrite`, which deletes them before work)."""

    def summary(self, rows: dict[str, int] | None = None) -> dict[str, Any]:
        """Where the job writes and its shards planned / done / to build; with `rows` (relative path →
        planned rows of the shards that count as rows) the rows too."""
        shards = {"planned": len(self.finished) + len(self.todo), "done": len(self.finished),
                  "to_build": len(self.todo)}
        if self.strays:
            shards["strays_to_delete"] = len(self.strays)
        out: dict[str, Any] = {"output_dir": self.root, "shards": shards}
        if rows is not None:
            out["rows"] = {"planned": sum(rows.values()),
                           "done": sum(info["rows"] for rel, info in self.finished.items() if rel in rows),
                           "to_build": sum(rows[rel] for rel in self.todo if rel in rows)}
        return out


def plan_output(
    root: str, planned: dict[str, dict[str, Any]], overwrite: bool, differs: str = "", dry_run: bool = False
) -> OutputPlan:
    """Check `root` as an output location (`ensure_writable_dir`; `dry_run` writes nothing) and sort
    the planned shards (relative path → the info its footer must carry) into finished ones (a
    re-run skips them) and ones to (re)build, reading only.

    A shard the plan does not name, a corrupt shard, or one whose config hash differs stops the job
    naming the file, unless `overwrite` (then strays are listed for `clear_output` to delete and
    every planned shard is rebuilt). A shard that recorded failed rows is rebuilt, so its failures
    are retried and listed again. `differs` hints at what a different config means for this dataset.
    """
    ensure_writable_dir(root, dry_run=dry_run)
    found = {rel for rel in storage.list_files(root) if rel.endswith(".parquet")}
    strays = sorted(rel for rel in found if rel not in planned)
    if strays and not overwrite:
        raise FileExistsError(
            f"output dir {root} holds shards this config does not produce ({', '.join(strays[:5])}"
            f"{' …' if len(strays) > 5 else ''}); use --overwrite to replace them, or another output_dir"
        )
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
    return OutputPlan(root, done, todo, strays)


def clear_output(output: OutputPlan) -> None:
    """Before work: delete leftovers of interrupted local writes and (under `overwrite`) the strays."""
    remove_temp_files(output.root)
    for rel in output.strays:
        storage.remove(storage.join(output.root, rel))


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
