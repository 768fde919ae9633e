"""Which cached positions are image (or video-frame) tokens, and how each image's tokens lie on a grid.

Derived from the model alone, so a press works on `family.model` or on any model of the three
families loaded by hand:

- InternVL (`internvl3-1b`, `tiny-internvl`): `config.image_token_id` × `image_seq_length`, a square
  grid of pixel-shuffled patch features.
- Anole / Chameleon: every VQ code token of the vocabulary (`vocabulary_mapping.image_tokens`) and
  the `<image>` placeholder; one image is a square grid of codes (resolution / 2^(levels−1) per side).
- Phi-4-multimodal: `vision_config.image_token_id`; a one-crop image is the HD crop (b rows of b
  features + a row separator), one separator, then the global view laid out the same way
  (`Phi4MultimodalImageEmbedding`): two b×b grids, separators left outside both.

A family hook (`Family.image_grids()`) would say the same thing at the source; the models package
is not ours to edit, so the layout is read off the config here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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

    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T) int8 modality (TEXT or VISION)."""
        lookup = self.image_ids.to(ids.device)
        inside = (ids >= 0) & (ids < lookup.numel())
        is_image = torch.zeros_like(ids, dtype=torch.bool)
        is_image[inside] = lookup[ids[inside]]
        return is_image.to(torch.int8)

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
            if per and length % per == 0:
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


def _square(n: int, device: torch.device) -> list[torch.Tensor]:
    side = math.isqrt(n)
    offsets = torch.arange(n, device=device)
    return [offsets.view(side, side)] if side * side == n else [offsets.view(1, n)]


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
        return ModalitySpec(_lookup(vocab, ids, device), side * side, _square(side * side, device))
    if "Phi4Multimodal" in name:
        vision = config.vision_config
        patches = vision.image_size // vision.patch_size
        b = (patches + patches % 2) // 2
        side = torch.arange(b, device=device)
        row = side.view(b, 1) * (b + 1) + side.view(1, b)
        crop, glb = row, row + b * (b + 1) + 1
        return ModalitySpec(_lookup(vocab, [vision.image_token_id], device), 2 * b * (b + 1) + 1, [crop, glb])
    token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{name}: cannot tell image tokens from text (no image_token_id in its config)")
    return ModalitySpec(_lookup(vocab, [token], device))
