"""MVoT raw data → example schema, on the real sample MVoT released (shared/data/mvot): every
trajectory imported once, answers and paths checked independently of the importer (maze walls
from maze_info, FrozenLake outcomes from gymnasium), frames byte-identical and in step order, and
bad records named and skipped — in plain Python and through the Ray Data job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

from mmreason.cli import main as cli_main
from mmreason.config import load_config
from mmreason.data import load_examples, ray_dataset, read_table
from mmreason.data.mvot import MvotImportConfig, MvotSource, import_mvot
from mmreason.data.schema import validate_row
from mmreason.data.shards import SourceError, read_manifest
from mmreason.tasks import TASKS, RenderOptions, generate_example, layout_split
from pipelines import mvot_import
from tests.conftest import FRACTIONS, maze_passages

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "mvot" / "data_samples.zip"
MAZE_JSON = "data_samples/maze/grid3.json"
LAKE_JSON = "data_samples/frozenlake/level3/data.json"
MOVE = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
GYM_MOVE = {0: "left", 1: "down", 2: "right", 3: "up"}
EXEC_LETTER = {"success": "A", "terminated": "B", "truncated": "C"}

pytestmark = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"MVoT sample not found at {SAMPLE}")


def members() -> dict[str, bytes]:
    with zipfile.ZipFile(SAMPLE) as zf:
        return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


def maze_records() -> list[dict]:
    return json.loads(members()[MAZE_JSON])


def lake_env() -> dict:
    (env,) = json.loads(members()[LAKE_JSON]).values()
    return env


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


def gym_walk(desc: str, actions: list[int]) -> tuple[list[int], str | None]:
    """States visited and how the episode ended, from gymnasium's FrozenLakeEnv alone."""
    n = int(len(desc) ** 0.5)
    env = FrozenLakeEnv(desc=[desc[r * n : (r + 1) * n] for r in range(n)], is_slippery=False)
    state, _ = env.reset(seed=0)
    states, ended = [int(state)], None
    for action in actions:
        state, reward, terminated, _, _ = env.step(action)
        states.append(int(state))
        if terminated:
            ended = "goal" if reward > 0 else "hole"
    return states, ended


@pytest.fixture(scope="module")
def sample_rows() -> list[dict]:
    rows, errors = import_mvot(SAMPLE, FRACTIONS)
    assert errors == []
    return rows


@pytest.fixture
def extracted(tmp_path) -> Path:
    with zipfile.ZipFile(SAMPLE) as zf:
        zf.extractall(tmp_path / "mvot")
    return tmp_path / "mvot"


def test_one_row_per_trajectory_from_the_zip_and_from_the_extracted_folder(sample_rows, extracted):
    want = {f"mvot-maze-grid3-path{rec['path_id']}" for rec in maze_records()}
    want |= {f"mvot-frozenlake-level3-env0-traj{i}" for i in range(len(lake_env()["actions"]))}
    assert len(want) == 6 + 12
    assert sorted(row["id"] for row in sample_rows) == sorted(want)
    assert Counter(row["task"] for row in sample_rows) == {"maze": 6, "frozenlake": 12}
    for row in sample_rows:
        validate_row(row)
    folder_rows, errors = import_mvot(extracted, FRACTIONS)
    assert errors == [] and by_id(folder_rows) == by_id(sample_rows)


def test_maze_answers_and_paths_agree_with_maze_info(sample_rows):
    rows = by_id(sample_rows)
    for rec in maze_records():
        row = rows[f"mvot-maze-grid3-path{rec['path_id']}"]
        n, path = rec["grid_num"], [tuple(c) for c in rec["path_locs"]]
        edges = maze_passages(n, rec["maze_info"])
        for a, b in zip(path, path[1:]):
            assert frozenset({a, b}) in edges, f"{row['id']}: {a}->{b} crosses a wall"
        candidates = [tuple(c) for c in rec["candidate_locs"]]
        assert row["answer"] == "ABCD"[candidates.index(path[-1])]
        assert row["choices"] == list("ABCD")
        # the prompt's moves replay the path; each step states the cell it reaches
        moves = re.search(r"Moves: (.*?)\. Which", row["prompt"]).group(1).split(", ")
        assert moves == [a.split("-")[0] for a in rec["action_list"]]
        cell = path[0]
        assert row["steps"][0].startswith(f"Start {cell[0] * n + cell[1]}.")
        for move, text, want in zip(moves, row["steps"][1:], path[1:]):
            cell = (cell[0] + MOVE[move][0], cell[1] + MOVE[move][1])
            assert cell == want and text.startswith(f"Go {move} {cell[0] * n + cell[1]}")
        assert len(row["steps"]) == len(path)
        meta = json.loads(row["meta"])
        assert meta["maze_info"] == rec["maze_info"] and meta["path"] == rec["path_locs"]
        assert row["split"] == layout_split("maze", rec["maze_info"], FRACTIONS)


def test_frames_are_the_original_bytes_in_step_order(sample_rows):
    files = members()
    rows = by_id(sample_rows)
    for rec in maze_records():
        row = rows[f"mvot-maze-grid3-path{rec['path_id']}"]
        frames = [files[f"data_samples/{rec['file_prefix']}_{k}.jpg"] for k in range(1, len(rec["path_locs"]) + 1)]
        assert row["images"] == [frames[0]] and row["step_images"] == frames
    env = lake_env()
    for i, data_id in enumerate(env["data_id"]):
        row = rows[f"mvot-frozenlake-level3-env0-traj{i}"]
        frames = [files[f"data_samples/frozenlake/level3/{data_id}/{k}.png"] for k in range(len(env["states"][i]))]
        extra = len(env["additional_actions"][i])
        assert row["images"] == [frames[0]]
        assert row["step_images"] == frames + [frames[-1]] * extra
        assert len(row["step_images"]) == len(row["steps"])


def test_frozenlake_answers_agree_with_gymnasium_and_show_the_additional_actions(sample_rows):
    env = lake_env()
    rows = by_id(sample_rows)
    seen_extra = 0
    for i, actions in enumerate(env["actions"]):
        row = rows[f"mvot-frozenlake-level3-env0-traj{i}"]
        states, ended = gym_walk(env["env_desc"], actions)
        assert states == env["states"][i]
        assert row["answer"] == {"goal": "A", "hole": "B", None: "C"}[ended] == EXEC_LETTER[env["exec_states"][i]]
        extra = env["additional_actions"][i]
        shown = ", ".join(f"go {GYM_MOVE[a]}" for a in actions + extra)
        assert f"The agent moves: {shown}. What happens?" in row["prompt"]
        assert len(row["steps"]) == 1 + len(actions) + len(extra)
        for text in row["steps"][1 + len(actions) :]:
            assert text.endswith(f"nothing changes; still at cell {states[-1]}.")  # gymnasium's state is the cell number
        seen_extra += len(extra)
        assert row["split"] == layout_split("frozenlake", "FHF/HFG/FSF", FRACTIONS)
    assert seen_extra == 3  # the sample's one walk with moves after it ended


def test_imported_text_reads_like_generated_text(sample_rows):
    """Same template as the generator, apart from the moves (and, for FrozenLake, the sentence that
    says how gymnasium's frames draw agent, goal and holes)."""
    moves = re.compile(r"[Mm]oves: .*?\. ")
    generated = {t: generate_example(TASKS[t], 3, "train", 0, 0, FRACTIONS, RenderOptions())
                 for t in ("maze", "frozenlake")}
    for row in sample_rows:
        gen = generated[row["task"]]
        if row["task"] == "maze":
            assert moves.sub("", row["prompt"]) == moves.sub("", gen["prompt"])
        else:
            legend = re.compile(r"seen from above\. .*? A move")
            assert legend.sub("", moves.sub("", row["prompt"])) == legend.sub("", moves.sub("", gen["prompt"]))
            assert "elf" in row["prompt"] and "red dot" not in row["prompt"]
        assert row["choices"] == gen["choices"]
        step = re.compile(r"^Go (up|down|left|right) \d+( [ABCD])?\.$" if row["task"] == "maze"
                          else r"^Go (up|down|left|right)\. (Now at|The edge blocks|The walk is over)")
        assert all(step.match(text) for text in row["steps"][1:]), row["steps"]


def corrupt(folder: Path) -> None:
    """Delete one frame of maze path 1; close the wall path 3 walks through (right of row 0, column 1)."""
    (folder / "data_samples/maze/grid3/path_1_3.jpg").unlink()
    records = json.loads((folder / MAZE_JSON).read_text())
    rec = next(r for r in records if r["path_id"] == 3)
    assert rec["path_locs"][:2] == [[0, 1], [0, 2]]
    info = list(rec["maze_info"])
    info[9 + 0 * 3 + 1] = "F"
    rec["maze_info"] = "".join(info)
    (folder / MAZE_JSON).write_text(json.dumps(records))


def test_a_corrupted_copy_imports_the_rest_and_names_the_two_bad_records(extracted):
    corrupt(extracted)
    rows, errors = import_mvot(extracted, FRACTIONS)
    assert len(rows) == 16 and "mvot-maze-grid3-path1" not in by_id(rows) and "mvot-maze-grid3-path3" not in by_id(rows)
    reasons = {e["id"]: e["error"] for e in errors}
    assert set(reasons) == {"mvot-maze-grid3-path1", "mvot-maze-grid3-path3"}
    assert "data_samples/maze/grid3/path_1_3.jpg is missing" in reasons["mvot-maze-grid3-path1"]
    assert "from (0, 1) to (0, 2) crosses a wall" in reasons["mvot-maze-grid3-path3"]


def edit_maze(folder: Path, path_id: int, **fields) -> None:
    records = json.loads((folder / MAZE_JSON).read_text())
    next(r for r in records if r["path_id"] == path_id).update(fields)
    (folder / MAZE_JSON).write_text(json.dumps(records))


def edit_lake(folder: Path, traj: int | None, **fields) -> None:
    """Set trajectory `traj`'s entry of each named list (traj None: replace the whole list)."""
    data = json.loads((folder / LAKE_JSON).read_text())
    for name, value in fields.items():
        if traj is None:
            data["0"][name] = value
        else:
            data["0"][name][traj] = value
    (folder / LAKE_JSON).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, bad_id, needle",
    [
        (lambda d: edit_maze(d, 0, action_list=["down-1", "left-1", "left-1", "up-1", "left-1"]),
         "mvot-maze-grid3-path0", "action_list move 5 says left but path_locs goes up"),
        (lambda d: edit_maze(d, 0, action_list=["down-1", "left-1"]),
         "mvot-maze-grid3-path0", "action_list has 2 moves but path_locs has 5"),
        (lambda d: edit_maze(d, 3, action_list=["right-1", "down-2"]),
         "mvot-maze-grid3-path3", "action_list has more moves than path_locs (2)"),
        (lambda d: edit_maze(d, 2, candidate_locs=[[0, 0], [0, 1], [2, 1], [2, 2]]),
         "mvot-maze-grid3-path2", "none of candidate_locs"),
        (lambda d: edit_maze(d, 4, maze_info="TFTX"),
         "mvot-maze-grid3-path4", "maze_info must be 18 characters"),
        (lambda d: edit_maze(d, 5, path_locs=[[2, 2], [1, 2], [0, 2], [0, 1], [1, 1], [9, 1]]),
         "mvot-maze-grid3-path5", "outside the 3x3 grid"),
        (lambda d: edit_lake(d, 1, states=[7, 8, 7, 6, 7, 4, 4]),
         "mvot-frozenlake-level3-env0-traj1", "gymnasium says (1, 2)"),
        (lambda d: edit_lake(d, 3, exec_states="success"),
         "mvot-frozenlake-level3-env0-traj3", "gymnasium's outcome is 'hole'"),
        (lambda d: edit_lake(d, 5, exec_states=["terminated"]),
         "mvot-frozenlake-level3-env0-traj5", "exec_states[5] is ['terminated'], not one of success"),
        (lambda d: (d / MAZE_JSON).write_text(json.dumps(["oops"] + json.loads((d / MAZE_JSON).read_text())[1:])),
         f"{MAZE_JSON}[0]", "a path must be a JSON object, got str"),
        (lambda d: edit_lake(d, 2, actions=[3, 2, 2], states=[7, 4, 5, 5]),
         "mvot-frozenlake-level3-env0-traj2", "gymnasium ends the walk after action 2"),
        (lambda d: edit_lake(d, 9, additional_actions=[1]),
         "mvot-frozenlake-level3-env0-traj9", "follow a walk that did not end"),
        (lambda d: (d / "data_samples/frozenlake/level3/4/2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"),
         "mvot-frozenlake-level3-env0-traj4", "frame data_samples/frozenlake/level3/4/2.png is unreadable"),
    ],
)
def test_each_bad_record_is_named_and_only_it_is_skipped(extracted, edit, bad_id, needle):
    edit(extracted)
    rows, errors = import_mvot(extracted, FRACTIONS)
    assert [e["id"] for e in errors] == [bad_id] and needle in errors[0]["error"], errors
    assert len(rows) == 17 and bad_id not in by_id(rows)


def test_a_malformed_environment_is_reported_once_by_its_id(extracted):
    edit_lake(extracted, None, exec_states=["success"])
    rows, errors = import_mvot(extracted, FRACTIONS)
    assert [e["id"] for e in errors] == ["mvot-frozenlake-level3-env0"]
    assert "per-trajectory lists differ in length" in errors[0]["error"]
    assert {row["task"] for row in rows} == {"maze"}


def test_missing_or_empty_sources_are_errors_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"MVoT source {tmp_path / 'nope.zip'} does not exist"):
        import_mvot(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text("{}")
    with pytest.raises(SourceError, match=f"no MVoT maze or frozenlake files in {tmp_path / 'empty'}"):
        import_mvot(tmp_path / "empty")
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match=f"MVoT source {tmp_path / 'fake.zip'} is neither"):
        MvotSource(tmp_path / "fake.zip")


def test_both_maze_file_names_and_the_grid_folder_fallback_are_read(extracted, tmp_path):
    # MVoT's full layout: maze-datasets/grid3_paths.json with frames in maze-datasets/grid3/
    full = tmp_path / "full" / "maze-datasets"
    full.mkdir(parents=True)
    (extracted / "data_samples/maze/grid3").rename(full / "grid3")
    (extracted / MAZE_JSON).rename(full / "grid3_paths.json")
    rows, errors = import_mvot(tmp_path / "full", FRACTIONS)
    assert errors == [] and len(rows) == 6
    assert json.loads(rows[0]["meta"])["frames"][0].startswith("maze-datasets/grid3/path_")


def test_cli_reports_a_missing_path_with_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such.zip"
    assert cli_main(["data", "import-mvot", str(missing), f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"MVoT source {missing} does not exist" in capsys.readouterr().err
    assert cli_main(["nonsense"]) == 2
    assert "mmreason data import-mvot PATH [CONFIG]" in capsys.readouterr().err


@pytest.mark.integration
def test_job_imports_the_zip_readable_with_and_without_ray_and_resumes(tmp_path, ray_session):
    out = tmp_path / "mvot"
    cfg = load_config(MvotImportConfig, None, [f"source={SAMPLE}", f"output_dir={out}", "rows_per_shard=4"])
    manifest = mvot_import.run(cfg, log=lambda *_: None)
    assert manifest["complete"] and manifest["errors"] == [] and manifest["total_rows"] == 18
    assert manifest["sources"] == [LAKE_JSON, MAZE_JSON]
    assert all(re.fullmatch(r"(train|val|test)/(maze|frozenlake)-mvot-n3-\d{4}\.parquet", s["path"])
               for s in manifest["shards"])
    assert read_table(out).num_rows == 18
    rows, _ = import_mvot(SAMPLE, FRACTIONS)
    for split in ("train", "val", "test"):
        for task in ("maze", "frozenlake"):
            got = load_examples(out, split=split, task=task)
            want = [r for r in rows if r["split"] == split and r["task"] == task]
            assert sorted(e.id for e in got) == sorted(r["id"] for r in want)
            assert all(e.split == split and e.task == task and len(e.step_images) == len(e.steps) for e in got)
    assert ray_dataset(out, split="train", task="frozenlake").count() == 12
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = mvot_import.run(cfg, log=lambda *_: None)
    assert again["last_run"]["imported_rows"] == 0 and again["total_rows"] == 18
    assert {p: p.stat().st_mtime_ns for p in first} == first
    with pytest.raises(FileExistsError, match="shards this config does not produce"):
        mvot_import.run(load_config(MvotImportConfig, None, [f"source={SAMPLE}", f"output_dir={out}",
                                                             "splits.val=0.5"]), log=lambda *_: None)


@pytest.mark.integration
def test_changed_input_is_refused_until_overwrite(extracted, tmp_path, ray_session):
    out = tmp_path / "mvot"
    cfg = load_config(MvotImportConfig, None, [f"source={extracted}", f"output_dir={out}"])
    mvot_import.run(cfg, log=lambda *_: None)
    edit_lake(extracted, 0, additional_actions=[1])  # the first walk ends at the goal; one more move shown
    with pytest.raises(FileExistsError, match="frozenlake-mvot-n3-0000.parquet was written by a different config"):
        mvot_import.run(cfg, log=lambda *_: None)
    redo = mvot_import.run(load_config(MvotImportConfig, None, [f"source={extracted}", f"output_dir={out}",
                                                                "overwrite=true"]), log=lambda *_: None)
    assert redo["complete"] and redo["total_rows"] == 18
    (walk,) = [e for e in load_examples(out, task="frozenlake") if e.id == "mvot-frozenlake-level3-env0-traj0"]
    assert walk.prompt.count("go ") == 3 and walk.steps[-1].startswith("Go down. The walk is over")


@pytest.mark.integration
def test_job_on_a_corrupted_folder_exits_1_and_lists_the_skipped_records(extracted, tmp_path):
    corrupt(extracted)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipelines.mvot_import", str(extracted), f"output_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "skipped 2 records" in done.stderr
    assert "mvot-maze-grid3-path1: frame data_samples/maze/grid3/path_1_3.jpg is missing" in done.stderr
    assert ("mvot-maze-grid3-path3: path_locs move 1 from (0, 1) to (0, 2) crosses a wall"
            in done.stderr)
    assert re.search(r"maze\s+\d+\s+\d+\s+\d+", done.stdout) and "16 rows in" in done.stdout
    manifest = read_manifest(out)
    assert not manifest["complete"] and manifest["total_rows"] == 16
    assert sorted(e["id"] for e in manifest["errors"]) == ["mvot-maze-grid3-path1", "mvot-maze-grid3-path3"]
    assert len(load_examples(out, task="maze")) == 4


@pytest.mark.integration
def test_imported_rows_train_and_evaluate_through_the_same_stage_as_generated_rows(tmp_path, ray_session, monkeypatch):
    from jobs.train import run_stage
    from mmreason.train.config import TrainConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "mvot"
    mvot_import.run(load_config(MvotImportConfig, None, [f"source={SAMPLE}", f"output_dir={out}"]),
                    log=lambda *_: None)
    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        f"data.path={out}", f"storage={tmp_path / 'runs'}", "run_name=mvot", "data.tasks=[maze, frozenlake]",
        "data.eval_split=train", "optim.batch_size=4", "optim.epochs=1", "eval.max_examples=null",
        "eval.modes={cot: {max_new_tokens: 8}}"])
    result = run_stage(cfg)
    assert result["train"]["train_rows"] == 15 and result["train"]["steps_per_epoch"] == 1
    assert result["eval"]["cot"]["n"] == 15
    preds = [json.loads(line) for line in (cfg.run_dir / "eval" / "predictions-cot.jsonl").read_text().splitlines()]
    assert {p["id"] for p in preds} == {r["id"] for r in import_mvot(SAMPLE, FRACTIONS)[0] if r["split"] == "train"}
