"""Maze (MVoT's first task, arXiv 2501.07542): an n×n perfect maze, a start, a path through open
passages, and four candidate cells A–D; the question is which candidate the path ends on.

Walls follow MVoT's `maze_info` layout — the first n² flags say whether each cell is open
downwards, the next n² whether it is open to the right (`T` = open) — so imported MVoT data and
generated data share one representation. The text thoughts first transcribe the layout (start and
where each letter is), then state each move and the cell it leads to; a tiny model learns the
letter lookup only with the transcription (see REFERENCE.md, "Measured here").

With `MazeTask.blocked` > 0 some attempted moves run into a wall or the grid's edge and leave the
agent where it is (`Go up: wall, stay 4.`), so the end cell is no longer start + the sum of the
moves: the walls have to be read (`draw_walk`, and `MazeTask.build` on the candidates).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from mmreason.tasks.base import (
    CELL_NUMBERING,
    DIRECTIONS,
    LETTERS,
    RenderOptions,
    Trajectory,
    cell_number,
    direction_between,
    step_to,
)
from mmreason.tasks.render import AGENT_RGB, INK_RGB, START_RGB, GridCanvas, encode_png

Cell = tuple[int, int]
PATH_RGB = (160, 205, 255)
MAX_WALK_TRIES = 1000  # blocked attempts that cancel out are redrawn; ≤ 1/2 of the draws cancel


@dataclass(frozen=True)
class MazeLayout:
    """Passages of an n×n maze: `down[r*n+c]` (cell open to the one below), `right[r*n+c]`."""

    n: int
    down: tuple[bool, ...]
    right: tuple[bool, ...]

    @classmethod
    def from_maze_info(cls, n: int, maze_info: str) -> "MazeLayout":
        if len(maze_info) != 2 * n * n or set(maze_info) - {"T", "F"}:
            raise ValueError(f"maze_info must be {2 * n * n} characters of T/F for n={n}, got {maze_info!r}")
        flags = tuple(ch == "T" for ch in maze_info)
        return cls(n, flags[: n * n], flags[n * n :])

    @cached_property
    def key(self) -> str:
        """MVoT's `maze_info` string."""
        return "".join("T" if f else "F" for f in self.down + self.right)

    def is_open(self, a: Cell, b: Cell) -> bool:
        """True if a and b are neighbouring cells joined by a passage."""
        (r0, c0), (r1, c1) = sorted((a, b))
        if not (0 <= r0 < self.n and 0 <= c0 < self.n and 0 <= r1 < self.n and 0 <= c1 < self.n):
            return False
        if (r1 - r0, c1 - c0) == (1, 0):
            return self.down[r0 * self.n + c0]
        if (r1 - r0, c1 - c0) == (0, 1):
            return self.right[r0 * self.n + c0]
        return False

    def neighbours(self, cell: Cell) -> list[Cell]:
        r, c = cell
        return [b for b in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if self.is_open(cell, b)]

    def path(self, start: Cell, end: Cell) -> list[Cell]:
        """The path from start to end through open passages (unique in a perfect maze)."""
        parent: dict[Cell, Cell | None] = {start: None}
        queue = deque([start])
        while queue:
            cell = queue.popleft()
            if cell == end:
                break
            for nxt in self.neighbours(cell):
                if nxt not in parent:
                    parent[nxt] = cell
                    queue.append(nxt)
        if end not in parent:
            raise ValueError(f"no path from {start} to {end} in maze {self.key}")
        out = [end]
        while parent[out[-1]] is not None:
            out.append(parent[out[-1]])
        return out[::-1]

    def walls(self, cell: Cell) -> list[str]:
        """The directions in which a move from `cell` hits a wall or leaves the grid."""
        return [d for d in DIRECTIONS if not self.is_open(cell, step_to(cell, d))]

    @cached_property
    def mean_path_length(self) -> float:
        """Mean number of moves between two distinct cells (start and end are such a pair, uniform) of
        a perfect maze: a tree, in which the passage between a subtree of s cells and the rest lies
        on s · (n² − s) of the paths."""
        cells = self.n * self.n
        parent, order = {0: -1}, [0]
        for cell in order:  # grows while it is walked: breadth-first
            for r, c in self.neighbours(divmod(cell, self.n)):
                if r * self.n + c not in parent:
                    parent[r * self.n + c] = cell
                    order.append(r * self.n + c)
        size = dict.fromkeys(order, 1)
        for cell in reversed(order[1:]):
            size[parent[cell]] += size[cell]
        return sum(size[cell] * (cells - size[cell]) for cell in order[1:]) / (cells * (cells - 1) / 2)


def sample_maze(rng: np.random.Generator, n: int) -> MazeLayout:
    """A perfect maze by randomised depth-first search (the `maze-dataset` / MVoT generator)."""
    down = [False] * (n * n)
    right = [False] * (n * n)
    start = (int(rng.integers(n)), int(rng.integers(n)))
    seen = {start}
    stack = [start]
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                   if 0 <= r + dr < n and 0 <= c + dc < n and (r + dr, c + dc) not in seen]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        lo = min((r, c), (nr, nc))
        if nr != r:
            down[lo[0] * n + lo[1]] = True
        else:
            right[lo[0] * n + lo[1]] = True
        seen.add((nr, nc))
        stack.append((nr, nc))
    return MazeLayout(n, tuple(down), tuple(right))


def blocked_counts(layout: MazeLayout, blocked: float) -> dict[int, float]:
    """How many blocked attempts a walk in `layout` gets, with their probabilities.

    On average blocked / (1 - blocked) × the maze's mean path length, rounded down or up at random
    (keeping the mean), whatever the walk's own path length. Over many rows the blocked attempts
    are then `blocked` of all attempts (E[B] / (E[L] + E[B]) = blocked, L the path's moves), and
    short paths get them too: with a count proportional to each path's length, a one-move path at
    blocked=0.3 would have none 57 % of the time, its naive sum the answer.
    """
    if blocked == 0:
        return {0: 1.0}
    mean = blocked / (1 - blocked) * layout.mean_path_length
    low = int(mean)
    return {low: 1 - (mean - low), low + 1: mean - low}


def _walled(layout: MazeLayout, path: list[Cell]) -> list[int]:
    """Indices of the path's cells that have a wall (a crossroads has none to walk into)."""
    return [k for k, cell in enumerate(path) if layout.walls(cell)]


def draw_walk(rng: np.random.Generator, layout: MazeLayout, path: list[Cell], blocked: float) -> list[str]:
    """Every attempted move of a walk along `path`: the path's own moves, and `blocked_counts` blocked
    attempts inserted among them. Each blocked attempt is made at a path cell drawn uniformly among
    those with a wall (the end included, so a walk may end on one) towards one of that cell's walls,
    drawn uniformly; it leaves the agent where it is. Blocked attempts that cancel out (up and down)
    are drawn again, so a walk with one never has its naive cell (`naive_cell`) on the end. With
    blocked=0 it draws nothing from `rng`."""
    moves = [direction_between(a, b) for a, b in zip(path, path[1:])]
    walled = _walled(layout, path)
    if blocked == 0 or not walled:
        return moves
    counts = blocked_counts(layout, blocked)
    low = min(counts)
    count = low + int(rng.random() < counts.get(low + 1, 0.0))
    for _ in range(MAX_WALK_TRIES):
        at: dict[int, list[str]] = {}
        for _ in range(count):
            k = walled[int(rng.integers(len(walled)))]
            walls = layout.walls(path[k])
            at.setdefault(k, []).append(walls[int(rng.integers(len(walls)))])
        if count == 0 or naive_cell((0, 0), [d for ds in at.values() for d in ds]) != (0, 0):
            break
    attempts: list[str] = []
    for k in range(len(path)):
        attempts += at.get(k, [])
        attempts += moves[k : k + 1]
    return attempts


def naive_cell(start: Cell, actions: list[str]) -> Cell:
    """start + the sum of the moves, as if there were no walls (and no edge: it may be off the grid)."""
    return (start[0] + sum(DIRECTIONS[a][0] for a in actions), start[1] + sum(DIRECTIONS[a][1] for a in actions))


def naive_sum_odds(layout: MazeLayout, path: list[Cell], blocked: float) -> tuple[float, float]:
    """Over the walks `draw_walk` can draw along `path`: the probability that the naive cell is the
    end, and that it is a possible distractor (on the grid, neither the start nor the end).

    The naive cell is the end plus the sum of the blocked attempts' steps. Those are independent
    draws of one step distribution (a walled path cell, then one of its walls), so the sum's
    distribution is that step distribution convolved with itself once per attempt, then (the
    redraws of `draw_walk`) conditioned on not being 0 when there is an attempt."""
    walled = _walled(layout, path)
    if blocked == 0 or not walled:
        return 1.0, 0.0
    step = np.zeros((3, 3))  # step[dr + 1, dc + 1]
    for k in walled:
        walls = layout.walls(path[k])
        for d in walls:
            step[DIRECTIONS[d][0] + 1, DIRECTIONS[d][1] + 1] += 1 / (len(walled) * len(walls))
    counts = blocked_counts(layout, blocked)
    top = max(counts)
    offsets = np.zeros((2 * top + 1, 2 * top + 1))  # offsets[dr + top, dc + top]; no wrap-around below
    total = np.zeros_like(offsets)
    offsets[top, top] = 1.0
    for count in range(top + 1):
        if counts.get(count):
            kept = offsets.copy()
            if count:
                kept[top, top] = 0.0
            total += counts[count] * kept / kept.sum()
        offsets = sum(step[i, j] * np.roll(offsets, (i - 1, j - 1), axis=(0, 1))
                      for i in range(3) for j in range(3) if step[i, j])
    (er, ec), start, n = path[-1], path[0], layout.n
    distractor = sum(
        float(total[i, j]) for i, j in zip(*np.nonzero(total))
        if (i, j) != (top, top) and 0 <= er + i - top < n and 0 <= ec + j - top < n
        and (er + i - top, ec + j - top) != start
    )
    return float(total[top, top]), distractor


def walk_cells(path: list[Cell], actions: list[str]) -> list[Cell]:
    """The agent's cell after each attempted move along `path` (start first, each cell a passage away
    from the last): a move towards the path's next cell goes there, any other hits a wall or the edge."""
    cells, k = [], 0
    for action in actions:
        if k + 1 < len(path) and step_to(path[k], action) == path[k + 1]:
            k += 1
        cells.append(path[k])
    if k != len(path) - 1:
        raise ValueError(f"the moves {actions} stop at {path[k]}, short of the path's end {path[-1]}")
    return cells


class MazeRenderer:
    """Frames of one maze: walls, candidate letters and the start ring are drawn once; each frame
    adds the cells visited so far (tinted) and the agent disc."""

    def __init__(self, layout: MazeLayout, start: Cell, candidates: list[Cell], size: int):
        n = layout.n
        self.canvas = canvas = GridCanvas(n, n, size)
        static = canvas.blank()
        for letter, (r, c) in zip(LETTERS, candidates):
            canvas.glyph(static, r, c, letter)
        half = canvas.line
        canvas.ring(static, *start, START_RGB, width=half + 1)
        oy, ox = canvas.origin
        span_y, span_x = oy + n * canvas.cell, ox + n * canvas.cell
        for r in range(n):
            for c in range(n):
                y0, y1, x0, x1 = canvas.box(r, c)
                if r == n - 1 or not layout.down[r * n + c]:
                    static[max(0, y1 - half) : min(size, y1 + half), max(0, x0 - half) : min(size, x1 + half)] = INK_RGB
                if c == n - 1 or not layout.right[r * n + c]:
                    static[max(0, y0 - half) : min(size, y1 + half), max(0, x1 - half) : min(size, x1 + half)] = INK_RGB
        static[oy : oy + half, ox:span_x] = INK_RGB
        static[oy:span_y, ox : ox + half] = INK_RGB
        self.static = static
        self.static_mask = np.any(static != canvas.blank(), axis=-1)
        self.inset = half

    def frame(self, agent: Cell, visited: list[Cell]) -> np.ndarray:
        img = self.canvas.blank()
        for cell in visited:
            self.canvas.fill(img, *cell, PATH_RGB, inset=self.inset)
        img[self.static_mask] = self.static[self.static_mask]
        self.canvas.disc(img, *agent, AGENT_RGB)
        return img


def maze_text(n: int, candidates: list[Cell], path: list[Cell], actions: list[str] | None = None) -> tuple[str, list[str]]:
    """The prompt and text steps of a maze walk along `path` (start first), candidates lettered A–D;
    `actions` are every attempted move (default: the path's own moves), those that do not lead to the
    path's next cell blocked (`walk_cells`).

    Thoughts are terse notes on numbered cells: `Start 0. A 7. B 1. C 6. D 3.` transcribes the
    picture, then `Go down 3 D.` per move (the cell it leads to, and the letter there if any), or
    `Go up: wall, stay 4.` for a blocked one. Each cell is one number so the last step's letter is a
    one-token lookup in the transcription; with `row r, column c` sentences a tiny model read the
    picture and walked the moves but stayed near chance on that lookup (3×3, 50k samples), with
    numbers it reached 79 % at 40k.

    One copy for generated mazes and imported MVoT mazes (`mmreason.data.mvot`), so both read alike.
    """
    start = path[0]
    if actions is None:
        actions = [direction_between(a, b) for a, b in zip(path, path[1:])]
    number = {cell: cell_number(*cell, n) for cell in [*path, *candidates]}
    letter_of = {cell: letter for letter, cell in zip(LETTERS, candidates)}
    layout_text = " ".join(f"{letter} {number[cell]}." for letter, cell in zip(LETTERS, candidates))
    steps = [f"Start {number[start]}. {layout_text}"]
    here = start
    for direction, cell in zip(actions, walk_cells(path, actions)):
        where = f" {letter_of[cell]}" if cell in letter_of else ""
        if cell == here:
            steps.append(f"Go {direction}: wall, stay {number[cell]}{where}.")
        else:
            steps.append(f"Go {direction} {number[cell]}{where}.")
        here = cell
    prompt = (
        f"<image>\n{n}x{n} maze: black lines are walls, the red dot is the agent. {CELL_NUMBERING} "
        f"Moves: {', '.join(actions)}. Which letter does the agent end on?"
    )
    return prompt, steps


@dataclass(frozen=True)
class MazeTask:
    """Which candidate cell does a walk from the start end on. Fields are the task's options.

    Candidates with blocked moves. The naive cell (start + the sum of the attempted moves, walls
    ignored: `naive_cell`) is the end exactly when no attempt was blocked (`draw_walk` redraws
    blocked attempts that cancel out). A reader that ignores the walls and picks the naive cell's
    letter beats chance if the naive cell is the answer more often than a given distractor; one
    that avoids that letter beats chance if it is a distractor more often. Neither does when
    P(naive = answer) = P(naive = a given distractor), so when the naive cell is a cell of the grid
    other than the start and the end, it is one of the three distractors (at a random one of their
    places) with probability min(1, 3 q / e) and otherwise not drawn as one, where, over the walks
    this maze and path can get (`naive_sum_odds`), q is the probability that the naive cell is the
    end and e that it is such a cell. Then P(naive = a given distractor | maze, path)
    = e · min(1, 3 q / e) / 3 = q = P(naive = answer | maze, path) wherever 3 q ≤ e.

    Every walk has a blocked attempt, so q = 0 and the naive cell is never a candidate, once
    blocked / (1 - blocked) × the maze's mean path length ≥ 1 (`blocked_counts`; over 3 000 sampled
    mazes a size, blocked ≥ 0.27 on 3×3, 0.19 on 4×4, 0.15 on 5×5, 0.11 on 6×6). Below that the walks without one (the fewest the share allows)
    have the naive cell as their answer; the balance holds where they are rare enough (3 q ≤ e), and
    a small `blocked` on short paths leaves the naive sum ahead of chance.
    """

    name: ClassVar[str] = "maze"
    sizes: ClassVar[range] = range(3, 7)
    blocked: float = 0.0
    """Share of attempted moves that hit a wall or the grid's edge and leave the agent where it is (< 1)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.blocked < 1.0:
            raise ValueError(f"blocked must be in [0, 1) (a share of the attempted moves; at 1 no move would "
                             f"reach the end), got {self.blocked}")

    def sample_layout(self, rng: np.random.Generator, size: int) -> MazeLayout:
        return sample_maze(rng, size)

    def build(self, rng: np.random.Generator, layout: MazeLayout, opts: RenderOptions) -> Trajectory:
        n = layout.n
        cells = [(r, c) for r in range(n) for c in range(n)]
        start, end = (cells[i] for i in rng.choice(len(cells), size=2, replace=False))
        path = layout.path(start, end)
        actions = draw_walk(rng, layout, path, self.blocked)
        naive = naive_cell(start, actions)  # the end when no move is blocked: no draw below, rows as before
        trap = False
        if naive != end and naive != start and naive in cells:
            at_answer, as_distractor = naive_sum_odds(layout, path, self.blocked)
            trap = bool(rng.random() < min(1.0, 3 * at_answer / as_distractor))
        others = [cell for cell in cells if cell not in (start, end, naive)]
        candidates = [others[i] for i in rng.choice(len(others), size=2 if trap else 3, replace=False)]
        if trap:
            candidates.insert(int(rng.integers(3)), naive)
        answer_index = int(rng.integers(4))
        candidates.insert(answer_index, end)

        renderer = MazeRenderer(layout, start, candidates, opts.image_size)
        images = [encode_png(renderer.frame(start, [start]))]
        step_images = []
        if opts.step_images:
            step_images.append(images[0])  # the transcription step looks at the initial state
            moved = 0
            for cell in walk_cells(path, actions):
                moved += cell != path[moved]  # a blocked attempt's frame shows the agent unmoved
                step_images.append(encode_png(renderer.frame(cell, path[: moved + 1])))

        prompt, steps = maze_text(n, candidates, path, actions)
        return Trajectory(
            prompt=prompt,
            images=images,
            steps=steps,
            step_images=step_images,
            choices=list(LETTERS),
            answer=LETTERS[answer_index],
            meta={
                "maze_info": layout.key,
                "start": list(start),
                "path": [list(cell) for cell in path],  # the cells the agent passes through, start first
                "actions": actions,  # every attempted move in order, blocked ones included
                "candidates": [list(cell) for cell in candidates],
            },
        )
