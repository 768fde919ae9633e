"""MiniBehavior InstallingAPrinter (MVoT's third task) on MiniGrid: a walled room with a printer
and a table; the agent moves in absolute directions, picks up and puts down. The question asks
where the printer is after the actions — A carried by the agent, B on the table, C on the floor —
which only simulating the actions answers: a pick-up works only facing the printer, a put-down
puts the printer on whatever the agent faces (the table, the floor, or nothing for a wall).

States and outcomes come from MiniGrid's own `step` (a `MiniGridEnv` with a table and a printer
object); absolute moves are "turn to face the direction, then forward", as in MiniBehavior.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from minigrid.core.actions import Actions
from minigrid.core.constants import IDX_TO_OBJECT, OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import WorldObj
from minigrid.minigrid_env import MiniGridEnv

from mmreason.tasks.base import CELL_NUMBERING, DIRECTIONS, RenderOptions, Trajectory, cell_text, lettered, move_text, step_to
from mmreason.tasks.render import AGENT_RGB, START_RGB, GridCanvas, encode_png

Cell = tuple[int, int]  # (row, col); MiniGrid positions are (x=col, y=row)
MINIGRID_DIR = {"right": 0, "down": 1, "left": 2, "up": 3}
ACTION_TEXT = {"pickup": "Pick up.", "drop": "Put down.", **{d: move_text(d) for d in DIRECTIONS}}
CHOICES = ["The agent is carrying the printer.", "The printer is on the table.", "The printer is on the floor."]
OUTCOMES = ("carried", "table", "floor")
WALL_RGB = (110, 110, 110)
FLOOR_RGB = (238, 238, 238)
TABLE_RGB = (150, 100, 50)
PRINTER_RGB = (110, 40, 190)

# MiniGrid identifies object types by name; register ours once (MiniBehavior adds its own the same way).
for _name in ("printer", "table"):
    if _name not in OBJECT_TO_IDX:
        OBJECT_TO_IDX[_name] = max(OBJECT_TO_IDX.values()) + 1
        IDX_TO_OBJECT[OBJECT_TO_IDX[_name]] = _name


class Printer(WorldObj):
    def __init__(self) -> None:
        super().__init__("printer", "purple")

    def can_pickup(self) -> bool:
        return True


class Table(WorldObj):
    """Holds at most one object in `contains`; the agent cannot walk onto it."""

    def __init__(self) -> None:
        super().__init__("table", "yellow")

    def can_contain(self) -> bool:
        return True


class InstallingAPrinterEnv(MiniGridEnv):
    """An n×n room (walls included) with one table and one printer."""

    def __init__(self, size: int, table: Cell, printer: Cell, start: Cell):
        self._layout = (table, printer, start)
        super().__init__(
            mission_space=MissionSpace(mission_func=lambda: "put the printer on the table"),
            grid_size=size,
            max_steps=10_000,
            see_through_walls=True,
        )
        self.table = Table()
        self.printer = Printer()

    def _gen_grid(self, width: int, height: int) -> None:
        table, printer, start = self._layout
        self.grid = Grid(width, height)
        self.grid.wall_rect(0, 0, width, height)
        self.put_obj(self.table, table[1], table[0])
        self.put_obj(self.printer, printer[1], printer[0])
        self.agent_pos = (start[1], start[0])
        self.agent_dir = MINIGRID_DIR["right"]

    @property
    def agent_cell(self) -> Cell:
        return int(self.agent_pos[1]), int(self.agent_pos[0])

    def front(self) -> WorldObj | None:
        return self.grid.get(*self.front_pos)

    def act(self, action: str) -> None:
        """One absolute action: a direction, `pickup` or `drop` (the table takes and gives objects)."""
        front = self.front()
        if action in MINIGRID_DIR:
            self.agent_dir = MINIGRID_DIR[action]
            self.step(Actions.forward)
        elif action == "pickup" and isinstance(front, Table) and front.contains and self.carrying is None:
            self.carrying, front.contains = front.contains, None
            self.step(Actions.done)
        elif action == "drop" and isinstance(front, Table) and front.contains is None and self.carrying:
            front.contains, self.carrying = self.carrying, None
            self.step(Actions.done)
        elif action in ("pickup", "drop"):
            self.step(Actions.pickup if action == "pickup" else Actions.drop)
        else:
            raise ValueError(f"unknown MiniBehavior action {action!r}")

    def printer_state(self) -> tuple[str, Cell | None]:
        if self.carrying is self.printer:
            return "carried", None
        if self.table.contains is self.printer:
            return "table", None
        x, y = self.printer.cur_pos
        return "floor", (int(y), int(x))


@dataclass(frozen=True)
class Room:
    size: int
    table: Cell
    printer: Cell

    @property
    def key(self) -> str:
        return f"{self.size}:table={self.table}:printer={self.printer}"

    def interior(self) -> list[Cell]:
        return [(r, c) for r in range(1, self.size - 1) for c in range(1, self.size - 1)]


def _route_to_face(start: Cell, target: Cell, blocked: set[Cell], room: Room) -> list[str] | None:
    """Moves that bring the agent next to `target` and end facing it (the last move bumps into it)."""
    free = set(room.interior()) - blocked
    parent: dict[Cell, tuple[Cell, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for direction in DIRECTIONS:
            if step_to(cell, direction) == target:
                moves = [direction]
                while parent[cell] is not None:
                    cell, d = parent[cell]
                    moves.append(d)
                return moves[::-1]
        for direction in DIRECTIONS:
            nxt = step_to(cell, direction)
            if nxt in free and nxt not in parent:
                parent[nxt] = (cell, direction)
                queue.append(nxt)
    return None


def _random_moves(rng: np.random.Generator, k: int) -> list[str]:
    names = list(DIRECTIONS)
    return [names[i] for i in rng.integers(len(names), size=k)]


class MiniBehaviorTask:
    name = "minibehavior"
    sizes = range(5, 11)

    def sample_layout(self, rng: np.random.Generator, size: int) -> Room:
        inner = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1)]
        table, printer = (inner[i] for i in rng.choice(len(inner), size=2, replace=False))
        return Room(size, table, printer)

    def _plan(self, rng: np.random.Generator, room: Room, start: Cell, target: str) -> list[str]:
        """Actions aimed at `target`, planned on a fresh env so routes account for where things are."""
        env = InstallingAPrinterEnv(room.size, room.table, room.printer, start)
        env.reset(seed=0)
        actions: list[str] = []

        def run(moves: list[str]) -> None:
            for a in moves:
                env.act(a)
            actions.extend(moves)

        def go_face(target_cell: Cell) -> None:
            state, printer_cell = env.printer_state()
            blocked = {room.table} | ({printer_cell} if printer_cell else set())
            run(_route_to_face(env.agent_cell, target_cell, blocked, room) or [])

        run(_random_moves(rng, int(rng.integers(0, 3))))
        if target == "floor" and rng.random() < 0.5:
            # never pick it up: wander, and try a pick-up that faces something else
            run(_random_moves(rng, int(rng.integers(1, 4))))
            run(["pickup"] + _random_moves(rng, int(rng.integers(0, 3))))
            return actions
        go_face(room.printer)
        run(["pickup"])
        run(_random_moves(rng, int(rng.integers(0, 3))))
        if target == "table":
            go_face(room.table)
            run(["drop"])
        elif target == "floor":
            run(_random_moves(rng, 1) + ["drop"])
        run(_random_moves(rng, int(rng.integers(0, 2))))
        return actions

    def build(self, rng: np.random.Generator, room: Room, opts: RenderOptions) -> Trajectory:
        free = [cell for cell in room.interior() if cell not in (room.table, room.printer)]
        start = free[int(rng.integers(len(free)))]
        target = OUTCOMES[int(rng.integers(3))]
        for _ in range(20):  # aim again when the plan missed (e.g. a put-down facing a wall)
            actions = self._plan(rng, room, start, target)
            env = InstallingAPrinterEnv(room.size, room.table, room.printer, start)
            env.reset(seed=0)
            states = []
            for action in actions:
                env.act(action)
                states.append((env.agent_cell, env.printer_state()))
            if states and states[-1][1][0] == target:
                break

        renderer = RoomRenderer(room, start, opts.image_size)
        images = [encode_png(renderer.frame(start, ("floor", room.printer)))]
        step_images = []
        if opts.step_images:
            step_images.append(images[0])
            step_images += [encode_png(renderer.frame(cell, printer)) for cell, printer in states]

        steps = [
            f"The agent starts at {cell_text(*start, room.size)}, facing right. The printer is at "
            f"{cell_text(*room.printer, room.size)}. The table is at {cell_text(*room.table, room.size)}. Carrying objects: none."
        ]
        prev_cell, prev_printer = start, ("floor", room.printer)
        for action, (cell, printer) in zip(actions, states):
            carrying = "printer" if printer[0] == "carried" else "none"
            if action in DIRECTIONS and cell == prev_cell:
                blocker = _blocker(room, step_to(cell, action), prev_printer)
                result = f"The {blocker} blocks the move; still at {cell_text(*cell, room.size)}."
            elif action in DIRECTIONS:
                result = f"Now at {cell_text(*cell, room.size)}."
            elif printer == prev_printer:
                result = "Nothing happens." if action == "drop" else "Nothing to pick up in front."
            elif printer[0] == "carried":
                result = "The agent picks up the printer."
            elif printer[0] == "table":
                result = "The printer is now on the table."
            else:
                result = f"The printer is now on the floor at {cell_text(*printer[1], room.size)}."
            steps.append(f"{ACTION_TEXT[action]} {result} Carrying objects: {carrying}.")
            prev_cell, prev_printer = cell, printer

        outcome, printer_cell = states[-1][1]
        words = {"pickup": "pick up", "drop": "put down"}
        prompt = (
            f"<image>\nThis is a {room.size}x{room.size} room seen from above (grey cells are walls). The agent "
            f"is the red dot, facing right; the purple square is a printer and the brown cell a table. A move "
            f"turns the agent to that direction and steps forward unless something blocks it; pick up and "
            f"put down act on the cell the agent faces. {CELL_NUMBERING} "
            f"The agent does: {', '.join(words.get(a, 'go ' + a) for a in actions)}. "
            f"Where is the printer at the end? {lettered(CHOICES)}"
        )
        return Trajectory(
            prompt=prompt,
            images=images,
            steps=steps,
            step_images=step_images,
            choices=list(CHOICES),
            answer="ABC"[OUTCOMES.index(outcome)],
            meta={
                "room": room.size,
                "table": list(room.table),
                "printer": list(room.printer),
                "start": list(start),
                "actions": actions,
                "positions": [list(cell) for cell, _ in states],
                "carrying": [printer[0] == "carried" for _, printer in states],
                "outcome": outcome,
                "printer_final": list(printer_cell) if printer_cell else None,
            },
        )


def _blocker(room: Room, cell: Cell, printer: tuple[str, Cell | None]) -> str:
    if cell == room.table:
        return "table"
    if printer[0] == "floor" and cell == printer[1]:
        return "printer"
    return "wall"


class RoomRenderer:
    def __init__(self, room: Room, start: Cell, size: int):
        self.canvas = canvas = GridCanvas(room.size, room.size, size)
        base = canvas.blank()
        inset = 1 if canvas.cell >= 8 else 0
        for r in range(room.size):
            for c in range(room.size):
                wall = r in (0, room.size - 1) or c in (0, room.size - 1)
                canvas.fill(base, r, c, WALL_RGB if wall else FLOOR_RGB, inset=0 if wall else inset)
        canvas.fill(base, *room.table, TABLE_RGB, inset=inset)
        canvas.ring(base, *start, START_RGB, width=canvas.line + 1)
        self.base = base
        self.room = room
        self.printer_inset = max(1, canvas.cell // 4)

    def frame(self, agent: Cell, printer: tuple[str, Cell | None]) -> np.ndarray:
        img = self.base.copy()
        where, cell = printer
        if where == "floor":
            self.canvas.fill(img, *cell, PRINTER_RGB, inset=self.printer_inset)
        elif where == "table":
            self.canvas.fill(img, *self.room.table, PRINTER_RGB, inset=self.printer_inset)
        self.canvas.disc(img, *agent, AGENT_RGB)
        if where == "carried":  # a small printer in the corner of the agent's cell
            y0, _, x0, _ = self.canvas.box(*agent)
            side = max(2, self.canvas.cell // 4)
            img[y0 + 1 : y0 + 1 + side, x0 + 1 : x0 + 1 + side] = PRINTER_RGB
        return img
