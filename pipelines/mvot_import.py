"""Ray Data job: import MVoT's raw Maze and FrozenLake data (a folder or .zip) into Parquet shards
of the example schema, next to and alike the grid-world job's.

    python -m pipelines.mvot_import PATH [CONFIG.yaml] [key=value ...] [--overwrite] [--check]
    mmreason data import-mvot PATH [CONFIG.yaml] [key=value ...] [--overwrite] [--check]

The driver reads the json files and checks every record (walls, actions, candidates, gymnasium's
own steps) — cheap, text only — and groups the good ones into shards by task, grid size and split;
one Ray task per shard then reads and verifies its frames and writes the shard. PATH must be
readable from every node (shared storage on a cluster, or an s3:// / gs:// URI, which each node copies
to its cache once), like `output_dir` (a local folder or an s3:// / gs:// prefix). Records that fail a
check are listed under `errors` in the manifest and printed; the rest import. Resume works as in
the grid-world job: a shard this input already wrote is skipped, a shard with failed records is
retried, a corrupt or foreign shard stops the job naming the file unless `--overwrite`. `--check`
reads and checks the records, prints the resolved config, the shards and records planned / already
done / to write, where they go and the Ray tasks that would write them, and writes nothing.

Exit status: 0 when every record imported, 1 when some were skipped, 2 for a user error (missing
PATH, no MVoT files in it, bad config, unwritable or foreign output_dir).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Sequence

from mmreason import console, storage
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import load_config, to_dict
from mmreason.data.mvot import (
    DATASET_NAME,
    ImportShard,
    MvotImportConfig,
    MvotSource,
    SourceFile,
    build_shard,
    plan_import,
    shard_info,
)
from mmreason.data.shards import (
    MANIFEST_NAME,
    OutputPlan,
    build_manifest,
    clear_output,
    plan_output,
    summary_table,
    write_json_atomic,
    write_shard,
)
from pipelines import map_shards, shard_tasks

SHARD_KEYS = ("path", "task", "size", "split", "part", "rows", "bytes")


def _import_shard(item: dict[str, Any], source: str, root: str) -> dict[str, Any]:
    """Ray Data map function: read one shard's frames and write it atomically."""
    spec = ImportShard.from_json(item["spec"])
    t0 = time.perf_counter()
    with MvotSource(source) as src:
        rows, errors = build_shard(src, spec)
    path = storage.join(root, spec.relpath)
    write_shard(path, rows, {**shard_info(spec), "errors": errors})
    return _entry(spec, len(rows), storage.size(path), time.perf_counter() - t0, errors)


def _entry(spec: ImportShard, rows: int, size_bytes: int, seconds: float, errors: list[dict]) -> dict[str, Any]:
    return {"path": spec.relpath, "task": spec.task, "size": spec.size, "split": spec.split, "part": spec.part,
            "rows": rows, "bytes": size_bytes, "seconds": seconds, "errors": json.dumps(errors)}


@dataclasses.dataclass
class ImportPlan:
    """What a run would do, found by reading only (`plan`)."""

    cfg: MvotImportConfig
    """With `source` as every node reads it."""
    specs: list[ImportShard]
    plan_errors: list[dict[str, str]]
    """Records that failed their checks."""
    files: list[SourceFile]
    output: OutputPlan


def plan(cfg: MvotImportConfig, dry_run: bool = False) -> ImportPlan:
    """Every check before work: the locations, the source's records (each checked, text only),
    `output_dir` and which shards are already written (a foreign or corrupt shard stops the job
    here). With `dry_run` nothing is created or written."""
    if not cfg.source:
        raise FileNotFoundError("no MVoT source given: pass PATH (a folder or .zip of MVoT data)")
    root = storage.check_location(cfg.output_dir, "output_dir")
    source_path = storage.check_location(cfg.source, "source")
    with MvotSource(source_path) as source:  # a missing PATH or one with no MVoT files stops here
        specs, plan_errors, files = plan_import(source, cfg.splits.as_dict(), cfg.rows_per_shard)
    cfg = dataclasses.replace(cfg, source=source_path)
    output = plan_output(root, {spec.relpath: shard_info(spec) for spec in specs}, cfg.overwrite,
                         differs="other MVoT input or split fractions", dry_run=dry_run)
    return ImportPlan(cfg, specs, plan_errors, files, output)


def check(cfg: MvotImportConfig) -> dict[str, Any]:
    """`--check`: `plan` without writing, and what the run would import and ask Ray for."""
    work = plan(cfg, dry_run=True)
    summary = work.output.summary({spec.relpath: len(spec.drafts) for spec in work.specs})
    return {"config": to_dict(work.cfg), "sources": [f.name for f in work.files],
            "records_rejected": len(work.plan_errors), **summary, "ray": shard_tasks(len(work.output.todo))}


def run(cfg: MvotImportConfig, log=console.echo) -> dict[str, Any]:
    """Import the MVoT data at `cfg.source`; returns the manifest (also written to output_dir)."""
    work = plan(cfg)
    clear_output(work.output)
    cfg, specs, plan_errors, files = work.cfg, work.specs, work.plan_errors, work.files
    root, finished, todo, source_path = work.output.root, work.output.finished, work.output.todo, cfg.source
    manifest_path = storage.join(root, MANIFEST_NAME)
    by_path = {spec.relpath: spec for spec in specs}
    entries = [_entry(by_path[rel], info["rows"], storage.size(storage.join(root, rel)), 0.0, [])
               for rel, info in finished.items()]

    def manifest() -> dict[str, Any]:
        out = build_manifest(DATASET_NAME, to_dict(cfg), entries, len(specs), SHARD_KEYS, plan_errors)
        out["sources"] = [f.name for f in files]
        return out

    write_json_atomic(manifest_path, manifest())
    log(f"mvot import: {len(files)} files in {source_path}, {sum(len(s.drafts) for s in specs)} records pass the "
        f"checks, {len(plan_errors)} fail; {len(specs)} shards planned, {len(finished)} already done, "
        f"{len(todo)} to write → {root}")
    t0 = time.perf_counter()
    imported = 0
    if todo:
        items = [{"spec": by_path[rel].to_json()} for rel in todo]
        for entry in map_shards(items, _import_shard, {"source": source_path, "root": root}):
            entries = [e for e in entries if e["path"] != entry["path"]] + [entry]
            imported += entry["rows"]
            write_json_atomic(manifest_path, manifest())
    seconds = time.perf_counter() - t0
    out = manifest()
    out["last_run"] = {"imported_rows": imported, "seconds": round(seconds, 3)}
    write_json_atomic(manifest_path, out)
    return out


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m pipelines.mvot_import", __doc__, argv, flags=("overwrite",), positionals=("path",))
    cfg = load_config(MvotImportConfig, args.config, args.overrides)
    cfg = dataclasses.replace(cfg, source=args.positionals["path"])
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(cfg.output_dir, "mvot_import", args.verbose):
        with console.step("data: import-mvot") as step:
            manifest = run(cfg)
            step.done(f"{manifest['total_rows']} rows in {cfg.output_dir}")
        console.echo(summary_table(manifest))
    last = manifest["last_run"]
    print(f"{manifest['total_rows']} rows in {cfg.output_dir} "
          f"({last['imported_rows']} imported in {last['seconds']:.1f}s)")
    if manifest["errors"]:
        print(f"skipped {len(manifest['errors'])} records (listed under 'errors' in {cfg.output_dir}/{MANIFEST_NAME}):",
              file=sys.stderr)
        for error in manifest["errors"]:
            print(f"  {error['id']}: {error['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
