"""The Ray Data grid-world job, for real on a local Ray: counts, resume, bad input, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from mmreason.config import load_config
from mmreason.data import load_examples, ray_dataset, read_table
from mmreason.data.gridworld import GridworldConfig, plan_shards, split_counts
from mmreason.data.shards import CorruptShardError, read_manifest
from pipelines import gridworld

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

SMALL = ["examples=30", "rows_per_shard=8", "tasks={maze: {sizes: [3, 4]}, frozenlake: {sizes: [4]},"
         " minibehavior: {sizes: [6], examples: 12}}"]


def small_cfg(out: Path, *extra: str) -> GridworldConfig:
    return load_config(GridworldConfig, None, [f"output_dir={out}", *SMALL, *extra])


def expected_total(cfg: GridworldConfig) -> int:
    return sum(len(spec.sizes) * (cfg.examples if spec.examples is None else spec.examples)
               for spec in cfg.tasks.values())


def test_split_counts_are_exact():
    fr = {"train": 0.8, "val": 0.1, "test": 0.1}
    for n in (0, 1, 7, 30, 101):
        counts = split_counts(n, fr)
        assert sum(counts.values()) == n
        assert all(abs(counts[s] - n * fr[s]) < 1 for s in fr)


def test_job_writes_exact_counts_readable_with_and_without_ray(tmp_path, ray_session):
    cfg = small_cfg(tmp_path / "gw")
    manifest = gridworld.run(cfg, log=lambda *_: None)
    assert manifest["complete"] and manifest["errors"] == []
    table = read_table(cfg.output_dir)
    assert table.num_rows == expected_total(cfg) == manifest["total_rows"] == 3 * 30 + 12
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    per = Counter(zip(table.column("task").to_pylist(), table.column("split").to_pylist()))
    assert per[("maze", "train")] == 48 and per[("maze", "test")] == 6 and per[("minibehavior", "val")] == 1
    # splits never share a layout, across the whole dataset
    layouts: dict[str, set] = {}
    for ex in load_examples(cfg.output_dir):
        layouts.setdefault(ex.split, set()).add((ex.task, ex.meta["layout_id"]))
    assert not layouts["train"] & layouts["test"] and not layouts["train"] & layouts["val"]
    tests = load_examples(cfg.output_dir, split="test", task="maze")
    assert len(tests) == 6 and all(e.split == "test" and e.task == "maze" for e in tests)
    assert tests[0].images[0].size == (64, 64) and len(tests[0].step_images) == len(tests[0].steps)
    ds = ray_dataset(cfg.output_dir, split="train", task="frozenlake")
    assert ds.count() == 24
    assert ds.take(1)[0]["task"] == "frozenlake"


def test_rerun_skips_finished_shards_and_overwrite_redoes_them(tmp_path, ray_session):
    cfg = small_cfg(tmp_path / "gw")
    gridworld.run(cfg, log=lambda *_: None)
    first = {p: p.stat().st_mtime_ns for p in Path(cfg.output_dir).rglob("*.parquet")}
    again = gridworld.run(cfg, log=lambda *_: None)
    assert again["last_run"]["rendered_rows"] == 0 and again["total_rows"] == expected_total(cfg)
    assert {p: p.stat().st_mtime_ns for p in first} == first
    redo = gridworld.run(small_cfg(tmp_path / "gw", "overwrite=true"), log=lambda *_: None)
    assert redo["last_run"]["rendered_rows"] == expected_total(cfg)
    assert read_table(cfg.output_dir).num_rows == expected_total(cfg)


def test_corrupt_shard_in_output_dir_is_named(tmp_path, ray_session):
    cfg = small_cfg(tmp_path / "gw")
    gridworld.run(cfg, log=lambda *_: None)
    victim = Path(cfg.output_dir) / plan_shards(cfg)[1].relpath
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CorruptShardError, match=str(victim)):
        gridworld.run(cfg, log=lambda *_: None)
    fixed = gridworld.run(small_cfg(tmp_path / "gw", "overwrite=true"), log=lambda *_: None)
    assert fixed["complete"] and pq.read_metadata(victim).num_rows == 8


def test_shards_of_another_config_are_refused(tmp_path, ray_session):
    cfg = small_cfg(tmp_path / "gw")
    gridworld.run(cfg, log=lambda *_: None)
    with pytest.raises(FileExistsError, match="different config"):
        gridworld.run(small_cfg(tmp_path / "gw", "seed=5"), log=lambda *_: None)
    with pytest.raises(FileExistsError, match="different config"):
        gridworld.run(small_cfg(tmp_path / "gw", "recheck=0.5"), log=lambda *_: None)
    with pytest.raises(FileExistsError, match="different config"):
        gridworld.run(small_cfg(tmp_path / "gw", "restate=0.5"), log=lambda *_: None)
    with pytest.raises(FileExistsError, match="different config"):
        gridworld.run(small_cfg(tmp_path / "gw", "recheck=0.5", "recheck_after_answer=true"), log=lambda *_: None)
    # at 0 they are left out of the shard key, so shards from before the settings existed still match
    same = gridworld.run(small_cfg(tmp_path / "gw", "recheck=0.0", "restate=0.0", "recheck_after_answer=false"),
                         log=lambda *_: None)
    assert same["last_run"]["rendered_rows"] == 0
    with pytest.raises(FileExistsError, match="does not produce"):
        gridworld.run(small_cfg(tmp_path / "gw", "tasks={maze: {sizes: [3]}}"), log=lambda *_: None)


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.gridworld", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["tasks.sudoku.sizes=[3]"], "unknown grid-world task 'sudoku'"),
        (["tasks.maze.sizes=[2]"], "tasks.maze.sizes: grid size 2 out of range 3..6"),
        (["examples=-4"], "examples must be >= 0, got -4"),
        (["no/such/config.yaml"], "config file not found: no/such/config.yaml"),
        (["output_dir=/proc/mmreason-out"], "output dir /proc/mmreason-out is not writable"),
    ],
)
def test_bad_input_exits_2_naming_the_input(args, needle):
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_reports_a_corrupt_shard_by_name(tmp_path, ray_session):
    cfg = small_cfg(tmp_path / "gw")
    gridworld.run(cfg, log=lambda *_: None)
    victim = Path(cfg.output_dir) / plan_shards(cfg)[0].relpath
    victim.write_bytes(b"PAR1 not really parquet")
    done = run_cli(f"output_dir={cfg.output_dir}", *SMALL)
    assert done.returncode == 2 and f"corrupt shard {victim}" in done.stderr


def test_sigkill_mid_run_then_rerun_gives_exactly_the_requested_rows(tmp_path, ray_session):
    out = tmp_path / "gw"
    args = [f"output_dir={out}", "examples=400", "rows_per_shard=20",
            "tasks={maze: {sizes: [3, 4, 5, 6]}, minibehavior: {sizes: [8]}}"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.gridworld", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest_path = out / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest_path.exists() and json.loads(manifest_path.read_text())["total_rows"] >= 100:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed; give it more work"
    finally:
        # SIGKILL the driver and the local Ray it started (its whole session)
        sid = proc.pid
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    p.send_signal(signal.SIGKILL)
            except (ProcessLookupError, psutil.Error):
                pass
        proc.wait(timeout=30)
    partial = read_manifest(out)
    assert 0 < partial["total_rows"] < 2000 and not partial["complete"]

    cfg = load_config(GridworldConfig, None, args)
    manifest = gridworld.run(cfg, log=lambda *_: None)
    assert manifest["complete"]
    assert 0 < manifest["last_run"]["rendered_rows"] < 2000
    table = read_table(out, columns=["id"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 2000
    assert not list(out.rglob(".*tmp-*"))
