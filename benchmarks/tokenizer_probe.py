"""Can a cell's content be read from the VQ codes a tiny-anole gives its image? (issue 26 item 3)

A visual-thought model sees an image only as its VQ codes, so what the codes lose no transformer can
read back. This probe asks that of each checkpoint's tokenizer directly: every maze letter cell (which
of A–D) and every FrozenLake cell (frozen, hole, goal, start) of the prompt images, from the one-hot
codes of the latent positions that overlap the cell (`GridCanvas.box`), by a logistic regression
trained on the train split's images and scored on the test split's. Controls beside it: a fresh
tiny-anole (random encoder and codebook), the same regression on the cell's raw pixels (what the
image holds), and always guessing the commonest class.

    python benchmarks/tokenizer_probe.py --root ROOT NAME=CHECKPOINT [...]   # → benchmarks/results/tokenizer_probe.json

e.g. `kmeans=ROOT_A/train/mvot-cot/init tokenizer=ROOT_B/train/mvot-cot/init`: the `init` of a cot
run is the fresh tiny-anole after `model.codebook_rows` (k-means) and `model.tokenizer_steps`
(VQ-VAE training); the VQ-VAE is frozen after that, so its export quantises the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmreason.data import read_table  # noqa: E402
from mmreason.models import build_tiny, load_backbone  # noqa: E402
from mmreason.models.anole import AnoleFamily  # noqa: E402
from mmreason.models.base import as_pil  # noqa: E402
from mmreason.tasks.render import GridCanvas  # noqa: E402

WINDOW = 4  # latent positions per side a cell can overlap (a 3×3 grid's 21-px cell over 8-px patches)
FROZENLAKE_KINDS = "FHGS"


def cells(row: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(grid row, grid col, class) of the cells the probe reads in `row`'s prompt image: a maze's
    letter cells (class = letter index) or every FrozenLake cell (class = index in FROZENLAKE_KINDS)."""
    meta = json.loads(row["meta"])
    if row["task"] == "maze":
        return [(r, c, letter) for letter, (r, c) in enumerate(meta["candidates"])]
    return [(r, c, FROZENLAKE_KINDS.index(kind)) for r, line in enumerate(meta["desc"]) for c, kind in enumerate(line)]


def patch_window(n: int, row: int, col: int, image_size: int, side: int) -> tuple[range, range]:
    """The latent positions (of a side × side grid over the image) whose patches overlap the cell."""
    y0, y1, x0, x1 = GridCanvas(n, n, image_size).box(row, col)
    patch = image_size // side
    return range(y0 // patch, (y1 - 1) // patch + 1), range(x0 // patch, (x1 - 1) // patch + 1)


def features(rows: list[dict[str, Any]], family: AnoleFamily | None, image_size: int = 64,
             side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One feature vector per probed cell: the one-hot codes of its window (family given) or its
    window's pixels (None), a slot per window position, zero where the window is smaller; + grid size."""
    images = [row["images"][0] for row in rows]
    if family is not None:
        code_of = {int(t): k for k, t in enumerate(family.code_token_ids)}
        ids = torch.cat([family.image_token_ids(images[i : i + 256]) for i in range(0, len(images), 256)])
        grids = [torch.tensor([code_of[int(t)] for t in r]).view(side, side) for r in ids]
        books = len(code_of)
    else:
        grids = [torch.from_numpy(np.asarray(as_pil(im).convert("L"), dtype=np.float32) / 255.0)
                 for im in images]
    xs, ys = [], []
    for row, grid in zip(rows, grids):
        n = json.loads(row["meta"])["size"]
        for r, c, label in cells(row):
            wy, wx = patch_window(n, r, c, image_size, side)
            if family is not None:
                x = torch.zeros(WINDOW, WINDOW, books)
                window = grid[wy.start : wy.stop, wx.start : wx.stop]
                h, w = window.shape
                x[torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h), window.reshape(-1)] = 1.0
            else:
                patch = image_size // side
                x = torch.zeros(WINDOW * patch, WINDOW * patch)
                pixels = grid[wy.start * patch : wy.stop * patch, wx.start * patch : wx.stop * patch]
                x[: pixels.shape[0], : pixels.shape[1]] = pixels
            xs.append(torch.cat([x.reshape(-1), torch.tensor([float(n)])]))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], classes: int,
          steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Multinomial logistic regression (Adam, weight decay 1e-4) on train; accuracy on both."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = train, test
    linear = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: float((linear(x).argmax(1) == y).float().mean())  # noqa: E731
        return {"train": acc(x_train, y_train), "test": acc(x_test, y_test), "n_test": float(len(y_test))}


def evenly(rows: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most `most` of `rows` (0: all), spread evenly over them: the shards come one grid size
    after another, so a prefix would hold one size only."""
    if not most or len(rows) <= most:
        return rows
    return [rows[i * len(rows) // most] for i in range(most)]


def run(root: Path, checkpoints: dict[str, str | None], max_rows: int) -> dict[str, Any]:
    data = root / "data" / "gridworld"
    columns = ["task", "images", "meta"]
    out: dict[str, Any] = {"root": str(root), "tasks": {}}
    for task, classes in (("maze", 4), ("frozenlake", len(FROZENLAKE_KINDS))):
        train_rows = evenly(read_table(data, split="train", task=task, columns=columns).to_pylist(), max_rows)
        test_rows = evenly(read_table(data, split="test", task=task, columns=columns).to_pylist(), max_rows)
        if not train_rows or not test_rows:
            raise SystemExit(f"{data}: no {task} rows in train and test")
        test_labels = [label for row in test_rows for *_, label in cells(row)]
        result: dict[str, Any] = {"classes": classes, "train_rows": len(train_rows), "test_rows": len(test_rows),
                                  "commonest_class_rate": max(Counter(test_labels).values()) / len(test_labels)}
        for name, path in {**checkpoints, "pixels": None}.items():
            family = None if name == "pixels" else load_backbone("tiny-anole", path)
            result[name] = probe(features(train_rows, family), features(test_rows, family), classes)
            print(f"{task:<11}{name:<12}train {result[name]['train']:.3f}  test {result[name]['test']:.3f}  "
                  f"(commonest class {result['commonest_class_rate']:.3f}, {len(test_labels)} test cells)", flush=True)
        out["tasks"][task] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="NAME=CHECKPOINT of tiny-anole checkpoints")
    parser.add_argument("--root", default="runs/bench-mvot", help="a root whose data/gridworld has the rows")
    parser.add_argument("--rows", type=int, default=0, help="rows per task and split, at most, spread over "
                        "the grid sizes (0: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/tokenizer_probe.json"))
    args = parser.parse_args()
    named = dict(arg.split("=", 1) for arg in args.checkpoints)
    with tempfile.TemporaryDirectory() as tmp:
        named = {"random": str(build_tiny("tiny-anole", Path(tmp) / "random")), **named}
        result = run(Path(args.root), named, args.rows)
    result["checkpoints"] = {k: v for k, v in named.items() if k != "random"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
