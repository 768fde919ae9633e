"""FrozenLake (MVoT's second task): a gymnasium `FrozenLake-v1` map with the start and goal at
random cells, and a sequence of moves; the question is what happens — A the agent reaches the
goal, B it falls into a hole, C it stays safe without reaching the goal.

The outcome and every intermediate position come from gymnasium's own `step` (non-slippery), not
from our code; the sampler only aims at a class (uniformly, so classes are balanced) by planning
moves on the map, and the label is whatever gymnasium says happened.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

from mmreason.tasks.base import CELL_NUMBERING, DIRECTIONS, RenderOptions, Trajectory, cell_text, lettered, move_text
from mmreason.tasks.render import AGENT_RGB, INK_RGB, START_RGB, GridCanvas, encode_png

Cell = tuple[int, int]
# gymnasium's action ids
GYM_ACTION = {"left": 0, "down": 1, "right": 2, "up": 3}
HOLE_PROB = 0.25
ICE_RGB = (205, 232, 248)
TRAIL_RGB = (150, 196, 232)
HOLE_RGB = (25, 45, 95)
GOAL_RGB = (250, 205, 60)
CHOICES = [
    "The agent reaches the goal.",
    "The agent falls into a hole.",
    "The agent stays safe but does not reach the goal.",
]
OUTCOMES = ("goal", "hole", "safe")
# What the prompt says the picture shows: our renderer's, and gymnasium's own `rgb_array` frames
# (the ones MVoT's FrozenLake data holds), so an imported prompt does not describe a red dot it lacks.
LAKE_LEGEND = "The agent starts at the red dot; G is the goal and dark cells are holes."
GYM_LAKE_LEGEND = "The agent is the elf and starts on the stool; the present is the goal and blue pits are holes."


@dataclass(frozen=True)
class LakeMap:
    """A FrozenLake `desc`: rows of S (start), F (frozen), H (hole), G (goal)."""

    desc: tuple[str, ...]

    @property
    def key(self) -> str:
        return "/".join(self.desc)

    @property
    def n(self) -> int:
        return len(self.desc)

    def at(self, cell: Cell) -> str:
        return self.desc[cell[0]][cell[1]]

    def find(self, letter: str) -> list[Cell]:
        return [(r, c) for r, row in enumerate(self.desc) for c, ch in enumerate(row) if ch == letter]

    @cached_property
    def start(self) -> Cell:
        return self.find("S")[0]

    @cached_property
    def goal(self) -> Cell:
        return self.find("G")[0]

    def move(self, cell: Cell, direction: str) -> Cell:
        """FrozenLake's move: one cell, clamped at the edge."""
        dr, dc = DIRECTIONS[direction]
        return min(max(cell[0] + dr, 0), self.n - 1), min(max(cell[1] + dc, 0), self.n - 1)

    def safe(self, cell: Cell) -> bool:
        return self.at(cell) in "SF"

    def route(self, src: Cell, accept) -> list[str] | None:
        """Shortest moves from src over safe cells to the first cell where `accept(cell)` holds."""
        parent: dict[Cell, tuple[Cell, str] | None] = {src: None}
        queue = deque([src])
        while queue:
            cell = queue.popleft()
            if accept(cell):
                moves = []
                while parent[cell] is not None:
                    cell, direction = parent[cell]
                    moves.append(direction)
                return moves[::-1]
            if cell != src and not self.safe(cell):
                continue
            for direction in DIRECTIONS:
                nxt = self.move(cell, direction)
                if nxt not in parent:
                    parent[nxt] = (cell, direction)
                    queue.append(nxt)
        return None


def sample_lake(rng: np.random.Generator, n: int) -> LakeMap:
    """A random map: start and goal at random distinct cells, holes with probability 0.25, the goal
    reachable from the start and at least one hole reachable (so every outcome is possible)."""
    while True:
        grid = np.where(rng.random((n, n)) < HOLE_PROB, "H", "F").astype("<U1")
        s, g = rng.choice(n * n, size=2, replace=False)
        grid[divmod(int(s), n)] = "S"
        grid[divmod(int(g), n)] = "G"
        lake = LakeMap(tuple("".join(row) for row in grid))
        if lake.route(lake.start, lambda c: c == lake.goal) and lake.route(lake.start, lambda c: lake.at(c) == "H"):
            return lake


def _safe_walk(rng: np.random.Generator, lake: LakeMap, cell: Cell, length: int) -> tuple[list[str], Cell]:
    """Random moves that never enter a hole or the goal (bumping the edge is allowed); shorter
    than `length` where every move from a cell is into a hole or the goal."""
    moves = []
    for _ in range(length):
        options = [d for d in DIRECTIONS if lake.safe(lake.move(cell, d))]
        if not options:
            break
        direction = options[int(rng.integers(len(options)))]
        moves.append(direction)
        cell = lake.move(cell, direction)
    return moves, cell


def plan_moves(rng: np.random.Generator, lake: LakeMap, target: str) -> list[str]:
    """Moves aimed at outcome `target`; gymnasium decides the outcome actually reached."""
    if target == "safe":
        walk = _safe_walk(rng, lake, lake.start, int(rng.integers(1, 2 * lake.n + 1)))[0]
        if walk:
            return walk
        target = "hole"  # the start is boxed in by holes and the goal: no safe walk exists
    detour, cell = _safe_walk(rng, lake, lake.start, int(rng.integers(0, 3)))
    if target == "goal":
        tail = lake.route(cell, lambda c: c == lake.goal)
    else:
        tail = lake.route(cell, lambda c: lake.at(c) == "H")
    return detour + (tail or [])


def simulate(lake: LakeMap, moves: list[str]) -> tuple[list[Cell], str]:
    """Run the moves in gymnasium's FrozenLakeEnv; positions after each move and the outcome."""
    env = FrozenLakeEnv(desc=list(lake.desc), is_slippery=False)
    env.reset(seed=0)
    positions = []
    outcome = "safe"
    for direction in moves:
        state, reward, terminated, _, _ = env.step(GYM_ACTION[direction])
        positions.append(divmod(int(state), lake.n))
        if terminated:
            outcome = "goal" if reward > 0 else "hole"
            break
    return positions, outcome


class LakeRenderer:
    def __init__(self, lake: LakeMap, size: int):
        self.canvas = canvas = GridCanvas(lake.n, lake.n, size)
        self.inset = 1 if canvas.cell >= 8 else 0
        base = canvas.blank()
        for r in range(lake.n):
            for c in range(lake.n):
                color = {"H": HOLE_RGB, "G": GOAL_RGB}.get(lake.at((r, c)), ICE_RGB)
                canvas.fill(base, r, c, color, inset=self.inset)
        canvas.glyph(base, *lake.goal, "G", INK_RGB)
        self.base = base
        self.lake = lake

    def frame(self, agent: Cell, visited: list[Cell]) -> np.ndarray:
        img = self.base.copy()
        for cell in visited:
            if self.lake.at(cell) in "SF":
                self.canvas.fill(img, *cell, TRAIL_RGB, inset=self.inset)
        self.canvas.ring(img, *self.lake.start, START_RGB, width=self.canvas.line + 1)
        self.canvas.disc(img, *agent, AGENT_RGB)
        return img


def lake_text(
    lake: LakeMap,
    moves: list[str],
    positions: list[Cell],
    after_end: Sequence[str] = (),
    legend: str = LAKE_LEGEND,
) -> tuple[str, list[str]]:
    """The prompt and text steps of a walk on `lake`: `positions[i]` is where move i leads (from
    gymnasium); `after_end` are moves shown after the walk ended, each changing nothing.

    One copy for generated lakes and imported MVoT lakes (`mmreason.data.mvot`), so both read alike;
    `legend` says how the picture draws agent, goal and holes.
    """
    holes = lake.find("H")
    hole_text = f"The holes are at {'; '.join(cell_text(*h, lake.n) for h in holes)}." if holes else "There are no holes."
    steps = [f"The agent starts at {cell_text(*lake.start, lake.n)}. The goal is at {cell_text(*lake.goal, lake.n)}. {hole_text}"]
    cell = lake.start
    for direction, nxt in zip(moves, positions):
        if nxt == cell:
            steps.append(f"{move_text(direction)} The edge blocks the move; still at {cell_text(*nxt, lake.n)}.")
        else:
            what = {"H": ", which is a hole", "G": ", which is the goal"}.get(lake.at(nxt), "")
            steps.append(f"{move_text(direction)} Now at {cell_text(*nxt, lake.n)}{what}.")
        cell = nxt
    for direction in after_end:
        steps.append(f"{move_text(direction)} The walk is over, so nothing changes; still at {cell_text(*cell, lake.n)}.")
    shown = list(moves) + list(after_end)
    prompt = (
        f"<image>\nThis is a {lake.n}x{lake.n} frozen lake seen from above. {legend} A move into the edge "
        f"leaves the agent where it is, and the walk ends at the goal or in a hole. {CELL_NUMBERING} "
        f"The agent moves: {', '.join(f'go {d}' for d in shown)}. What happens? "
        f"{lettered(CHOICES)}"
    )
    return prompt, steps


class FrozenLakeTask:
    name = "frozenlake"
    sizes = range(3, 9)

    def sample_layout(self, rng: np.random.Generator, size: int) -> LakeMap:
        return sample_lake(rng, size)

    def build(self, rng: np.random.Generator, lake: LakeMap, opts: RenderOptions) -> Trajectory:
        target = OUTCOMES[int(rng.integers(3))]
        moves = plan_moves(rng, lake, target)
        positions, outcome = simulate(lake, moves)
        moves = moves[: len(positions)]  # gymnasium ended the episode here

        renderer = LakeRenderer(lake, opts.image_size)
        images = [encode_png(renderer.frame(lake.start, [lake.start]))]
        step_images = []
        if opts.step_images:
            step_images.append(images[0])
            trail = [lake.start]
            for cell in positions:
                trail.append(cell)
                step_images.append(encode_png(renderer.frame(cell, trail)))

        prompt, steps = lake_text(lake, moves, positions)
        return Trajectory(
            prompt=prompt,
            images=images,
            steps=steps,
            step_images=step_images,
            choices=list(CHOICES),
            answer="ABC"[OUTCOMES.index(outcome)],
            meta={
                "desc": list(lake.desc),
                "start": list(lake.start),
                "goal": list(lake.goal),
                "actions": moves,
                "gym_actions": [GYM_ACTION[d] for d in moves],
                "positions": [list(p) for p in positions],
                "outcome": outcome,
            },
        )
