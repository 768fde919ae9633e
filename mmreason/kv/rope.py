"""Rotary position encoding on cached keys: undo it and redo it at other (possibly fractional)
positions, with the model's own rotary module — so partial rotation (Phi-4: 3/4 of each head),
attention scaling (long-RoPE) and each family's frequencies come out right without a copy of them.

Cached keys are stored *after* rotation: k' = k·cos(pθ) + rot½(k)·sin(pθ) on the first `rotary_dim`
channels. Mixing keys of different positions (CoSRe's DCT, HiCo's merges) is only meaningful on
the un-rotated k, so merging presses un-rotate at the old positions, merge, and re-rotate at the
merged entry's new position.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """Rotate / un-rotate (B, H, L, D) keys at (B, L) or (B, H, L) positions."""

    def __init__(self, rotary_emb: torch.nn.Module):
        self.rotary_emb = rotary_emb

    def cos_sin(self, keys: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable to `keys` (B, H, L, rotary_dim), computed in float32."""
        b, h, n, _ = keys.shape
        pos = positions.float()
        if pos.dim() == 2:
            pos = pos[:, None, :].expand(b, h, n)
        flat = pos.reshape(b * h, n)
        probe = torch.empty(0, dtype=torch.float32, device=keys.device)
        cos, sin = self.rotary_emb(probe, flat)  # the module's own frequencies and scaling
        return cos.view(b, h, n, -1).float(), sin.view(b, h, n, -1).float()

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(keys, positions)
        rd = cos.shape[-1]
        k = keys.float()
        rot = k[..., :rd] * cos + rotate_half(k[..., :rd]) * sin
        return torch.cat([rot, k[..., rd:]], dim=-1).to(keys.dtype)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The inverse of `rotate`: k = (k'·cos − rot½(k')·sin) / (cos² + sin²); the denominator is
        the square of the rotary module's attention scaling (1 for plain RoPE)."""
        cos, sin = self.cos_sin(keys, positions)
        rd = cos.shape[-1]
        k = keys.float()
        rot = (k[..., :rd] * cos - rotate_half(k[..., :rd]) * sin) / (cos * cos + sin * sin)
        return torch.cat([rot, k[..., rd:]], dim=-1).to(keys.dtype)
