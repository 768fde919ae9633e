"""Grid-world reasoning tasks (MVoT's Maze, FrozenLake, MiniBehavior): generators and renderers.

Usable with no Ray: `generate_example(get_task("maze"), size=4, split="train", index=0, seed=0,
fractions={"train": .8, "val": .1, "test": .1}, opts=RenderOptions())` returns one encoded row of
the example schema. Adding a task: a module with a class like `MazeTask`, plus one line below.
"""

from mmreason.tasks.base import (
    ANSWER_RE,
    GridTask,
    RenderOptions,
    answer_sentence,
    generate_example,
    layout_split,
    parse_answer,
)
from mmreason.tasks.frozenlake import FrozenLakeTask
from mmreason.tasks.maze import MazeTask
from mmreason.tasks.minibehavior import MiniBehaviorTask

TASKS: dict[str, GridTask] = {t.name: t for t in (MazeTask(), FrozenLakeTask(), MiniBehaviorTask())}


def get_task(name: str) -> GridTask:
    """The task called `name`; an unknown name is an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown grid-world task {name!r} (known: {', '.join(TASKS)})") from None


__all__ = [
    "ANSWER_RE",
    "TASKS",
    "GridTask",
    "RenderOptions",
    "answer_sentence",
    "generate_example",
    "get_task",
    "layout_split",
    "parse_answer",
]
