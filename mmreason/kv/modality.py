"""Which cached positions are image (or video-frame) tokens, and how each image's tokens lie on a grid.

Derived from the model alone, so a press works on `family.model` or on any model of the three
families loaded by hand:

- InternVL (`internvl3-1b`, `tiny-internvl`): `config.image_token_id` × `image_seq_length`, a square
  grid of pixel-shuffled patch features.
- Anole / Chameleon: every VQ code token of the vocabulary (`vocabulary_mapping.image_tokens`) and
  the `<image>` placeholder; one image is a square grid of codes (resolution / 2^(levels−1) per side).
  The model also *draws* images while decoding (MVoT's visual thoughts): `<racm3:break>`, the codes,
  `<eoss>`; `image_end_ids` marks `<eoss>`, so a press sees when a drawn image is complete.
- Phi-4-multimodal: `vision_config.image_token_id`; an image is its HD crops' features as one
  rows × cols grid (a separator after each row), one separator, then the global view's b×b features
  laid out the same way (`Phi4MultimodalImageEmbedding`): two grids, separators left outside both.
  A one-crop image (a crop-sized picture, a video frame) is rows = cols = b. rows × cols cannot be
  read off a run's length — the crop grid and the padding rows and columns it drops make the same
  length from different grids (real checkpoint: a 896×448 landscape, 16 × 32, and a three-crop
  portrait with padding, 48 × 10, are both 801 tokens; tiny: 4 × 8 and 12 × 2 are both 57) — so
  `Phi4ModalitySpec.watch` hooks the model's image embedding and reads each image's grid off the
  `image_sizes` and `image_attention_mask` it is called with, as the model itself does
  (`mmreason.models.phi4mm.hd_layouts`); a press session installs the hook. A run of a length no
  image of the last embedded batch had keeps only its global view as a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from mmreason.models.anole import IMAGE_END
from mmreason.models.phi4mm import hd_layouts, layout_tokens

TEXT, VISION, SHARED = 0, 1, 2
"""Entry modalities. SHARED marks CoSRe's shared slots, which stand for tokens of both."""
MODALITY_NAMES = {TEXT: "text", VISION: "vision", SHARED: "shared"}


@dataclass
class ModalitySpec:
    image_ids: torch.Tensor
    """(vocab,) bool: token id → is an image token; on the model's device (a lookup per forward)."""
    tokens_per_image: int | None = None
    """Image tokens one image contributes (None: unknown, each run is one image)."""
    grids: list[torch.Tensor] = field(default_factory=list)
    """Offsets (h, w) into one image's run of image tokens, one tensor per 2-D grid in it."""
    image_end_ids: torch.Tensor | None = None
    """(vocab,) bool: token id → closes an image the model writes (Anole's `<eoss>`); None for
    families that cannot draw."""

    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T) int8 modality (TEXT or VISION)."""
        return _member(self.image_ids, ids).to(torch.int8)

    def closes_image(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T) bool: which end an image the model drew."""
        if self.image_end_ids is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        return _member(self.image_end_ids, ids)

    def images(self, modality_row: torch.Tensor) -> list[tuple[int, int]]:
        """(start, length) of each image in one row's modality vector: maximal runs of VISION,
        split into images of `tokens_per_image` when a run holds several back to back."""
        out = []
        is_vis = (modality_row == VISION).tolist()
        t, n = 0, len(is_vis)
        while t < n:
            if not is_vis[t]:
                t += 1
                continue
            end = t
            while end < n and is_vis[end]:
                end += 1
            length = end - t
            per = self.tokens_per_image
            if per and length % per == 0 and not self.is_one_image(length):
                out += [(s, per) for s in range(t, end, per)]
            else:
                out.append((t, length))
            t = end
        return out

    def image_grids(self, length: int) -> list[torch.Tensor]:
        """Grids (offsets, on the lookup's device) of one image of `length` tokens; a run of unknown
        layout is one 1×n row."""
        if self.tokens_per_image == length and self.grids:
            return self.grids
        return _square(length, self.image_ids.device)

    def is_one_image(self, length: int) -> bool:
        """Whether a run of `length` tokens is one image even where it divides into `tokens_per_image`."""
        return False

    def watch(self) -> list[RemovableHandle]:
        """Hooks that read image layouts off the model's inputs (none for most models); a press
        session installs them for as long as it is applied."""
        return []


@dataclass
class Phi4ModalitySpec(ModalitySpec):
    """Phi-4-MM's layout: see the module docstring. `grids` are a one-crop image's."""

    image_embedding: torch.nn.Module | None = None
    """The model's `Phi4MultimodalImageEmbedding`, whose inputs `watch` reads."""
    crop_size: int = 448
    feature_side: int = 16
    """b: pooled features per crop side."""
    seen: dict[int, list[torch.Tensor] | None] = field(default_factory=dict)
    """Run length → grids of the images of the last embedded batch (None: two of them had that
    length but different grids)."""

    def watch(self) -> list[RemovableHandle]:
        if self.image_embedding is None:
            return []
        return [self.image_embedding.register_forward_pre_hook(self._read_layouts, with_kwargs=True)]

    def _read_layouts(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        sizes, mask = kwargs.get("image_sizes"), kwargs.get("image_attention_mask")
        self.seen = {}
        if sizes is None or mask is None:
            return
        b = self.feature_side
        for rows, cols in hd_layouts(sizes, mask, self.crop_size):
            length = layout_tokens((rows, cols), b)
            grids = phi4_image_grids(rows, cols, b, self.image_ids.device)
            if length in self.seen and (self.seen[length] is None or self.seen[length][0].shape != grids[0].shape):
                grids = None  # two images of this length, two grids: the length cannot say which
            self.seen[length] = grids

    def image_grids(self, length: int) -> list[torch.Tensor]:
        grids = self.seen.get(length)
        if grids is not None:
            return grids
        if length == self.tokens_per_image:
            return self.grids
        b = self.feature_side
        if length > b * (b + 1) + 1:  # an image whose grid was not seen: its global view ends it
            return [_rows_with_separators(b, b, length - b * (b + 1), self.image_ids.device)]
        return _square(length, self.image_ids.device)  # a HiCo clip: g×g

    def is_one_image(self, length: int) -> bool:
        return length in self.seen


def phi4_image_grids(rows: int, cols: int, b: int, device: torch.device) -> list[torch.Tensor]:
    """Offsets of a Phi-4-MM image's HD grid (rows × cols) and global view (b×b), each row followed by
    a separator, one separator between them."""
    return [_rows_with_separators(rows, cols, 0, device), _rows_with_separators(b, b, rows * (cols + 1) + 1, device)]


def _rows_with_separators(h: int, w: int, start: int, device: torch.device) -> torch.Tensor:
    """(h, w) offsets of a grid laid out from `start` row by row, each row followed by one other token."""
    return start + torch.arange(h, device=device).view(h, 1) * (w + 1) + torch.arange(w, device=device).view(1, w)


def _square(n: int, device: torch.device) -> list[torch.Tensor]:
    side = math.isqrt(n)
    offsets = torch.arange(n, device=device)
    return [offsets.view(side, side)] if side * side == n else [offsets.view(1, n)]


def _member(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids → (B, T) bool: `table[id]`, False for ids outside it."""
    lookup = table.to(ids.device)
    inside = (ids >= 0) & (ids < lookup.numel())
    out = torch.zeros_like(ids, dtype=torch.bool)
    out[inside] = lookup[ids[inside]]
    return out


def _lookup(vocab: int, ids: list[int], device: torch.device) -> torch.Tensor:
    table = torch.zeros(vocab, dtype=torch.bool, device=device)
    ids = [i for i in ids if i is not None and 0 <= i < vocab]
    if ids:
        table[torch.tensor(ids, device=device)] = True
    return table


def modality_spec(model: torch.nn.Module) -> ModalitySpec:
    """The image-token layout of `model` (one of the three families, or any model whose config
    names an `image_token_id`)."""
    config = model.config
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    name = type(model).__name__
    if "InternVL" in name:
        n = config.image_seq_length
        return ModalitySpec(_lookup(vocab, [config.image_token_id], device), n, _square(n, device))
    if "Chameleon" in name or "Anole" in name:
        mapping = model.model.vocabulary_mapping
        vq = config.vq_config
        side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
        ids = list(mapping.image_tokens) + [mapping.image_token_id]
        return ModalitySpec(_lookup(vocab, ids, device), side * side, _square(side * side, device),
                            image_end_ids=_lookup(vocab, [mapping.vocab_map.get(IMAGE_END)], device))
    if "Phi4Multimodal" in name:
        vision = config.vision_config
        patches = vision.image_size // vision.patch_size
        b = (patches + patches % 2) // 2
        return Phi4ModalitySpec(_lookup(vocab, [vision.image_token_id], device), layout_tokens((b, b), b),
                                phi4_image_grids(b, b, b, device),
                                image_embedding=model.model.embed_tokens_extend.image_embed,
                                crop_size=vision.crop_size, feature_side=b)
    token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{name}: cannot tell image tokens from text (no image_token_id in its config)")
    return ModalitySpec(_lookup(vocab, [token], device))
