"""Grid-world generators: checked against the task rules, gymnasium, and the pixels of each frame."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

from mmreason.data.schema import decode_row, validate_row
from mmreason.tasks import TASKS, RenderOptions, answer_sentence, generate_example, layout_split, parse_answer
from mmreason.tasks.base import AFTER_ANSWER, after_answer
from mmreason.tasks.render import AGENT_RGB, GridCanvas, find_color_cell
from tests.conftest import FRACTIONS, maze_passages

OPTS = RenderOptions(image_size=64, step_images=True)
MOVE = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
AT = re.compile(r"(?:(?:Now|still) at cell |^Go \w+ )(\d+)")  # FrozenLake/MiniBehavior; maze notes


def rows(task: str, size: int, n: int, split: str = "train", seed: int = 0, opts: RenderOptions = OPTS):
    return [generate_example(TASKS[task], size, split, i, seed, FRACTIONS, opts) for i in range(n)]


def grid_dims(task: str, meta: dict) -> int:
    return meta["room"] if task == "minibehavior" else meta["size"]


def test_same_seed_and_index_give_the_same_row_and_other_indices_differ():
    for task, size in (("maze", 5), ("frozenlake", 4), ("minibehavior", 8)):
        a = generate_example(TASKS[task], size, "train", 3, 11, FRACTIONS, OPTS)
        b = generate_example(TASKS[task], size, "train", 3, 11, FRACTIONS, OPTS)
        c = generate_example(TASKS[task], size, "train", 4, 11, FRACTIONS, OPTS)
        assert a == b
        assert (a["prompt"], a["meta"]) != (c["prompt"], c["meta"])


@pytest.mark.parametrize("size", [3, 4, 5, 6])
def test_maze_paths_cross_only_open_passages_and_end_on_the_answer_cell(size):
    for row in rows("maze", size, 40):
        meta = json.loads(row["meta"])
        edges = maze_passages(size, meta["maze_info"])
        cells = {(r, c) for r in range(size) for c in range(size)}
        assert all(cell in cells for edge in edges for cell in edge), "a passage leaves the grid"
        # a perfect maze: a spanning tree of the grid
        assert len(edges) == size * size - 1
        reach, frontier = {(0, 0)}, [(0, 0)]
        while frontier:
            cell = frontier.pop()
            for edge in edges:
                if cell in edge:
                    (other,) = edge - {cell}
                    if other not in reach:
                        reach.add(other)
                        frontier.append(other)
        assert reach == cells
        path = [tuple(p) for p in meta["path"]]
        assert path[0] == tuple(meta["start"]) and len(path) >= 2
        for a, b in zip(path, path[1:]):
            assert frozenset({a, b}) in edges, f"{row['id']}: step {a}->{b} crosses a wall"
        # the moves in the prompt replay the path
        moves = re.search(r"Moves: (.*?)\. Which", row["prompt"]).group(1).split(", ")
        cell = path[0]
        for move in moves:
            cell = (cell[0] + MOVE[move][0], cell[1] + MOVE[move][1])
        assert cell == path[-1]
        candidates = [tuple(c) for c in meta["candidates"]]
        assert len(set(candidates)) == 4 and tuple(meta["start"]) not in candidates
        assert candidates["ABCD".index(row["answer"])] == path[-1]


def test_maze_transcription_names_every_letter_where_it_is():
    row = rows("maze", 4, 1)[0]
    meta = json.loads(row["meta"])
    start = meta["start"]
    assert row["steps"][0].startswith(f"Start {start[0] * 4 + start[1]}.")
    for letter, (r, c) in zip("ABCD", meta["candidates"]):
        assert f" {letter} {r * 4 + c}." in row["steps"][0]


@pytest.mark.parametrize("task, size", [("maze", 3), ("maze", 6), ("frozenlake", 4), ("frozenlake", 7),
                                        ("minibehavior", 8), ("minibehavior", 6)])
def test_each_step_image_shows_the_agent_where_the_step_text_says(task, size):
    for row in rows(task, size, 15):
        validate_row(row)
        ex = decode_row(row)
        n = grid_dims(task, ex.meta)
        canvas = GridCanvas(n, n, 64)
        start = tuple(ex.meta["start"])
        assert find_color_cell(ex.images[0], AGENT_RGB, canvas) == start
        assert len(ex.step_images) == len(ex.steps)
        assert find_color_cell(ex.step_images[0], AGENT_RGB, canvas) == start
        want = start
        for text, image in zip(ex.steps[1:], ex.step_images[1:]):
            said = AT.search(text)
            if said:  # pick up / put down name no cell: the agent stays where it was
                want = divmod(int(said.group(1)), n)
            assert find_color_cell(image, AGENT_RGB, canvas) == want, f"{ex.id}: {text}"


def test_step_images_can_be_switched_off_and_rendered_large():
    row = generate_example(TASKS["maze"], 4, "train", 0, 0, FRACTIONS, RenderOptions(image_size=256, step_images=False))
    ex = decode_row(row)
    assert ex.step_images == [] and ex.images[0].size == (256, 256)


def test_frozenlake_answers_equal_gymnasiums_outcome():
    outcome_letter = {"goal": "A", "hole": "B", "safe": "C"}
    for size in (3, 4, 5, 6):
        for row in rows("frozenlake", size, 30):
            meta = json.loads(row["meta"])
            env = FrozenLakeEnv(desc=meta["desc"], is_slippery=False)
            state, _ = env.reset(seed=0)
            assert divmod(state, size) == tuple(meta["start"])
            outcome = "safe"
            for k, action in enumerate(meta["gym_actions"]):
                state, reward, terminated, _, _ = env.step(action)
                assert list(divmod(state, size)) == meta["positions"][k]
                if terminated:
                    assert k == len(meta["gym_actions"]) - 1, "moves continue after the episode ended"
                    outcome = "goal" if reward > 0 else "hole"
            assert row["answer"] == outcome_letter[outcome]
            goal = [(r, c) for r, line in enumerate(meta["desc"]) for c, ch in enumerate(line) if ch == "G"]
            assert goal == [tuple(meta["goal"])]


def simulate_room(meta: dict) -> list[tuple[tuple[int, int], str]]:
    """An independent reading of the MiniBehavior rules, to check MiniGrid's results against."""
    n, table = meta["room"], tuple(meta["table"])
    agent, facing = tuple(meta["start"]), "right"
    printer, where = tuple(meta["printer"]), "floor"
    out = []
    for action in meta["actions"]:
        front = (agent[0] + MOVE[facing][0], agent[1] + MOVE[facing][1])
        if action in MOVE:
            facing = action
            nxt = (agent[0] + MOVE[action][0], agent[1] + MOVE[action][1])
            wall = nxt[0] in (0, n - 1) or nxt[1] in (0, n - 1)
            if not wall and nxt != table and not (where == "floor" and nxt == printer):
                agent = nxt
        elif action == "pickup" and where in ("floor", "table"):
            if (where == "floor" and front == printer) or (where == "table" and front == table):
                where = "carried"
        elif action == "drop" and where == "carried":
            if front == table:
                where = "table"
            elif not (front[0] in (0, n - 1) or front[1] in (0, n - 1)):
                where, printer = "floor", front
        out.append((agent, where))
    return out


def test_minibehavior_final_state_matches_an_independent_simulation():
    letters = {"carried": "A", "table": "B", "floor": "C"}
    for size in (6, 8, 10):
        for row in rows("minibehavior", size, 40):
            meta = json.loads(row["meta"])
            states = simulate_room(meta)
            assert [list(a) for a, _ in states] == meta["positions"]
            assert [w == "carried" for _, w in states] == meta["carrying"]
            assert row["answer"] == letters[states[-1][1]]
            for text, (_, where) in zip(row["steps"][1:], states):
                assert text.endswith(f"Carrying objects: {'printer' if where == 'carried' else 'none'}.")


@pytest.mark.parametrize("task, size", [("maze", 3), ("maze", 5), ("frozenlake", 4), ("minibehavior", 8)])
def test_no_answer_letter_above_40_percent(task, size):
    counts = Counter(row["answer"] for row in rows(task, size, 300))
    assert max(counts.values()) / 300 <= 0.40, counts
    assert len(counts) == (4 if task == "maze" else 3)


def test_train_and_test_never_share_a_layout():
    # 3×3 mazes have only 192 layouts, so any leak would show
    for task, size in (("maze", 3), ("frozenlake", 3), ("minibehavior", 5)):
        train = {json.loads(r["meta"])["layout_id"] for r in rows(task, size, 300, "train")}
        test = {json.loads(r["meta"])["layout_id"] for r in rows(task, size, 60, "test")}
        val = {json.loads(r["meta"])["layout_id"] for r in rows(task, size, 60, "val")}
        assert train and test and val
        assert not train & test and not train & val and not val & test


def test_layout_split_ignores_the_seed_and_follows_the_fractions():
    keys = [f"layout-{i}" for i in range(4000)]
    got = Counter(layout_split("maze", k, FRACTIONS) for k in keys)
    assert abs(got["train"] / 4000 - 0.8) < 0.03 and abs(got["test"] / 4000 - 0.1) < 0.02
    assert layout_split("maze", "x", {"train": 0.0, "val": 0.0, "test": 1.0}) == "test"


def test_answer_sentence_round_trips_through_the_regex():
    assert parse_answer("Go up. Now at row 0, column 0. " + answer_sentence("C")) == "C"
    assert parse_answer("no answer here") is None


def test_grid_size_out_of_range_and_tiny_images_are_errors():
    with pytest.raises(ValueError, match="grid size 9 out of range 3..6"):
        generate_example(TASKS["maze"], 9, "train", 0, 0, FRACTIONS, OPTS)
    with pytest.raises(ValueError, match="image_size 20 is too small"):
        generate_example(TASKS["minibehavior"], 8, "train", 0, 0, FRACTIONS, RenderOptions(image_size=20))


def test_canvas_locates_cells_of_drawn_discs():
    canvas = GridCanvas(5, 5, 64)
    img = canvas.blank()
    canvas.disc(img, 3, 1, AGENT_RGB)
    assert find_color_cell(img, AGENT_RGB, canvas) == (3, 1)
    assert find_color_cell(np.zeros((64, 64, 3), np.uint8), AGENT_RGB, canvas) is None


def test_frozenlake_start_boxed_in_by_holes_and_the_goal_still_builds():
    """A start whose every neighbour is a hole or the goal has no safe walk: the "safe" target
    falls back to a hole (found at row frozenlake-n3-train-s0-000381 of a 1 500-row job)."""
    from mmreason.tasks.frozenlake import LakeMap, plan_moves, simulate

    lake = LakeMap(("FHF", "HSH", "FGF"))
    for seed in range(20):
        for target in ("goal", "hole", "safe"):
            moves = plan_moves(np.random.default_rng(seed), lake, target)
            assert moves, target
            _, outcome = simulate(lake, moves)
            assert outcome == ("goal" if target == "goal" else "hole"), (target, moves)
    generate_example(TASKS["frozenlake"], 3, "train", 381, 0, {"train": 0.8, "val": 0.1, "test": 0.1},
                     RenderOptions(step_images=False))


def test_recheck_appends_a_restatement_to_its_share_of_examples_and_changes_nothing_else():
    """`recheck` adds one closing step that restates every earlier step (its state image repeats
    the last one) to about that share of examples; the rest of each row is the row without it."""
    for task, size in (("maze", 3), ("frozenlake", 4), ("minibehavior", 8)):
        plain = rows(task, size, 60)
        verbose = rows(task, size, 60, opts=RenderOptions(image_size=64, step_images=True, recheck=0.5))
        checked = 0
        for a, b in zip(plain, verbose):
            meta_a, meta_b = json.loads(a["meta"]), json.loads(b["meta"])
            assert meta_b.pop("recheck") == (len(b["steps"]) == len(a["steps"]) + 1)
            assert meta_a == meta_b and b["prompt"] == a["prompt"] and b["answer"] == a["answer"]
            assert b["steps"][: len(a["steps"])] == a["steps"] and b["images"] == a["images"]
            if len(b["steps"]) > len(a["steps"]):
                checked += 1
                assert b["steps"][-1] == "Check: " + " ".join(a["steps"])
                assert b["step_images"] == [*a["step_images"], a["step_images"][-1]]
            validate_row(b)
        assert 15 <= checked <= 45, (task, checked)
    assert all(len(r["steps"]) == len(p["steps"]) for r, p in zip(
        rows("maze", 3, 20, opts=RenderOptions(recheck=0.0)), rows("maze", 3, 20)))


def test_recheck_after_answer_moves_the_same_recheck_behind_the_answer_and_leaves_steps_alone():
    """With `recheck_after_answer` the very rows that `recheck` re-checks hold that re-check in meta
    `after_answer` instead of as a last step; steps, images and answer are the plain row's."""
    for task, size in (("maze", 3), ("minibehavior", 8)):
        plain = rows(task, size, 40)
        last_step = rows(task, size, 40, opts=RenderOptions(image_size=64, step_images=True, recheck=0.5))
        after = rows(task, size, 40, opts=RenderOptions(image_size=64, step_images=True, recheck=0.5,
                                                         recheck_after_answer=True))
        moved = 0
        for a, b, c in zip(plain, last_step, after):
            meta_b, meta_c = json.loads(b["meta"]), json.loads(c["meta"])
            assert meta_c["recheck"] == meta_b["recheck"]
            assert c["steps"] == a["steps"] and c["step_images"] == a["step_images"] and c["answer"] == a["answer"]
            if meta_c.pop("recheck"):
                moved += 1
                assert after_answer(c) == meta_c.pop(AFTER_ANSWER) == b["steps"][-1] == "Check: " + " ".join(a["steps"])
                assert "The answer is" not in after_answer(c)  # it cannot change what the reply answers
            else:
                assert after_answer(c) == "" and AFTER_ANSWER not in meta_c
            assert meta_c == json.loads(a["meta"])
            validate_row(c)
        assert 10 <= moved <= 30, (task, moved)


def test_restate_follows_every_step_with_a_verbatim_recheck_in_its_share_of_examples():
    for task, size in (("maze", 3), ("frozenlake", 4), ("minibehavior", 8)):
        plain = rows(task, size, 60)
        verbose = rows(task, size, 60, opts=RenderOptions(image_size=64, step_images=True, restate=0.5))
        both = rows(task, size, 60, opts=RenderOptions(image_size=64, step_images=True, recheck=0.5, restate=0.5))
        checked = 0
        for a, b, c in zip(plain, verbose, both):
            meta_a, meta_b = json.loads(a["meta"]), json.loads(b["meta"])
            if meta_b.pop("restate"):
                checked += 1
                assert b["steps"] == [f"{s} Check: {s}" for s in a["steps"]]
            else:
                assert b["steps"] == a["steps"]
            assert meta_a == meta_b and b["step_images"] == a["step_images"] and b["answer"] == a["answer"]
            meta_c = json.loads(c["meta"])  # with both: the re-check step is drawn first, then restated
            recheck = [*a["steps"], "Check: " + " ".join(a["steps"])] if meta_c["recheck"] else a["steps"]
            assert c["steps"] == ([f"{s} Check: {s}" for s in recheck] if meta_c["restate"] else recheck)
            validate_row(b)
        assert 15 <= checked <= 45, (task, checked)
