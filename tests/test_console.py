"""The jobs' console (`mmreason.console`): steps, progress bars and results on the terminal; Ray's,
Ray Data's and the workers' output in the run's log file; `-v` for the full stream; errors as one
line plus the log path. The training job's console (its epoch bar from Ray Train's reports, the
workers' lines in the log only) is checked by tests/test_train_job.py's cot stage test, which
starts its stage through `mmreason train`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmreason import console
from mmreason.cli_args import job_main
from mmreason.data.gridworld import GridworldConfig, plan_shards
from mmreason.config import load_config

REPO = Path(__file__).resolve().parents[1]
DATA = ["examples=30", "rows_per_shard=8", "tasks={maze: {sizes: [3]}}"]
MAX_LINES = 15
"""What `mmreason data gridworld` may print for a 5-shard dataset (log path, step, ≤ 5 bar lines,
the done line, the 2-line table)."""
RAY_DATA_LINE = "Execution plan of Dataset"
"""A line Ray Data writes on the driver (its logger) when the job's dataset starts."""


def test_progress_prints_a_bounded_number_of_lines_off_a_tty(capsys):
    bar = console.progress(100, "items")
    for i in range(100):
        bar.update(1, loss=1.0 / (i + 1))
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= console.NON_TTY_LINES + 1
    assert "items 100/100" in lines[-1] and "loss 0.01" in lines[-1] and "in " in lines[-1]
    assert "ETA" in lines[0]


def test_an_unexpected_error_in_a_session_is_one_line_and_the_log_has_the_traceback(tmp_path, capsys):
    @job_main
    def main() -> int:
        with console.session(tmp_path, "boom"):
            console.echo("working")
            raise RuntimeError("worker died\nwith a long story")

    assert main() == 1
    err = capsys.readouterr().err
    log = console.last_log()
    assert err.splitlines()[0] == "error: RuntimeError: worker died"
    assert str(log) in err and "Traceback" not in err
    assert log.parent == tmp_path / console.LOG_DIR
    assert "Traceback" in log.read_text() and "with a long story" in log.read_text()


def run_gridworld(*args: str, address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address}  # the tests' Ray: no cluster start per run
    return subprocess.run([sys.executable, "-m", "pipelines.gridworld", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_data_job_is_quiet_logs_the_rest_and_fails_in_one_line(tmp_path, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "gw"
    done = run_gridworld(f"output_dir={out}", *DATA, address=address)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) <= MAX_LINES and not done.stderr.strip(), done.stdout + done.stderr
    logs = list((out / console.LOG_DIR).glob("gridworld-*.log"))
    assert len(logs) == 1 and lines[0].startswith(f"log: {logs[0]}")
    assert lines[1] == "[1/1] data: gridworld"
    assert re.fullmatch(r"  shards 5/5 \[#+\]  in \d+s", lines[-4])
    assert re.fullmatch(r"\[1/1\] data: gridworld: done in \d+s — 30 rows in .*", lines[-3])
    assert lines[-2].split() == ["task", "train", "val", "test"] and lines[-1].split() == ["maze", "24", "3", "3"]
    log = logs[0].read_text()
    assert RAY_DATA_LINE in log and RAY_DATA_LINE not in done.stdout
    assert "[1/1] data: gridworld: done" in log  # the console's lines, between the ones they explain

    # a bad input found inside the session: one line, the log path, no traceback
    cfg = load_config(GridworldConfig, None, [f"output_dir={out}", *DATA])
    victim = out / plan_shards(cfg)[0].relpath
    victim.write_bytes(b"PAR1 not really parquet")
    bad = run_gridworld(f"output_dir={out}", *DATA, address=address)
    assert bad.returncode == 2
    err = bad.stderr.splitlines()
    assert err[0].startswith(f"error: corrupt shard {victim}") and "Traceback" not in bad.stderr
    assert len(err) == 2 and err[1].startswith("  log (traceback, Ray and worker output): ")
    assert Path(err[1].split(": ", 1)[1]).is_file()

    # -v: the full stream, Ray Data's lines included, as before
    loud = run_gridworld(f"output_dir={out}", *DATA, "--overwrite", "-v", address=address)
    assert loud.returncode == 0, loud.stderr
    assert RAY_DATA_LINE in loud.stdout + loud.stderr
    assert "[1/1] data: gridworld: done" in loud.stdout


