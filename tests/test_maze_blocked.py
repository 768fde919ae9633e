"""Maze walks with blocked moves (`MazeTask.blocked`), checked by replaying every row from its
`maze_info`, `start` and `actions` alone: the end, the step texts and frames, the share of blocked
moves, the naive-sum shortcut; and blocked=0 rows exactly as before the option."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from mmreason.config import ConfigError, load_config
from mmreason.data.gridworld import GridworldConfig, build_shard, configured_task, plan_shards, shard_info
from mmreason.data.schema import decode_row
from mmreason.tasks import TASKS, RenderOptions, generate_example
from mmreason.tasks.maze import MazeTask, maze_text
from mmreason.tasks.render import AGENT_RGB, GridCanvas, find_color_cell
from tests.conftest import FRACTIONS, maze_passages

MOVE = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
STEP = re.compile(r"Go (up|down|left|right)(: wall, stay)? (\d+)(?: ([ABCD]))?\.")


def maze_rows(blocked: float, size: int, n: int, seed: int = 0, step_images: bool = False) -> list[dict]:
    opts = RenderOptions(image_size=64 if step_images else 32, step_images=step_images)
    return [generate_example(MazeTask(blocked=blocked), size, "train", i, seed, FRACTIONS, opts) for i in range(n)]


def replay(meta: dict) -> tuple[list[tuple[int, int]], list[bool]]:
    """The agent's cell after each attempted move and whether that move was blocked, from the row's
    maze_info (through the test's own reading of the format), start and actions alone."""
    passages = maze_passages(meta["size"], meta["maze_info"])
    cell, cells, blocked = tuple(meta["start"]), [], []
    for action in meta["actions"]:
        nxt = (cell[0] + MOVE[action][0], cell[1] + MOVE[action][1])
        hit = frozenset({cell, nxt}) not in passages  # a wall, or off the grid (no passage leaves it)
        cell = cell if hit else nxt
        cells.append(cell)
        blocked.append(hit)
    return cells, blocked


def naive(meta: dict) -> list[int]:
    """start + the sum of the attempted moves, walls ignored."""
    r, c = meta["start"]
    return [r + sum(MOVE[a][0] for a in meta["actions"]), c + sum(MOVE[a][1] for a in meta["actions"])]


@pytest.mark.parametrize("blocked", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("size", [3, 4, 5, 6])
def test_replaying_the_attempted_moves_ends_on_the_answer_and_the_steps_say_each_move(size, blocked):
    blocked_moves = 0
    for row in maze_rows(blocked, size, 30):
        meta = json.loads(row["meta"])
        cells, hits = replay(meta)
        candidates = [tuple(c) for c in meta["candidates"]]
        assert cells[-1] == candidates["ABCD".index(row["answer"])], row["id"]
        assert re.search(r"Moves: (.*?)\. Which", row["prompt"]).group(1).split(", ") == meta["actions"]
        # meta.path: the cells the agent passes through, start first
        assert meta["path"] == [meta["start"]] + [list(c) for c, hit in zip(cells, hits) if not hit]
        assert len(row["steps"]) == 1 + len(meta["actions"])
        for text, action, cell, hit in zip(row["steps"][1:], meta["actions"], cells, hits):
            said = STEP.fullmatch(text)
            assert said, f"{row['id']}: {text!r}"
            letter = "ABCD"[candidates.index(cell)] if cell in candidates else None
            assert said.groups() == (action, ": wall, stay" if hit else None, str(cell[0] * size + cell[1]), letter)
        blocked_moves += sum(hits)
    assert (blocked_moves > 0) == (blocked > 0)


@pytest.mark.parametrize("size", [3, 5])
def test_a_blocked_moves_frame_shows_the_agent_unmoved(size):
    canvas = GridCanvas(size, size, 64)
    frames_of_blocked_moves = 0
    for row in maze_rows(0.6, size, 6, step_images=True):
        ex = decode_row(row)
        cells, hits = replay(ex.meta)
        assert len(ex.step_images) == len(ex.steps) == 1 + len(cells)
        assert find_color_cell(ex.step_images[0], AGENT_RGB, canvas) == tuple(ex.meta["start"])
        for image, cell in zip(ex.step_images[1:], cells):
            assert find_color_cell(image, AGENT_RGB, canvas) == cell, ex.id
        frames_of_blocked_moves += sum(hits)
    assert frames_of_blocked_moves >= 10


def test_a_blocked_steps_text():
    candidates = [(2, 2), (0, 1), (2, 0), (1, 0)]
    prompt, steps = maze_text(3, candidates, [(0, 0), (1, 0)], ["up", "left", "down", "down"])
    assert steps == ["Start 0. A 8. B 1. C 6. D 3.", "Go up: wall, stay 0.", "Go left: wall, stay 0.",
                     "Go down 3 D.", "Go down: wall, stay 3 D."]
    assert "Moves: up, left, down, down. Which" in prompt
    assert maze_text(3, candidates, [(0, 0), (1, 0)]) == maze_text(3, candidates, [(0, 0), (1, 0)], ["down"])


@pytest.mark.parametrize("blocked", [0.3, 0.6])
def test_the_share_of_blocked_moves_is_the_option_and_the_naive_sum_never_lands_on_a_candidate(blocked):
    attempted, hit_counts = [], []
    for size in (3, 4, 5, 6):
        for row in maze_rows(blocked, size, 150, seed=1):
            meta = json.loads(row["meta"])
            _, hits = replay(meta)
            attempted.append(len(hits))
            hit_counts.append(sum(hits))
            # every walk has a blocked move here (blocked/(1-blocked) × mean path length ≥ 1), and
            # blocked moves never cancel out: the naive cell is never the answer, so it is never
            # drawn as a distractor either (P(naive = answer) = P(naive = a distractor) = 0)
            assert sum(hits) > 0 and naive(meta) not in meta["candidates"], row["id"]
    t, b = np.array(attempted), np.array(hit_counts)
    share = b.sum() / t.sum()
    se = math.sqrt(((b - share * t) ** 2).sum()) / t.sum()  # standard error of a ratio of sums (delta method)
    assert se < 0.01
    assert abs(share - blocked) <= 4 * se, (share, se)


def test_the_naive_sum_hits_the_answer_no_more_often_than_a_given_distractor():
    # 4×4 at blocked 0.16: blocked/(1-blocked) × mean path length is near 1, so a share of the walks
    # have no blocked move (naive cell = answer) and the naive cell is put among the distractors
    rows = maze_rows(0.16, 4, 2000, seed=2)
    on_answer = on_distractor = 0
    for row in rows:
        meta = json.loads(row["meta"])
        cell, candidates = naive(meta), meta["candidates"]
        answer = candidates["ABCD".index(row["answer"])]
        on_answer += cell == answer
        on_distractor += cell in candidates and cell != answer
    p_answer, p_distractor = on_answer / len(rows), on_distractor / len(rows) / 3
    assert p_answer > 0.02 and p_distractor > 0.02, "the naive cell should be a candidate in some rows here"
    # equal by construction (neither choosing nor avoiding the naive cell's letter beats chance);
    # 3 standard errors of the difference of the two rates
    se = math.sqrt((p_answer + p_distractor) / len(rows))
    assert abs(p_answer - p_distractor) <= 3 * se, (p_answer, p_distractor, se)


def test_blocked_zero_leaves_rows_exactly_as_before_the_option():
    """Digest of 80 rows (text, meta and decoded pixels) computed with the generator before `blocked`
    existed (commit d5e34eb's maze.py)."""
    digest = hashlib.sha256()
    for size in (3, 4, 5, 6):
        for split in ("train", "test"):
            for i in range(10):
                row = generate_example(TASKS["maze"], size, split, i, 7, FRACTIONS, RenderOptions(image_size=32))
                for key in ("id", "prompt", "steps", "answer", "meta"):
                    digest.update(repr(row[key]).encode())
                for png in row["images"] + row["step_images"]:
                    digest.update(np.asarray(Image.open(io.BytesIO(png))).tobytes())
    assert digest.hexdigest() == "3ead18327f9ba96b2b1552dabf83cf69a1af26174160fa42dd08eb8f80ab7d44"


def test_tasks_maze_blocked_reaches_the_generator_and_changes_the_shards_identity():
    cfg = load_config(GridworldConfig, None, ["examples=6", "tasks={maze: {sizes: [3], blocked: 0.3}}",
                                              "image_size=32", "step_images=false"])
    assert configured_task("maze", cfg.tasks["maze"]) == MazeTask(blocked=0.3)
    rows, errors = build_shard(cfg, plan_shards(cfg)[0])
    assert rows and not errors
    assert all(any(replay(json.loads(r["meta"]))[1]) for r in rows)
    plain = load_config(GridworldConfig, None, ["examples=6", "tasks={maze: {sizes: [3]}}",
                                                "image_size=32", "step_images=false"])
    assert configured_task("maze", plain.tasks["maze"]) is TASKS["maze"]
    spec = plan_shards(cfg)[0]
    assert shard_info(cfg, spec)["config_hash"] != shard_info(plain, spec)["config_hash"]


@pytest.mark.parametrize("override, needle", [
    ("tasks.maze.blocked=1", r"tasks\.maze\.blocked must be in \[0, 1\).*got 1\.0"),
    ("tasks.maze.blocked=-0.2", r"tasks\.maze\.blocked must be in \[0, 1\).*got -0\.2"),
    ("tasks.frozenlake.blocked=0.3", r"tasks\.frozenlake\.blocked: frozenlake has no such option"),
])
def test_bad_blocked_values_name_the_setting(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(GridworldConfig, None, [override])
