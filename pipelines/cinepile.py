"""Ray Data job: CinePile questions + their YouTube clips (yt-dlp) → sampled frames → Parquet shards.

    python -m pipelines.cinepile [CONFIG.yaml] [key=value ...] [--overwrite] [--check]
    mmreason data cinepile configs/data/cinepile.yaml source=/data/cinepile split=test max_videos=100

The driver reads the source and checks every row (text only); rows that fail are listed by id
and row number. Questions are grouped by clip; one Ray task per clip, at most
`download.concurrency` at once, fetches it through the URL allow-list, samples its frames and
writes a clip shard (the frames, once) and a question shard (its questions, referring to it).
Every clip's outcome — ok, unavailable, rate-limited, too-large, too-long, invalid-url, corrupt —
goes to `clips` and `coverage` in the manifest, which is rewritten as each clip finishes; a failed
clip never stops the job. A re-run skips finished clips (no request is made for them) and retries
the others; a job killed at any moment and re-run ends with every question of every good clip
exactly once. `--overwrite` rebuilds everything. `--check` reads and checks the source, prints the
resolved config, the clips and questions planned / already done / to fetch, where they go and the
Ray tasks that would fetch them, and downloads and writes nothing.

Exit status: 0 when every row and clip made it, 1 when some were skipped (listed on stderr and in
the manifest), 2 for a user error (bad config, missing source or columns, foreign output_dir).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from mmreason import console, storage
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import ConfigError, load_config, to_dict
from mmreason.data.cinepile import (
    DATASET_NAME,
    CinepileConfig,
    ClipPlan,
    clip_info,
    outcome,
    plan_clips,
    process_clip,
    question_info,
    read_source,
    video_dir,
)
from mmreason.data.download import OK, STATUSES
from mmreason.data.shards import (
    MANIFEST_NAME,
    OutputPlan,
    build_manifest,
    clear_output,
    plan_output,
    summary_table,
    write_json_atomic,
)
from pipelines import map_shards, shard_tasks

SHARD_KEYS = ("path", "task", "split", "clip_id", "rows", "bytes")
PENDING = "pending"


def _process(item: dict[str, Any], cfg: CinepileConfig, root: str) -> dict[str, Any]:
    """Ray Data map function: one clip, start to finish."""
    return process_clip(ClipPlan.from_json(item["plan"]), cfg, root)


def _manifest(cfg: CinepileConfig, plans: list[ClipPlan], outcomes: dict[str, dict], plan_errors: list[dict],
              n_rows: int) -> dict[str, Any]:
    done = [o for o in outcomes.values() if o["status"] == OK]
    failed = [{"id": o["clip_id"], "error": f"{o['status']}: {o['reason']}", "status": o["status"], "url": o["url"],
               "questions": o["questions"]} for o in outcomes.values() if o["status"] not in (OK, PENDING)]
    out = build_manifest(DATASET_NAME, to_dict(cfg), done, len(plans), SHARD_KEYS, plan_errors + failed)
    counts = Counter(o["status"] for o in outcomes.values())
    stored = sum(o["frame_bytes"] for o in done)
    out["coverage"] = {
        "rows_read": n_rows, "rows_rejected": len(plan_errors),
        "clips": len(plans), **{status: counts.get(status, 0) for status in (*STATUSES, PENDING)},
        "questions_planned": sum(len(p.questions) for p in plans),
        "questions_written": sum(o["rows"] for o in done),
    }
    # the frames are stored once per clip; as copies in every question row they would take this much
    out["frame_storage"] = {"clip_shard_bytes": stored,
                            "if_copied_per_question": sum(o["frame_bytes"] * o["rows"] for o in done)}
    out["clip_shards"] = sorted(({"path": o["clip_path"], "clip_id": o["clip_id"], "frames": o["frames"],
                                  "bytes": o["frame_bytes"]} for o in done), key=lambda e: e["path"])
    out["clips"] = {o["clip_id"]: {k: o[k] for k in ("url", "status", "reason", "questions", "attempts", "downloaded")}
                    for o in outcomes.values()}
    return out


@dataclass
class CinepilePlan:
    """What a run would do, found by reading only (`plan`)."""

    rows_read: int
    plans: list[ClipPlan]
    plan_errors: list[dict[str, str]]
    """Source rows that failed their checks."""
    output: OutputPlan
    todo: list[ClipPlan]
    """Clips to fetch: their question or clip shard is not there (or is to be rebuilt)."""


def plan(cfg: CinepileConfig, dry_run: bool = False) -> CinepilePlan:
    """Every check before work: `output_dir` and `download.video_dir`, the source (read and each row
    checked, text only), the clips and their questions, and which are already written (a foreign
    or corrupt shard stops the job here). With `dry_run` nothing is created or written."""
    root = storage.check_location(cfg.output_dir, "output_dir")
    if cfg.download.video_dir and storage.is_remote(storage.check_location(cfg.download.video_dir,
                                                                           "download.video_dir")):
        raise ConfigError(f"download.video_dir: {cfg.download.video_dir!r} must be a local folder (yt-dlp "
                          f"writes the videos there); leave it empty to use this machine's cache")
    table = read_source(cfg.source, cfg.split, cfg.hub_config)  # missing source or columns stop here
    plans, plan_errors = plan_clips(table, cfg)
    planned = {}
    for clip in plans:
        planned[clip.relpath] = question_info(cfg, clip)
        planned[clip.clip_relpath] = clip_info(cfg, clip)
    output = plan_output(root, planned, cfg.overwrite, differs="other source rows, filters or frame sampling",
                         dry_run=dry_run)
    todo = [clip for clip in plans if clip.relpath in output.todo or clip.clip_relpath in output.todo]
    return CinepilePlan(table.num_rows, plans, plan_errors, output, todo)


def check(cfg: CinepileConfig) -> dict[str, Any]:
    """`--check`: `plan` without writing, and what the run would fetch and ask Ray for."""
    work = plan(cfg, dry_run=True)
    summary = work.output.summary({clip.relpath: len(clip.questions) for clip in work.plans})
    return {"config": to_dict(cfg), "source": {"rows_read": work.rows_read, "rows_rejected": len(work.plan_errors)},
            "clips": {"planned": len(work.plans), "done": len(work.plans) - len(work.todo), "to_fetch": len(work.todo)},
            "questions": summary.pop("rows"), **summary, "videos": str(video_dir(cfg, work.output.root)),
            "ray": shard_tasks(len(work.todo), cfg.download.concurrency)}


def run(cfg: CinepileConfig, log=console.echo) -> dict[str, Any]:
    """Build the CinePile dataset `cfg` asks for; returns the manifest (also written to output_dir)."""
    work = plan(cfg)
    clear_output(work.output)
    root, plans, plan_errors, finished = work.output.root, work.plans, work.plan_errors, work.output.finished
    manifest_path = storage.join(root, MANIFEST_NAME)
    todo = work.todo
    pending = {clip.clip_id for clip in todo}
    outcomes: dict[str, dict[str, Any]] = {}
    for clip in plans:
        if clip.clip_id in pending:
            outcomes[clip.clip_id] = outcome(clip, PENDING)
        else:
            outcomes[clip.clip_id] = outcome(clip, OK, path=clip.relpath, clip_path=clip.clip_relpath,
                                             rows=finished[clip.relpath]["rows"],
                                             frame_bytes=storage.size(storage.join(root, clip.clip_relpath)),
                                             frames=finished[clip.clip_relpath].get("frames", 0),
                                             bytes=storage.size(storage.join(root, clip.relpath)))
    write_json_atomic(manifest_path, _manifest(cfg, plans, outcomes, plan_errors, work.rows_read))
    log(f"cinepile: {work.rows_read} rows in {cfg.source} ({cfg.split}), {len(plan_errors)} rejected; "
        f"{sum(len(p.questions) for p in plans)} questions over {len(plans)} clips, {len(plans) - len(todo)} "
        f"clips already done, {len(todo)} to fetch → {root}")
    t0 = time.perf_counter()
    if todo:
        items = [{"plan": clip.to_json()} for clip in todo]
        kwargs = {"cfg": cfg, "root": root}
        for result in map_shards(items, _process, kwargs, concurrency=cfg.download.concurrency, desc="clips"):
            outcomes[result["clip_id"]] = result
            write_json_atomic(manifest_path, _manifest(cfg, plans, outcomes, plan_errors, work.rows_read))
    manifest = _manifest(cfg, plans, outcomes, plan_errors, work.rows_read)
    fresh = [outcomes[p.clip_id] for p in todo]
    manifest["last_run"] = {"clips_tried": len(todo), "clips_ok": sum(o["status"] == OK for o in fresh),
                            "downloaded": sum(o["downloaded"] for o in fresh),
                            "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(manifest_path, manifest)
    return manifest


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("python -m pipelines.cinepile", __doc__, argv, flags=("overwrite",))
    cfg = load_config(CinepileConfig, args.config, args.overrides)
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(cfg.output_dir, "cinepile", args.verbose):
        with console.step("data: cinepile") as step:
            manifest = run(cfg)
            step.done(f"{manifest['total_rows']} rows in {cfg.output_dir}")
        console.echo(summary_table(manifest))
    cov, last = manifest["coverage"], manifest["last_run"]
    print("clips: " + ", ".join(f"{cov[s]} {s}" for s in (*STATUSES, PENDING) if cov[s]) + f" (of {cov['clips']})")
    print(f"{manifest['total_rows']} questions of {cov['questions_planned']} in {cfg.output_dir} "
          f"({last['clips_tried']} clips tried, {last['clips_ok']} ok, {last['downloaded']} downloaded, "
          f"in {last['seconds']:.1f}s)")
    if manifest["errors"]:
        print(f"skipped {len(manifest['errors'])} rows or clips (listed under 'errors' in "
              f"{cfg.output_dir}/{MANIFEST_NAME}):", file=sys.stderr)
        for error in manifest["errors"]:
            print(f"  {error['id']}: {error['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
