"""Shared drawing for the grid-world renderers: a square canvas split into cells, filled cells,
discs, a built-in 5×7 bitmap font (deterministic on every machine), PNG encoding, and the inverse
(`find_color_cell`) that tests and importers use to read the agent's cell back off the pixels.

Every renderer draws the agent as a disc of `AGENT_RGB`, a colour used for nothing else, so the
agent's cell in any frame is recoverable exactly from a lossless PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

Color = tuple[int, int, int]

AGENT_RGB: Color = (230, 20, 20)
START_RGB: Color = (20, 170, 60)
BACKGROUND_RGB: Color = (255, 255, 255)
INK_RGB: Color = (20, 20, 20)

# 5×7 glyphs, one string per row, '#' = ink.
GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
}
_GLYPH_MASKS = {k: np.array([[ch == "#" for ch in row] for row in v]) for k, v in GLYPHS.items()}


@dataclass(frozen=True)
class GridCanvas:
    """Geometry of an `n_rows × n_cols` grid drawn centred on a `size × size` image."""

    n_rows: int
    n_cols: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 4 * max(self.n_rows, self.n_cols):
            raise ValueError(
                f"image_size {self.size} is too small for a {self.n_rows}×{self.n_cols} grid "
                f"(need at least {4 * max(self.n_rows, self.n_cols)} px)"
            )

    @cached_property
    def cell(self) -> int:
        return self.size // max(self.n_rows, self.n_cols)

    @cached_property
    def origin(self) -> tuple[int, int]:
        return ((self.size - self.cell * self.n_rows) // 2, (self.size - self.cell * self.n_cols) // 2)

    @cached_property
    def line(self) -> int:
        """Width of walls and markers, growing with the cell size."""
        return max(1, self.cell // 12)

    def blank(self, color: Color = BACKGROUND_RGB) -> np.ndarray:
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[:] = color
        return img

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Pixel bounds (y0, y1, x0, x1) of a cell, end-exclusive."""
        y0 = self.origin[0] + row * self.cell
        x0 = self.origin[1] + col * self.cell
        return y0, y0 + self.cell, x0, x0 + self.cell

    def fill(self, img: np.ndarray, row: int, col: int, color: Color, inset: int = 0) -> None:
        y0, y1, x0, x1 = self.box(row, col)
        img[y0 + inset : y1 - inset, x0 + inset : x1 - inset] = color

    def ring(self, img: np.ndarray, row: int, col: int, color: Color, width: int = 1) -> None:
        y0, y1, x0, x1 = self.box(row, col)
        img[y0 : y0 + width, x0:x1] = color
        img[y1 - width : y1, x0:x1] = color
        img[y0:y1, x0 : x0 + width] = color
        img[y0:y1, x1 - width : x1] = color

    @cached_property
    def _disc(self) -> np.ndarray:
        c = (self.cell - 1) / 2
        yy, xx = np.mgrid[: self.cell, : self.cell]
        return (yy - c) ** 2 + (xx - c) ** 2 <= (0.32 * self.cell) ** 2

    def disc(self, img: np.ndarray, row: int, col: int, color: Color) -> None:
        y0, y1, x0, x1 = self.box(row, col)
        img[y0:y1, x0:x1][self._disc] = color

    def glyph(self, img: np.ndarray, row: int, col: int, char: str, color: Color = INK_RGB) -> None:
        """Draw one letter, scaled to the cell, centred in it."""
        mask = _GLYPH_MASKS[char]
        scale = max(1, (self.cell - 2) // 8)
        mask = np.kron(mask, np.ones((scale, scale), bool))
        h, w = mask.shape
        y0, y1, x0, x1 = self.box(row, col)
        oy = y0 + max(0, (self.cell - h) // 2)
        ox = x0 + max(0, (self.cell - w) // 2)
        region = img[oy : oy + h, ox : ox + w]
        region[mask[: region.shape[0], : region.shape[1]]] = color

    def cell_at(self, y: float, x: float) -> tuple[int, int]:
        return (int((y - self.origin[0]) // self.cell), int((x - self.origin[1]) // self.cell))


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB uint8 array (fast compression: images are tiny)."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def find_color_cell(image: Image.Image | np.ndarray, color: Color, canvas: GridCanvas) -> tuple[int, int] | None:
    """The cell holding the centroid of the pixels of exactly `color`, or None if there are none."""
    arr = np.asarray(image)
    ys, xs = np.nonzero(np.all(arr[..., :3] == np.array(color, np.uint8), axis=-1))
    if len(ys) == 0:
        return None
    return canvas.cell_at(ys.mean(), xs.mean())
