"""Ray Data job: import A-OKVQA (annotation json + COCO images) into Parquet shards of the example schema.

    python -m pipelines.aokvqa [CONFIG.yaml] source=PATH coco_dir=PATH [key=value ...] [--overwrite] [--check]
    mmreason data aokvqa [CONFIG.yaml] source=PATH coco_dir=PATH [key=value ...] [--overwrite] [--check]

The driver reads the annotation files and checks every record (text only); one Ray task per shard
then reads and verifies the shard's images and writes it. `source` and `coco_dir` must be readable
from every node (shared storage, or s3:// / gs://); `output_dir` is a local folder or an s3:// / gs://
prefix. A record that breaks the format or whose image is missing or unreadable is listed
(id, file and row) under `errors` in the manifest and printed; the rest import. Resume works as in
the grid-world job: finished shards are skipped, a shard with failed records is retried, a corrupt
or foreign shard stops the job naming the file unless `--overwrite`. `--check` reads and checks the
annotations, prints the resolved config, the shards and records planned / already done / to write,
where they go and the Ray tasks that would write them, and writes nothing.

Exit status: 0 when every record imported, 1 when some were skipped, 2 for a user error.
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
from mmreason.data.aokvqa import DATASET_NAME, AokvqaConfig, AokvqaShard, build_shard, plan_import, shard_info
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

SHARD_KEYS = ("path", "task", "split", "part", "rows", "bytes")


def _import_shard(item: dict[str, Any], cfg: AokvqaConfig, root: str) -> dict[str, Any]:
    """Ray Data map function: read one shard's images and write it atomically."""
    spec = AokvqaShard.from_json(item["spec"])
    t0 = time.perf_counter()
    rows, errors = build_shard(cfg, spec)
    path = storage.join(root, spec.relpath)
    write_shard(path, rows, {**shard_info(cfg, spec), "errors": errors})
    return _entry(spec, len(rows), storage.size(path), time.perf_counter() - t0, errors)


def _entry(spec: AokvqaShard, rows: int, size_bytes: int, seconds: float, errors: list[dict]) -> dict[str, Any]:
    return {"path": spec.relpath, "task": DATASET_NAME, "split": spec.split, "part": spec.part, "rows": rows,
            "bytes": size_bytes, "seconds": seconds, "errors": json.dumps(errors)}


@dataclasses.dataclass
class ImportPlan:
    """What a run would do, found by reading only (`plan`)."""

    cfg: AokvqaConfig
    """With `source` and `coco_dir` as every node reads them."""
    specs: list[AokvqaShard]
    plan_errors: list[dict[str, str]]
    """Records that failed their checks."""
    files: dict[str, str]
    """Split → the annotation file read."""
    output: OutputPlan


def plan(cfg: AokvqaConfig, dry_run: bool = False) -> ImportPlan:
    """Every check before work: the locations, the annotations (each record checked, text only),
    `coco_dir`, `output_dir` and which shards are already written (a foreign or corrupt shard stops
    the job here). With `dry_run` nothing is created or written."""
    root = storage.check_location(cfg.output_dir, "output_dir")
    cfg = dataclasses.replace(cfg, source=storage.check_location(cfg.source, "source") if cfg.source else "",
                              coco_dir=storage.check_location(cfg.coco_dir, "coco_dir") if cfg.coco_dir else "")
    specs, plan_errors, files = plan_import(cfg)  # a missing or unreadable source stops here
    if not cfg.coco_dir or not storage.is_dir(cfg.coco_dir):
        raise FileNotFoundError(f"coco_dir {cfg.coco_dir or '(none)'} is not a folder (set coco_dir=PATH to the "
                                f"COCO 2017 root holding train2017/, val2017/, test2017/)")
    output = plan_output(root, {spec.relpath: shard_info(cfg, spec) for spec in specs}, cfg.overwrite,
                         differs="other annotations, images or image size", dry_run=dry_run)
    return ImportPlan(cfg, specs, plan_errors, files, output)


def check(cfg: AokvqaConfig) -> dict[str, Any]:
    """`--check`: `plan` without writing, and what the run would import and ask Ray for."""
    work = plan(cfg, dry_run=True)
    summary = work.output.summary({spec.relpath: len(spec.drafts) for spec in work.specs})
    return {"config": to_dict(work.cfg), "sources": work.files, "records_rejected": len(work.plan_errors),
            **summary, "ray": shard_tasks(len(work.output.todo))}


def run(cfg: AokvqaConfig, log=console.echo) -> dict[str, Any]:
    """Import the A-OKVQA data `cfg` names; returns the manifest (also written to output_dir)."""
    work = plan(cfg)
    clear_output(work.output)
    cfg, specs, plan_errors, files = work.cfg, work.specs, work.plan_errors, work.files
    root, finished, todo = work.output.root, work.output.finished, work.output.todo
    manifest_path = storage.join(root, MANIFEST_NAME)
    by_path = {spec.relpath: spec for spec in specs}
    entries = [_entry(by_path[rel], info["rows"], storage.size(storage.join(root, rel)), 0.0, [])
               for rel, info in finished.items()]

    def manifest() -> dict[str, Any]:
        out = build_manifest(DATASET_NAME, to_dict(cfg), entries, len(specs), SHARD_KEYS, plan_errors)
        out["sources"] = {split: str(path) for split, path in files.items()}
        return out

    write_json_atomic(manifest_path, manifest())
    log(f"aokvqa: {sum(len(s.drafts) for s in specs)} records pass the checks, {len(plan_errors)} fail; "
        f"{len(specs)} shards planned, {len(finished)} already done, {len(todo)} to write → {root}")
    t0 = time.perf_counter()
    imported = 0
    if todo:
        items = [{"spec": by_path[rel].to_json()} for rel in todo]
        for entry in map_shards(items, _import_shard, {"cfg": cfg, "root": root}):
            entries = [e for e in entries if e["path"] != entry["path"]] + [entry]
            imported += entry["rows"]
            write_json_atomic(manifest_path, manifest())
    out = manifest()
    out["last_run"] = {"imported_rows": imported, "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(manifest_path, out)
    return out


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m pipelines.aokvqa", __doc__, argv, flags=("overwrite",))
    cfg = load_config(AokvqaConfig, args.config, args.overrides)
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(cfg.output_dir, "aokvqa", args.verbose):
        with console.step("data: aokvqa") as step:
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
