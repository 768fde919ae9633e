"""Ray Data job: render grid-world reasoning examples into Parquet shards.

    python -m pipelines.gridworld [CONFIG.yaml] [key=value ...] [--overwrite] [--check]
    mmreason data gridworld [CONFIG.yaml] [key=value ...] [--overwrite] [--check]

One Ray task per shard. `output_dir` is a local folder or an s3:// / gs:// prefix (`mmreason.storage`;
anything else stops the job before Ray starts). A shard already written by this config is skipped; a
shard another config wrote, a corrupt shard, or a shard this config does not produce stops the job
before any work (naming the file) unless `--overwrite`. Each shard is written atomically and the
manifest is rewritten after every finished shard, so a job killed at any moment and re-run ends with
exactly the requested rows. `--check` runs every check, prints the resolved config, the shards and
rows planned / already done / to render, where they go and the Ray tasks that would render them, and
writes nothing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

from mmreason import console, storage
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import load_config
from mmreason.data.gridworld import (
    DATASET_NAME,
    GridworldConfig,
    ShardSpec,
    build_shard,
    plan_shards,
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

SHARD_KEYS = ("path", "task", "size", "split", "part", "start", "stop", "rows", "bytes")


def _render_shard(item: dict[str, Any], cfg: GridworldConfig, root: str) -> dict[str, Any]:
    """Ray Data map function: build one shard and write it atomically."""
    spec = ShardSpec(**{k: item[k] for k in ("task", "size", "split", "part", "start", "stop")})
    t0 = time.perf_counter()
    rows, errors = build_shard(cfg, spec)
    path = storage.join(root, spec.relpath)
    write_shard(path, rows, {**shard_info(cfg, spec), "errors": errors})
    return {
        **asdict(spec),
        "path": spec.relpath,
        "rows": len(rows),
        "bytes": storage.size(path),
        "seconds": time.perf_counter() - t0,
        "errors": json.dumps(errors),
    }


def plan(cfg: GridworldConfig, dry_run: bool = False) -> tuple[list[ShardSpec], OutputPlan]:
    """Every check before work: `output_dir` (a location, writable: with `dry_run` nothing is
    created), the shards `cfg` asks for, and which of them are already there (a foreign or corrupt
    shard stops the job here)."""
    root = storage.check_location(cfg.output_dir, "output_dir")
    specs = plan_shards(cfg)
    planned = {spec.relpath: shard_info(cfg, spec) for spec in specs}
    return specs, plan_output(root, planned, cfg.overwrite, differs="seed, sizes, counts, image size, …",
                              dry_run=dry_run)


def check(cfg: GridworldConfig) -> dict[str, Any]:
    """`--check`: `plan` without writing, and what the run would render and ask Ray for."""
    specs, output = plan(cfg, dry_run=True)
    rows = {spec.relpath: spec.stop - spec.start for spec in specs}
    return {"config": asdict(cfg), **output.summary(rows), "ray": shard_tasks(len(output.todo))}


def _manifest(cfg: GridworldConfig, entries: list[dict], n_planned: int) -> dict[str, Any]:
    return build_manifest(DATASET_NAME, asdict(cfg), entries, n_planned, SHARD_KEYS)


def run(cfg: GridworldConfig, log=console.echo) -> dict[str, Any]:
    """Render the dataset `cfg` asks for; returns the manifest (also written to output_dir)."""
    specs, output = plan(cfg)
    clear_output(output)
    root = output.root
    manifest_path = storage.join(root, MANIFEST_NAME)
    done = [{**asdict(spec), "path": spec.relpath, "rows": output.finished[spec.relpath]["rows"],
             "bytes": storage.size(storage.join(root, spec.relpath)), "seconds": 0.0, "errors": "[]"}
            for spec in specs if spec.relpath in output.finished]
    todo = [spec for spec in specs if spec.relpath in output.todo]
    entries = list(done)
    write_json_atomic(manifest_path, _manifest(cfg, entries, len(specs)))
    log(f"gridworld: {len(specs)} shards planned, {len(done)} already done, {len(todo)} to render → {root}")
    t0 = time.perf_counter()
    rendered = 0
    if todo:
        for entry in map_shards([asdict(s) for s in todo], _render_shard, {"cfg": cfg, "root": root}):
            entries = [e for e in entries if e["path"] != entry["path"]] + [entry]
            rendered += entry["rows"]
            write_json_atomic(manifest_path, _manifest(cfg, entries, len(specs)))
    seconds = time.perf_counter() - t0
    manifest = _manifest(cfg, entries, len(specs))
    manifest["last_run"] = {"rendered_rows": rendered, "seconds": round(seconds, 3),
                            "examples_per_s": round(rendered / seconds, 1) if rendered else None}
    write_json_atomic(manifest_path, manifest)
    return manifest


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m pipelines.gridworld", __doc__, argv, flags=("overwrite",))
    cfg = load_config(GridworldConfig, args.config, args.overrides)
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(cfg.output_dir, "gridworld", args.verbose):
        with console.step("data: gridworld") as step:
            manifest = run(cfg)
            last = manifest["last_run"]
            step.done(f"{manifest['total_rows']} rows in {cfg.output_dir} "
                      f"({last['rendered_rows']} rendered in {last['seconds']:.1f}s)")
        console.echo(summary_table(manifest))
    if manifest["errors"]:
        print(f"{len(manifest['errors'])} examples failed; see 'errors' in {cfg.output_dir}/{MANIFEST_NAME}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
