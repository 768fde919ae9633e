"""Ray Data job: render grid-world reasoning examples into Parquet shards.

    python -m pipelines.gridworld [CONFIG.yaml] [key=value ...] [--overwrite]
    mmreason data gridworld [CONFIG.yaml] [key=value ...] [--overwrite]

One Ray task per shard. A shard already on disk that this config wrote is skipped; a shard another
config wrote, a corrupt shard, or a shard this config does not produce stops the job before any
work (naming the file) unless `--overwrite`. The manifest is rewritten after every finished shard,
so a job killed at any moment and re-run ends with exactly the requested rows.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from mmreason.cli_args import job_main, parse_job_args
from mmreason.config import load_config
from mmreason.data.gridworld import (
    DATASET_NAME,
    GridworldConfig,
    ShardSpec,
    build_shard,
    plan_shards,
    shard_info,
)
from mmreason.data.schema import SCHEMA_VERSION
from mmreason.data.shards import (
    MANIFEST_NAME,
    ensure_writable_dir,
    read_shard_info,
    remove_temp_files,
    write_json_atomic,
    write_shard,
)
from pipelines import init_ray


def _render_shard(item: dict[str, Any], cfg: GridworldConfig, root: str) -> dict[str, Any]:
    """Ray Data map function: build one shard and write it atomically."""
    spec = ShardSpec(**{k: item[k] for k in ("task", "size", "split", "part", "start", "stop")})
    t0 = time.perf_counter()
    rows, errors = build_shard(cfg, spec)
    path = Path(root) / spec.relpath
    write_shard(path, rows, {**shard_info(cfg, spec), "errors": errors})
    return {
        **asdict(spec),
        "path": spec.relpath,
        "rows": len(rows),
        "bytes": path.stat().st_size,
        "seconds": time.perf_counter() - t0,
        "errors": json.dumps(errors),
    }


def _check_existing(cfg: GridworldConfig, root: Path, specs: list[ShardSpec]) -> tuple[list[dict], list[ShardSpec]]:
    """Split the plan into shards already done (skipped) and shards to (re)build."""
    planned = {spec.relpath for spec in specs}
    strays = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet") if str(p.relative_to(root)) not in planned)
    if strays:
        if not cfg.overwrite:
            raise FileExistsError(
                f"output dir {root} holds shards this config does not produce ({', '.join(strays[:5])}"
                f"{' …' if len(strays) > 5 else ''}); use --overwrite to replace them, or another output_dir"
            )
        for rel in strays:
            (root / rel).unlink()
    done, todo = [], []
    for spec in specs:
        path = root / spec.relpath
        if not path.exists() or cfg.overwrite:
            todo.append(spec)
            continue
        info = read_shard_info(path)  # CorruptShardError names the file
        want = shard_info(cfg, spec)
        if info.get("config_hash") != want["config_hash"]:
            raise FileExistsError(
                f"shard {path} was written by a different config (seed, sizes, counts, image size, …); "
                f"use --overwrite to regenerate it, or another output_dir"
            )
        if info.get("errors"):
            todo.append(spec)  # a shard with failed examples is retried
            continue
        done.append({**asdict(spec), "path": spec.relpath, "rows": info["rows"], "bytes": path.stat().st_size,
                     "seconds": 0.0, "errors": "[]"})
    return done, todo


def _manifest(cfg: GridworldConfig, entries: list[dict], n_planned: int) -> dict[str, Any]:
    rows: dict[str, dict[str, int]] = {}
    errors = []
    for e in entries:
        by_task = rows.setdefault(e["split"], {})
        by_task[e["task"]] = by_task.get(e["task"], 0) + e["rows"]
        errors += json.loads(e["errors"])
    return {
        "dataset": DATASET_NAME,
        "schema_version": SCHEMA_VERSION,
        "config": asdict(cfg),
        "complete": len(entries) == n_planned and not errors,
        "rows": rows,
        "total_rows": sum(e["rows"] for e in entries),
        "shards": sorted(
            ({k: e[k] for k in ("path", "task", "size", "split", "part", "start", "stop", "rows", "bytes")}
             for e in entries),
            key=lambda e: e["path"],
        ),
        "errors": errors,
    }


def run(cfg: GridworldConfig, log=print) -> dict[str, Any]:
    """Render the dataset `cfg` asks for; returns the manifest (also written to output_dir)."""
    root = ensure_writable_dir(Path(cfg.output_dir).resolve())
    remove_temp_files(root)
    specs = plan_shards(cfg)
    done, todo = _check_existing(cfg, root, specs)
    entries = list(done)
    write_json_atomic(root / MANIFEST_NAME, _manifest(cfg, entries, len(specs)))
    log(f"gridworld: {len(specs)} shards planned, {len(done)} already done, {len(todo)} to render → {root}")
    t0 = time.perf_counter()
    rendered = 0
    if todo:
        import ray

        init_ray()
        # One map operator whose outputs are a few bytes each: Ray Data's per-operator resource
        # reservation only holds CPUs back from it (measured: ~1 of 2 CPUs idle, 2x slower).
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False
        ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
        ds = ds.map(_render_shard, fn_kwargs={"cfg": cfg, "root": str(root)}, num_cpus=1)
        for entry in ds.iter_rows():
            entries = [e for e in entries if e["path"] != entry["path"]] + [dict(entry)]
            rendered += entry["rows"]
            write_json_atomic(root / MANIFEST_NAME, _manifest(cfg, entries, len(specs)))
    seconds = time.perf_counter() - t0
    manifest = _manifest(cfg, entries, len(specs))
    manifest["last_run"] = {"rendered_rows": rendered, "seconds": round(seconds, 3),
                            "examples_per_s": round(rendered / seconds, 1) if rendered else None}
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def summary_table(manifest: dict[str, Any]) -> str:
    tasks = sorted({t for by_task in manifest["rows"].values() for t in by_task})
    lines = [f"{'task':<14}" + "".join(f"{s:>8}" for s in ("train", "val", "test"))]
    for t in tasks:
        lines.append(f"{t:<14}" + "".join(f"{manifest['rows'].get(s, {}).get(t, 0):>8}" for s in ("train", "val", "test")))
    return "\n".join(lines)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m pipelines.gridworld", __doc__, argv, flags=("overwrite",))
    cfg = load_config(GridworldConfig, args.config, args.overrides)
    manifest = run(cfg)
    print(summary_table(manifest))
    last = manifest["last_run"]
    print(f"{manifest['total_rows']} rows in {cfg.output_dir} "
          f"({last['rendered_rows']} rendered in {last['seconds']:.1f}s)")
    if manifest["errors"]:
        print(f"{len(manifest['errors'])} examples failed; see 'errors' in {cfg.output_dir}/{MANIFEST_NAME}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
