"""What every grid-world task shares: the task interface, the text of thoughts and answers, and the
deterministic (seed, index) → example function that also decides the split from the layout.

Splits are decided by a hash of the *layout* (maze walls, lake map, room furniture), independent
of the seed, so one layout lands in one split in every dataset generated with the same split
fractions: train and test never share a layout. An example for (split, index) is drawn by
sampling layouts from its own RNG stream until one hashes into that split; the rest of the example
continues on the same stream, so it is a pure function of (seed, task, size, split, index).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from mmreason.data.schema import SPLITS

LETTERS = "ABCD"
ANSWER_RE = re.compile(r"The answer is (\w)\.")
DIRECTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
MAX_LAYOUT_TRIES = 100_000


def answer_sentence(letter: str) -> str:
    """The final text of every grid-world trajectory; `ANSWER_RE` reads it back."""
    return f"The answer is {letter}."


def parse_answer(text: str) -> str | None:
    """The letter of the last `The answer is X.` in `text`, or None."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


def recheck_step(steps: list[str]) -> str:
    """A closing step that goes over every earlier step again, as a verbose reasoner re-checks work
    it has already done: it adds nothing the chain did not say (though a model can go wrong in it)
    and lengthens it. A share of examples (`RenderOptions.recheck`) carry it, so replies vary in
    length — what a length penalty in RL should learn to cut."""
    return "Check: " + " ".join(steps)


AFTER_ANSWER = "after_answer"
"""The `meta` key of text a reply goes on with after its answer sentence (a re-check placed there
by `RenderOptions.recheck_after_answer`); the backbone processors train it after the answer."""


def after_answer(row: dict[str, Any]) -> str:
    """The text a row's reply goes on with after its answer sentence, or "" (`AFTER_ANSWER`)."""
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        meta = json.loads(meta) if AFTER_ANSWER in meta else {}
    return meta.get(AFTER_ANSWER, "")


def restated(step: str) -> str:
    """A step followed by a verbatim re-check of itself (`RenderOptions.restate`): longer, and a copy
    of the text just written rather than a re-walk like `recheck_step` (on the tiny model the
    doubled cell numbers still confused the letter lookup: README, "Grid-world reasoning data")."""
    return f"{step} Check: {step}"


def lettered(choices: list[str]) -> str:
    """`A. first B. second …`, as choices are listed in prompts."""
    return " ".join(f"{letter}. {text}" for letter, text in zip(LETTERS, choices))


CELL_NUMBERING = "Cells are numbered row by row from 0 at the top left."
"""How prompts define cell numbers (`cell_number`)."""


def cell_number(row: int, col: int, width: int) -> int:
    """Row-major number of a cell. Thoughts name cells by one number rather than (row, column): a
    cell is then one token to a word-level tokenizer, and a tiny model looks a letter's cell up
    by matching that token (with two-token row/column keys the lookup stayed near chance)."""
    return row * width + col


def cell_text(row: int, col: int, width: int) -> str:
    return f"cell {cell_number(row, col, width)}"


def move_text(direction: str) -> str:
    return f"Go {direction}."


def step_to(cell: tuple[int, int], direction: str) -> tuple[int, int]:
    dr, dc = DIRECTIONS[direction]
    return cell[0] + dr, cell[1] + dc


def direction_between(a: tuple[int, int], b: tuple[int, int]) -> str:
    delta = (b[0] - a[0], b[1] - a[1])
    for name, d in DIRECTIONS.items():
        if d == delta:
            return name
    raise ValueError(f"cells {a} and {b} are not neighbours")


@dataclass(frozen=True)
class RenderOptions:
    """How a task draws its states and writes its thoughts; tasks skip the step frames when
    `step_images` is off."""

    image_size: int = 64
    step_images: bool = True
    recheck: float = 0.0
    """Share of examples whose thoughts end with a redundant verification pass (`recheck_step`)."""
    recheck_after_answer: bool = False
    """Put that re-check after the answer sentence (meta `after_answer`), where it cannot change the
    answer — the verification rounds "overthinking" reasoners add after they have answered — rather
    than as the last step, where a re-walk that goes wrong changes it."""
    restate: float = 0.0
    """Share of examples in which every step is followed by a verbatim re-check of itself (`restated`)."""


@dataclass
class Trajectory:
    """What a task's `build` returns: the fields of one example, images already encoded."""

    prompt: str
    images: list[bytes]
    steps: list[str]
    step_images: list[bytes]
    choices: list[str]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


class Layout(Protocol):
    @property
    def key(self) -> str:
        """Canonical text of the layout; equal layouts have equal keys."""


class GridTask(Protocol):
    name: ClassVar[str]
    sizes: ClassVar[range]

    def sample_layout(self, rng: np.random.Generator, size: int) -> Layout: ...

    def build(self, rng: np.random.Generator, layout: Any, opts: RenderOptions) -> Trajectory: ...


def layout_split(task: str, layout_key: str, fractions: dict[str, float]) -> str:
    """The split a layout belongs to: a seed-independent hash of the layout against the fractions."""
    digest = hashlib.sha256(f"{task}/{layout_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(fractions.get(s, 0.0) for s in SPLITS)
    acc = 0.0
    last = SPLITS[0]
    for split in SPLITS:
        share = fractions.get(split, 0.0) / total
        if share <= 0:
            continue
        acc += share
        last = split
        if u < acc:
            return split
    return last


def layout_id(task: str, layout_key: str) -> str:
    return hashlib.sha256(f"{task}/{layout_key}".encode()).hexdigest()[:16]


def example_id(task: str, size: int, split: str, seed: int, index: int) -> str:
    return f"{task}-n{size}-{split}-s{seed}-{index:06d}"


def generate_example(
    task: GridTask,
    size: int,
    split: str,
    index: int,
    seed: int,
    fractions: dict[str, float],
    opts: RenderOptions,
) -> dict[str, Any]:
    """Row `index` of `split` for `task` at grid `size`: an encoded row of the example schema."""
    if size not in task.sizes:
        raise ValueError(f"{task.name}: grid size {size} out of range {task.sizes.start}..{task.sizes.stop - 1}")
    if fractions.get(split, 0.0) <= 0:
        raise ValueError(f"split {split!r} has fraction 0; no layout can belong to it")
    task_code = zlib.crc32(task.name.encode())
    for attempt in range(MAX_LAYOUT_TRIES):
        rng = np.random.default_rng([seed, task_code, size, SPLITS.index(split), index, attempt])
        layout = task.sample_layout(rng, size)
        if layout_split(task.name, layout.key, fractions) == split:
            break
    else:
        raise RuntimeError(
            f"{task.name} n={size}: no layout for split {split!r} in {MAX_LAYOUT_TRIES} draws "
            f"(fraction {fractions[split]}); raise that split's fraction"
        )
    traj = task.build(rng, layout, opts)
    meta = {"size": size, "seed": seed, "index": index, "layout_id": layout_id(task.name, layout.key), **traj.meta}
    if opts.recheck > 0:  # drawn after the example, on its stream: recheck 0 leaves rows as they were
        meta["recheck"] = bool(rng.random() < opts.recheck)
        if meta["recheck"] and opts.recheck_after_answer:
            meta[AFTER_ANSWER] = recheck_step(traj.steps)
        elif meta["recheck"]:
            traj.steps.append(recheck_step(traj.steps))
            if traj.step_images:  # the state does not change while re-checking
                traj.step_images.append(traj.step_images[-1])
    if opts.restate > 0:  # drawn next: either setting at 0 leaves the other's rows as they were
        meta["restate"] = bool(rng.random() < opts.restate)
        if meta["restate"]:
            traj.steps = [restated(step) for step in traj.steps]
    return {
        "id": example_id(task.name, size, split, seed, index),
        "task": task.name,
        "split": split,
        "prompt": traj.prompt,
        "images": traj.images,
        "steps": traj.steps,
        "step_images": traj.step_images,
        "choices": traj.choices,
        "answer": traj.answer,
        "meta": json.dumps(meta, sort_keys=True),
    }
