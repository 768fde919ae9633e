"""Maze (MVoT's first task, arXiv 2501.07542): an n×n perfect maze, a start, a path through open
passages, and four candidate cells A–D; the question is which candidate the path ends on.

Walls follow MVoT's `maze_info` layout — the first n² flags say whether each cell is open
downwards, the next n² whether it is open to the right (`T` = open) — so imported MVoT data and
generated data share one representation. The text thoughts first transcribe the layout (start and
where each letter is), then state each move and the cell it leads to; a tiny model learns the
letter lookup only with the transcription (see REFERENCE.md, "Measured here").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from mmreason.tasks.base import CELL_NUMBERING, LETTERS, RenderOptions, Trajectory, cell_number, direction_between
from mmreason.tasks.render import AGENT_RGB, INK_RGB, START_RGB, GridCanvas, encode_png

Cell = tuple[int, int]
PATH_RGB = (160, 205, 255)


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


def maze_text(n: int, candidates: list[Cell], path: list[Cell]) -> tuple[str, list[str]]:
    """The prompt and text steps of a maze walk along `path` (start first), candidates lettered A–D.

    Thoughts are terse notes on numbered cells: `Start 0. A 7. B 1. C 6. D 3.` transcribes the
    picture, then `Go down 3 D.` per move (the cell it leads to, and the letter there if any). Each
    cell is one number so the last step's letter is a one-token lookup in the transcription; with
    `row r, column c` sentences a tiny model read the picture and walked the moves but stayed near
    chance on that lookup (3×3, 50k samples), with numbers it reached 79 % at 40k.

    One copy for generated mazes and imported MVoT mazes (`mmreason.data.mvot`), so both read alike.
    """
    start = path[0]
    number = {cell: cell_number(*cell, n) for cell in [*path, *candidates]}
    letter_of = {cell: letter for letter, cell in zip(LETTERS, candidates)}
    moves = [direction_between(a, b) for a, b in zip(path, path[1:])]
    layout_text = " ".join(f"{letter} {number[cell]}." for letter, cell in zip(LETTERS, candidates))
    steps = [f"Start {number[start]}. {layout_text}"]
    for direction, cell in zip(moves, path[1:]):
        where = f" {letter_of[cell]}" if cell in letter_of else ""
        steps.append(f"Go {direction} {number[cell]}{where}.")
    prompt = (
        f"<image>\n{n}x{n} maze: black lines are walls, the red dot is the agent. {CELL_NUMBERING} "
        f"Moves: {', '.join(moves)}. Which letter does the agent end on?"
    )
    return prompt, steps


class MazeTask:
    name = "maze"
    sizes = range(3, 7)

    def sample_layout(self, rng: np.random.Generator, size: int) -> MazeLayout:
        return sample_maze(rng, size)

    def build(self, rng: np.random.Generator, layout: MazeLayout, opts: RenderOptions) -> Trajectory:
        n = layout.n
        cells = [(r, c) for r in range(n) for c in range(n)]
        start, end = (cells[i] for i in rng.choice(len(cells), size=2, replace=False))
        path = layout.path(start, end)
        others = [cell for cell in cells if cell not in (start, end)]
        candidates = [others[i] for i in rng.choice(len(others), size=3, replace=False)]
        answer_index = int(rng.integers(4))
        candidates.insert(answer_index, end)
        moves = [direction_between(a, b) for a, b in zip(path, path[1:])]

        renderer = MazeRenderer(layout, start, candidates, opts.image_size)
        images = [encode_png(renderer.frame(start, [start]))]
        step_images = []
        if opts.step_images:
            step_images.append(images[0])  # the transcription step looks at the initial state
            step_images += [encode_png(renderer.frame(cell, path[: k + 2])) for k, cell in enumerate(path[1:])]

        prompt, steps = maze_text(n, candidates, path)
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
                "path": [list(cell) for cell in path],
                "actions": moves,
                "candidates": [list(cell) for cell in candidates],
            },
        )
