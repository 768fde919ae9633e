"""Import MVoT's raw Maze and FrozenLake data (Li et al., "Imagine while Reasoning in Space:
Multimodal Visualization-of-Thought", arXiv 2501.07542) into the example schema.

    from mmreason.data.mvot import import_mvot
    rows, skipped = import_mvot("data_samples.zip")          # plain Python; pipelines/mvot_import.py shards it

A source is a folder or a .zip of one (`__MACOSX/`, `.DS_Store` and `._*` entries are ignored):

- Maze: `…/grid{N}.json` or `…/grid{N}_paths.json`, a list of paths (`path_locs`, `action_list`,
  `candidate_locs`, `maze_info`, `file_prefix`, …). Frame k (1 = the initial state, k+1 = after
  action k) is `{file_prefix}_{k}.jpg` relative to the json's parent-of-parent, or failing that in a
  folder `grid{N}` next to the json, or next to the json itself.
- FrozenLake: `…/level{N}/data.json`, one environment per key (`env_desc`, and per trajectory
  `actions` as gymnasium ids, `states`, `exec_states`, `data_id`, `additional_actions`); frames
  `level{N}/{data_id}/{k}.png`, k = 0..len(states)-1.
- MiniBehavior: MVoT publishes no sample of its raw MiniBehavior layout, so none is read here.

Each record is checked on its own — a maze path against its walls, actions and candidates; a lake
walk's states and outcome against gymnasium's own `step` — and a bad record is reported (id and
reason) and skipped while the rest import. Text comes from the generators' `maze_text` / `lake_text`,
so imported rows read like generated ones; frames are the original JPEG/PNG bytes; the split is
`layout_split` on the layout key the generators hash, so a layout lands in the same split in
imported and generated data (with the same split fractions).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import re
import zipfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from mmreason import storage
from mmreason.config import ConfigError, config_hash
from mmreason.data.gridworld import SplitFractions
from mmreason.data.shards import SourceError
from mmreason.tasks.base import LETTERS, direction_between, layout_id, layout_split
from mmreason.tasks.frozenlake import CHOICES, GYM_ACTION, GYM_LAKE_LEGEND, OUTCOMES, LakeMap, lake_text, simulate
from mmreason.tasks.maze import MazeLayout, maze_text

DATASET_NAME = "mvot"
IMPORTER_VERSION = 1  # bump when imported rows change for the same input
MAZE_FILE = re.compile(r"grid(\d+)(?:_paths)?\.json")
LAKE_DIR = re.compile(r"level(\d+)")
LAKE_FILE = "data.json"
EXEC_OUTCOME = {"success": "goal", "terminated": "hole", "truncated": "safe"}
GYM_DIRECTION = {action: direction for direction, action in GYM_ACTION.items()}
MAZE_MOVE = re.compile(r"(up|down|left|right)-(\d+)")
MAZE_FRAME_EXTENSIONS = (".jpg", ".png")
LAKE_FRAME_EXTENSIONS = (".png", ".jpg")
LAKE_LISTS = ("actions", "states", "exec_states", "data_id")  # one entry per trajectory
LAKE_OPTIONAL_LISTS = ("additional_actions", "rewards")

Cell = tuple[int, int]


class RecordError(ValueError):
    """One MVoT record (or file) is wrong; the message says how, and the caller adds its id."""


@dataclass
class MvotImportConfig:
    source: str = ""
    """The MVoT folder or .zip to import (the PATH argument sets it)."""
    output_dir: str = "runs/data/mvot"
    """Where shards and manifest.json go: a local folder (shared storage on a cluster) or an s3:// / gs:// prefix."""
    splits: SplitFractions = field(default_factory=SplitFractions)
    """Split fractions; keep the grid-world job's so a layout lands in the same split in both."""
    rows_per_shard: int = 256
    """Rows per Parquet shard; a shard is one Ray task and the unit of resume."""
    overwrite: bool = False
    """Rebuild shards that already exist instead of skipping them."""

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


# --- the source: a folder or a zip, read alike ------------------------------------------------------


def _ignored(name: str) -> bool:
    """macOS archive litter, not data."""
    parts = name.split("/")
    return "__MACOSX" in parts or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


class MvotSource:
    """An MVoT folder or .zip: its files by POSIX path relative to the root, and their bytes."""

    def __init__(self, path: str | Path):
        self._zip: zipfile.ZipFile | None = None
        if storage.is_remote(path):  # s3:// or gs://: read from this machine's copy
            if not storage.exists(path):
                raise FileNotFoundError(f"MVoT source {path} does not exist")
            path = storage.local_copy(path)
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"MVoT source {self.path} does not exist")
        if not self.path.is_dir():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise SourceError(
                    f"MVoT source {self.path} is neither a folder nor a readable .zip archive: {exc}"
                ) from exc

    @cached_property
    def names(self) -> list[str]:
        """Every data file, sorted (listed on first use: shard workers only read)."""
        if self._zip is not None:
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            try:
                names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
            except OSError as exc:
                raise SourceError(f"MVoT source {self.path} cannot be listed: {exc}") from exc
        return sorted(n for n in names if not _ignored(n))

    @cached_property
    def _known(self) -> set[str]:
        return set(self.names)

    def has(self, name: str) -> bool:
        return name in self._known

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> "MvotSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class SourceFile:
    """One MVoT json: its task, path in the source, and the N of its `grid{N}` / `level{N}` name."""

    task: str
    name: str
    grid: int


def find_files(source: MvotSource) -> list[SourceFile]:
    """The maze and frozenlake json files of `source`; none at all is an error naming the source."""
    found = []
    for name in source.names:
        base = posixpath.basename(name)
        parent = posixpath.basename(posixpath.dirname(name))
        if m := MAZE_FILE.fullmatch(base):
            found.append(SourceFile("maze", name, int(m.group(1))))
        elif base == LAKE_FILE and (m := LAKE_DIR.fullmatch(parent)):
            found.append(SourceFile("frozenlake", name, int(m.group(1))))
    if not found:
        raise SourceError(
            f"no MVoT maze or frozenlake files in {source.path} (looked for grid{{N}}.json, grid{{N}}_paths.json "
            f"and level{{N}}/data.json)"
        )
    return found


# --- one record → a draft row (text, meta, frame names) -------------------------------------------


@dataclass
class Draft:
    """A checked record as row text and meta, with its frames named but not yet read: `frames[0]` is
    the initial state, then one per move; the last frame repeats `repeat_last` more times."""

    id: str
    task: str
    split: str
    size: int
    prompt: str
    steps: list[str]
    choices: list[str]
    answer: str
    meta: dict[str, Any]
    frames: list[str]
    repeat_last: int = 0

    def row(self, frames: list[bytes]) -> dict[str, Any]:
        """The encoded example-schema row, given the frames' bytes (in `self.frames` order)."""
        return {
            "id": self.id,
            "task": self.task,
            "split": self.split,
            "prompt": self.prompt,
            "images": [frames[0]],
            # the transcription step looks at the initial state, every move at the state it leads to
            "step_images": frames + [frames[-1]] * self.repeat_last,
            "steps": self.steps,
            "choices": self.choices,
            "answer": self.answer,
            "meta": json.dumps(self.meta, sort_keys=True),
        }


def _field(record: dict, name: str, kind: type) -> Any:
    if name not in record:
        raise RecordError(f"field {name!r} is missing")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is no path_id
        raise RecordError(f"field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _cells(value: list, n: int, name: str) -> list[Cell]:
    cells = []
    for i, cell in enumerate(value):
        if not (isinstance(cell, list) and len(cell) == 2 and all(type(v) is int for v in cell)):
            raise RecordError(f"{name}[{i}] must be [row, column], got {cell!r}")
        if not (0 <= cell[0] < n and 0 <= cell[1] < n):
            raise RecordError(f"{name}[{i}] {cell} lies outside the {n}x{n} grid")
        cells.append((cell[0], cell[1]))
    return cells


def _maze_moves(action_list: list, limit: int) -> list[str]:
    """MVoT's `down-1`, `left-2`, … as one direction per cell moved (at most `limit` + 1 of them,
    enough to tell a list longer than the path)."""
    moves: list[str] = []
    for i, action in enumerate(action_list):
        m = MAZE_MOVE.fullmatch(action) if isinstance(action, str) else None
        if m is None or int(m.group(2)) < 1:
            raise RecordError(f"action_list[{i}] {action!r} is not of the form 'down-1'")
        moves += [m.group(1)] * min(int(m.group(2)), limit + 1 - len(moves))
        if len(moves) > limit:
            break
    return moves


def _frame(source: MvotSource, stems: list[str], suffix: str, extensions: tuple[str, ...]) -> str:
    """The first existing `{stem}{suffix}{ext}`; a missing frame names every place looked in."""
    names = list(dict.fromkeys(f"{stem}{suffix}{ext}" for stem in stems for ext in extensions))  # stems may agree
    for name in names:
        if source.has(name):
            return name
    tried = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
    raise RecordError(f"frame {names[0]} is missing from {source.path}{tried}")


def maze_draft(source: MvotSource, file: SourceFile, record: Any, fractions: dict[str, float]) -> Draft:
    """Check one MVoT maze path and turn it into a draft row; a bad record raises `RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(f"a path must be a JSON object, got {type(record).__name__}")
    n = _field(record, "grid_num", int)
    path_id = _field(record, "path_id", int)
    if n != file.grid:
        raise RecordError(f"grid_num is {n} but the file {file.name} holds grid {file.grid}")
    maze_info = _field(record, "maze_info", str)
    try:
        layout = MazeLayout.from_maze_info(n, maze_info)
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    path = _cells(_field(record, "path_locs", list), n, "path_locs")
    candidates = _cells(_field(record, "candidate_locs", list), n, "candidate_locs")
    if not path:
        raise RecordError("path_locs is empty")
    if len(candidates) != len(LETTERS) or len(set(candidates)) != len(LETTERS):
        raise RecordError(f"candidate_locs must be {len(LETTERS)} distinct cells (A–D), got {candidates}")
    for k, (a, b) in enumerate(zip(path, path[1:]), start=1):
        if abs(a[0] - b[0]) + abs(a[1] - b[1]) != 1:
            raise RecordError(f"path_locs move {k} jumps from {tuple(a)} to {tuple(b)}, not a neighbour")
        if not layout.is_open(a, b):
            raise RecordError(f"path_locs move {k} from {tuple(a)} to {tuple(b)} crosses a wall "
                              f"(maze_info {maze_info})")
    moves = [direction_between(a, b) for a, b in zip(path, path[1:])]
    listed = _maze_moves(_field(record, "action_list", list), limit=len(moves))
    if len(listed) > len(moves):
        raise RecordError(f"action_list has more moves than path_locs ({len(moves)})")
    if len(listed) < len(moves):
        raise RecordError(f"action_list has {len(listed)} moves but path_locs has {len(moves)}")
    for k, (said, went) in enumerate(zip(listed, moves), start=1):
        if said != went:
            raise RecordError(f"action_list move {k} says {said} but path_locs goes {went}")
    if path[-1] not in candidates:
        raise RecordError(f"the path ends at {tuple(path[-1])}, which is none of candidate_locs {candidates}")

    prefix = _field(record, "file_prefix", str)
    here = posixpath.dirname(file.name)
    stems = [
        posixpath.normpath(posixpath.join(posixpath.dirname(here), prefix)),
        posixpath.join(here, f"grid{n}", posixpath.basename(prefix)),
        posixpath.join(here, posixpath.basename(prefix)),
    ]
    frames = [_frame(source, stems, f"_{k}", MAZE_FRAME_EXTENSIONS) for k in range(1, len(path) + 1)]
    prompt, steps = maze_text(n, candidates, path)
    return Draft(
        id=f"mvot-maze-grid{n}-path{path_id}",
        task="maze",
        split=layout_split("maze", layout.key, fractions),
        size=n,
        prompt=prompt,
        steps=steps,
        choices=list(LETTERS),
        answer=LETTERS[candidates.index(path[-1])],
        meta={
            "size": n,
            "source": DATASET_NAME,
            "source_file": file.name,
            "path_id": path_id,
            "file_prefix": prefix,
            "layout_id": layout_id("maze", layout.key),
            "maze_info": layout.key,
            "start": list(path[0]),
            "path": [list(c) for c in path],
            "actions": moves,
            "action_list": record["action_list"],
            "candidates": [list(c) for c in candidates],
            "frames": frames,
        },
        frames=frames,
    )


def _lake_map(env_desc: Any) -> LakeMap:
    if not isinstance(env_desc, str) or not env_desc:
        raise RecordError(f"env_desc must be a non-empty string, got {env_desc!r}")
    n = math.isqrt(len(env_desc))
    if n * n != len(env_desc) or set(env_desc) - set("SFHG"):
        raise RecordError(f"env_desc must be an n×n map of S/F/H/G flattened, got {env_desc!r}")
    if env_desc.count("S") != 1 or env_desc.count("G") != 1:
        raise RecordError(f"env_desc must hold exactly one start S and one goal G, got {env_desc!r}")
    return LakeMap(tuple(env_desc[r * n : (r + 1) * n] for r in range(n)))


def _gym_moves(actions: Any, name: str) -> list[str]:
    if not isinstance(actions, list) or not all(type(a) is int and a in GYM_DIRECTION for a in actions):
        raise RecordError(f"{name} must be a list of gymnasium FrozenLake actions 0–3, got {actions!r}")
    return [GYM_DIRECTION[a] for a in actions]


def lake_trajectories(env: Any) -> int:
    """How many trajectories an MVoT FrozenLake environment holds; its per-trajectory lists must agree."""
    if not isinstance(env, dict):
        raise RecordError(f"an environment must be a JSON object, got {type(env).__name__}")
    names = LAKE_LISTS + tuple(name for name in LAKE_OPTIONAL_LISTS if name in env)
    lengths = {name: len(_field(env, name, list)) for name in names}
    if len(set(lengths.values())) != 1:
        raise RecordError(f"per-trajectory lists differ in length: {lengths}")
    return lengths["actions"]


def lake_draft(
    source: MvotSource, file: SourceFile, key: str, env: dict, traj: int, fractions: dict[str, float]
) -> Draft:
    """Check trajectory `traj` of environment `key` against gymnasium and turn it into a draft row."""
    lake = _lake_map(env.get("env_desc"))
    n = lake.n
    moves = _gym_moves(env["actions"][traj], f"actions[{traj}]")
    after_end = _gym_moves(env["additional_actions"][traj] if "additional_actions" in env else [],
                           f"additional_actions[{traj}]")
    states = env["states"][traj]
    if not isinstance(states, list) or not all(type(s) is int and 0 <= s < n * n for s in states):
        raise RecordError(f"states[{traj}] must be a list of cells 0..{n * n - 1}, got {states!r}")
    if len(states) != len(moves) + 1:
        raise RecordError(f"states[{traj}] has {len(states)} entries for {len(moves)} actions "
                          f"(want the start + one per action)")
    if divmod(states[0], n) != lake.start:
        raise RecordError(f"states[{traj}] starts at {tuple(divmod(states[0], n))}, "
                          f"but S is at {tuple(lake.start)}")

    positions, outcome = simulate(lake, moves)  # gymnasium's own FrozenLakeEnv.step
    if len(positions) < len(moves):
        raise RecordError(f"gymnasium ends the walk after action {len(positions)} ({outcome}), "
                          f"but actions[{traj}] lists {len(moves)}")
    for k, (state, cell) in enumerate(zip(states[1:], positions), start=1):
        if divmod(state, n) != cell:
            raise RecordError(f"states[{traj}] says {tuple(divmod(state, n))} after action {k}, "
                              f"gymnasium says {tuple(cell)}")
    exec_state = env["exec_states"][traj]
    if not isinstance(exec_state, str) or exec_state not in EXEC_OUTCOME:
        raise RecordError(f"exec_states[{traj}] is {exec_state!r}, not one of {', '.join(EXEC_OUTCOME)}")
    if EXEC_OUTCOME[exec_state] != outcome:
        raise RecordError(f"exec_states[{traj}] is {exec_state!r} but gymnasium's outcome is {outcome!r}")
    if after_end and outcome == "safe":
        # the prompt says a walk ends only at the goal or in a hole; moves after a walk that never
        # ended would have to move the agent, and MVoT gives no frames for them
        raise RecordError(f"additional_actions[{traj}] follow a walk that did not end (truncated)")
    data_id = env["data_id"][traj]
    if not (type(data_id) is int or (isinstance(data_id, str) and data_id and "/" not in data_id)):
        raise RecordError(f"data_id[{traj}] must be a trajectory number, got {data_id!r}")

    here = posixpath.join(posixpath.dirname(file.name), str(data_id))
    frames = [_frame(source, [here], f"/{k}", LAKE_FRAME_EXTENSIONS) for k in range(len(states))]
    prompt, steps = lake_text(lake, moves, positions, after_end=after_end, legend=GYM_LAKE_LEGEND)
    meta = {
        "size": n,
        "source": DATASET_NAME,
        "source_file": file.name,
        "env": key,
        "traj": traj,
        "data_id": data_id,
        "layout_id": layout_id("frozenlake", lake.key),
        "desc": list(lake.desc),
        "start": list(lake.start),
        "goal": list(lake.goal),
        "actions": moves,
        "gym_actions": env["actions"][traj],
        "additional_actions": after_end,
        "positions": [list(p) for p in positions],
        "outcome": outcome,
        "exec_state": exec_state,
        "frames": frames,
    }
    if "rewards" in env:
        meta["reward"] = env["rewards"][traj]
    return Draft(
        id=f"mvot-frozenlake-level{file.grid}-env{key}-traj{traj}",
        task="frozenlake",
        split=layout_split("frozenlake", lake.key, fractions),
        size=n,
        prompt=prompt,
        steps=steps,
        choices=list(CHOICES),
        answer="ABC"[OUTCOMES.index(outcome)],
        meta=meta,
        frames=frames,
        repeat_last=len(after_end),
    )


def _checked(make: Callable[[], Draft]) -> Draft | str:
    """The draft, or why the record failed; input shaped in a way no check foresaw is still one bad
    record, not a failed import."""
    try:
        return make()
    except RecordError as exc:
        return str(exc)
    except Exception as exc:
        return f"malformed record: {exc!r}"


def file_drafts(source: MvotSource, file: SourceFile, fractions: dict[str, float]) -> Iterator[tuple[str, Draft | str]]:
    """(id, draft) for every record of `file`, or (id, reason) for one that fails its checks; a file
    that cannot be read at all yields one (file name, reason)."""
    try:
        data = json.loads(source.read(file.name))
    except Exception as exc:  # zip CRC errors, bad UTF-8, bad JSON: one unreadable file
        yield file.name, f"cannot read {file.name}: {exc}"
        return
    if file.task == "maze":
        if not isinstance(data, list):
            yield file.name, f"{file.name} must hold a JSON list of paths, got {type(data).__name__}"
            return
        for i, record in enumerate(data):
            path_id = record.get("path_id") if isinstance(record, dict) else None
            rid = f"mvot-maze-grid{file.grid}-path{path_id}" if type(path_id) is int else f"{file.name}[{i}]"
            yield rid, _checked(lambda: maze_draft(source, file, record, fractions))
        return
    if not isinstance(data, dict):
        yield file.name, f"{file.name} must hold a JSON object of environments, got {type(data).__name__}"
        return
    for key, env in data.items():
        env_id = f"mvot-frozenlake-level{file.grid}-env{key}"
        try:
            count = lake_trajectories(env)
            _lake_map(env.get("env_desc"))
        except RecordError as exc:
            yield env_id, str(exc)  # the whole environment: its trajectories cannot be told apart
            continue
        for traj in range(count):
            yield f"{env_id}-traj{traj}", _checked(lambda: lake_draft(source, file, key, env, traj, fractions))


# --- the plan: drafts grouped into shards, and a shard's rows ---------------------------------------


@dataclass(frozen=True)
class ImportShard:
    """The drafts of one shard: one task, grid size and split, in source order."""

    task: str
    size: int
    split: str
    part: int
    drafts: tuple[Draft, ...]

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.task}-mvot-n{self.size}-{self.part:04d}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ImportShard":
        data = json.loads(text)
        return cls(**{**data, "drafts": tuple(Draft(**d) for d in data["drafts"])})


def plan_import(
    source: MvotSource, fractions: dict[str, float], rows_per_shard: int
) -> tuple[list[ImportShard], list[dict[str, str]], list[SourceFile]]:
    """Every record of `source` checked and grouped into shards, the records that failed
    (`{"id", "error"}`), and the files found."""
    files = find_files(source)
    errors: list[dict[str, str]] = []
    groups: dict[tuple[str, int, str], list[Draft]] = {}
    seen: dict[str, str] = {}
    for file in files:
        for rid, result in file_drafts(source, file, fractions):
            if isinstance(result, str):
                errors.append({"id": rid, "error": result})
            elif rid in seen:
                errors.append({"id": rid, "error": f"duplicate id: {file.name} repeats a record of {seen[rid]}"})
            else:
                seen[rid] = file.name
                groups.setdefault((result.task, result.size, result.split), []).append(result)
    shards = []
    for (task, size, split), drafts in sorted(groups.items()):
        for part, start in enumerate(range(0, len(drafts), rows_per_shard)):
            shards.append(ImportShard(task, size, split, part, tuple(drafts[start : start + rows_per_shard])))
    return shards, errors, files


def shard_info(spec: ImportShard) -> dict[str, Any]:
    """What a finished shard's footer must say for a re-run to skip it: a hash of its drafts (the
    records' text, meta, split and frame names), so changed input json rebuilds it."""
    return {
        "dataset": DATASET_NAME,
        "path": spec.relpath,
        "config_hash": config_hash({"importer_version": IMPORTER_VERSION, "spec": asdict(spec)}),
        "records": len(spec.drafts),
    }


def read_frame(source: MvotSource, name: str) -> bytes:
    """The frame's original bytes, once they decode as a PNG or JPEG image."""
    try:
        data = source.read(name)
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: a truncated file fails here, not in a training worker
            kind = img.format
    except Exception as exc:  # PIL, zlib and zip raise many types for damaged data
        raise RecordError(f"frame {name} is unreadable: {exc}") from None
    if kind not in ("PNG", "JPEG"):
        raise RecordError(f"frame {name} is {kind}, not PNG or JPEG")
    return data


def build_shard(source: MvotSource, spec: ImportShard) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The rows of one shard, and the records whose frames could not be read (recorded, not fatal)."""
    rows, errors = [], []
    for draft in spec.drafts:
        try:
            rows.append(draft.row([read_frame(source, name) for name in draft.frames]))
        except RecordError as exc:
            errors.append({"id": draft.id, "error": str(exc)})
    return rows, errors


def import_mvot(
    path: str | Path, fractions: dict[str, float] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """All rows of an MVoT folder or .zip in one process (no shards, no Ray), and the skipped records."""
    fractions = fractions or SplitFractions().as_dict()
    with MvotSource(path) as source:
        shards, errors, _ = plan_import(source, fractions, rows_per_shard=1 << 30)
        rows = []
        for spec in shards:
            built, failed = build_shard(source, spec)
            rows += built
            errors += failed
    return rows, errors
