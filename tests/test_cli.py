from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmreason.cli import main
from mmreason.cli_args import parse_job_args

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The two commands the README opens with (its first code block)."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_tests_after_the_same_setup():
    commands = readme_commands()
    assert len(commands) == 2
    setup, _, last = commands[0].rpartition(" && ")
    assert "pip install torch==2.13.0" in setup and last == "mmreason quickstart"
    assert "pytest" in commands[1]
    ci = (REPO / ".ci/run").read_text()
    assert setup + "\n" in ci and commands[1] in ci  # the quickstart's full flow: tests/test_quickstart.py


def test_job_args_split_config_overrides_and_flags():
    args = parse_job_args("x", None, ["c.yaml", "a.b=1", "--overwrite"], flags=("overwrite",))
    assert args.config == "c.yaml" and args.overrides == ["a.b=1", "overwrite=true"]
    assert parse_job_args("x", None, ["a=1"]).config is None
    with pytest.raises(SystemExit):
        parse_job_args("x", None, ["a=1", "stray"])


def test_console_script_dispatches_and_reports_unknown_commands(capsys):
    assert main(["nonsense"]) == 2
    assert "mmreason data gridworld" in capsys.readouterr().err
    assert main(["data", "gridworld", "examples=-1"]) == 2
    assert "examples must be >= 0" in capsys.readouterr().err


def test_console_script_is_installed():
    done = subprocess.run([Path(sys.executable).parent / "mmreason", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "mmreason quickstart" in done.stdout
    assert "  mmreason train CONFIG [key=value ...] [--check]" in done.stdout.splitlines()


def test_mmreason_train_is_python_m_jobs_train(maze_data, tmp_path, capsys):
    """`mmreason train CONFIG … --check` prints what `python -m jobs.train CONFIG … --check` prints."""
    from jobs import train

    args = [str(REPO / "configs/train/cot-maze.yaml"), f"data.path={maze_data}", f"storage={tmp_path / 'runs'}",
            "run_name=c", "--check"]
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out
    assert train.main(args) == 0
    assert capsys.readouterr().out == printed
    assert "run_name: c" in printed and printed.rstrip().endswith("nothing was started")
    assert not (tmp_path / "runs").exists()
    assert main(["train", "optim.epochs=1"]) == 2  # no config: named, as python -m jobs.train does
    assert "give a stage config, e.g. configs/train/cot-maze.yaml" in capsys.readouterr().err
