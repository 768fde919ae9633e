"""TOVA — Token Omission Via Attention (Oren et al. 2024, arXiv 2401.06104).

Per layer, score every cached entry by the current query's softmax attention averaged over heads
and keep the top `budget` in original order — after the prompt and again at every decode step
(the newest token competes like any other). Dynamic cache sizing (seed 004): budget =
clamp(factor × tokens seen, min_size, max_size), or a fixed `cache_size`. Optional importance
mixing (seed 004's "entropy" and "recency" signals), each term scaled to [0, 1] per row:

    score = (1 − e − r)·mean_h a_h + e·Σ_h w_h a_h + r·recency,   w_h ∝ 1 − H(a_h)/log n

where sharper heads (low attention entropy H) count more and recency runs 0 (oldest) → 1
(newest). With e = r = 0 the ranking is TOVA's. `vision_factor` gives image tokens their own
budget (at most vision_factor × image tokens seen); text gets the rest of the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmreason.config import ConfigError
from mmreason.kv.base import LayerCall, ScorePress, check_fraction, clamp_budget
from mmreason.kv.modality import TEXT, VISION


def _unit(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scale each row to [0, 1] by its max over valid entries."""
    top = x.masked_fill(~valid, 0).amax(-1, keepdim=True).clamp(min=1e-12)
    return x / top


@dataclass
class TovaPress(ScorePress):
    cache_size: int | None = None
    """Fixed entries kept per layer and row; None = dynamic size from `factor`."""
    factor: float = 0.5
    """Dynamic size: keep clamp(round(factor × tokens seen), min_size, max_size)."""
    min_size: int = 16
    max_size: int | None = None
    vision_factor: float | None = None
    """Own budget for image tokens: at most round(vision_factor × image tokens seen)."""
    entropy_weight: float = 0.0
    """Weight of the entropy-weighted head average (sharper heads count more)."""
    recency_weight: float = 0.0
    """Weight of recency (newest entry 1, oldest 0)."""

    wants_attention = True

    def __post_init__(self) -> None:
        check_fraction("factor", self.factor)
        if self.vision_factor is not None:
            check_fraction("vision_factor", self.vision_factor)
        if self.cache_size is not None and self.cache_size < 1:
            raise ConfigError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.min_size < 1 or (self.max_size is not None and self.max_size < self.min_size):
            raise ConfigError(f"need 1 <= min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")
        if self.entropy_weight < 0 or self.recency_weight < 0 or self.entropy_weight + self.recency_weight > 1:
            raise ConfigError("entropy_weight and recency_weight must be >= 0 with a sum <= 1, got "
                              f"{self.entropy_weight} and {self.recency_weight}")

    def keeps_everything(self) -> bool:
        return (self.cache_size is None and self.factor == 1.0 and self.max_size is None
                and self.vision_factor in (None, 1.0))

    def score(self, call: LayerCall) -> torch.Tensor:
        attn = call.attention()[:, :, 0]  # (B, H_q, L)
        valid = call.state.valid[:, 0]  # TOVA keeps the same entries in every head
        score = attn.mean(1)
        e, r = self.entropy_weight, self.recency_weight
        if e == 0 and r == 0:
            return score
        mixed = (1 - e - r) * _unit(score, valid)
        if e > 0:
            n = valid.sum(-1, keepdim=True).clamp(min=2).float()
            entropy = -(attn * attn.clamp(min=1e-12).log()).sum(-1)  # (B, H_q)
            sharp = (1 - entropy / n.log()).clamp(min=0) + 1e-6
            weights = sharp / sharp.sum(-1, keepdim=True)
            mixed = mixed + e * _unit((weights[..., None] * attn).sum(1), valid)
        if r > 0:
            pos = call.state.pos[:, 0]
            lo = pos.masked_fill(~valid, math.inf).amin(-1, keepdim=True)
            hi = pos.masked_fill(~valid, -math.inf).amax(-1, keepdim=True)
            mixed = mixed + r * ((pos - lo) / (hi - lo).clamp(min=1e-6))
        return mixed

    def budget(self, call: LayerCall) -> dict:
        seen = call.session.seen_by_mod  # (B, 2) valid tokens seen per modality
        length = seen.sum(1)
        if self.cache_size is not None:
            total = torch.minimum(torch.full_like(length, self.cache_size), length)
        else:
            total = clamp_budget(self.factor, length, self.min_size, self.max_size)
        if self.vision_factor is None:
            return {None: total}
        st = call.state
        k_vis = torch.minimum(torch.round(seen[:, 1].float() * self.vision_factor).long(), total)
        in_cache = ((st.mod[:, 0] == VISION) & st.valid[:, 0]).sum(-1)
        return {VISION: k_vis, TEXT: total - torch.minimum(k_vis, in_cache)}

    def budget_modalities(self) -> tuple[int, ...]:
        return (TEXT, VISION) if self.vision_factor is not None else super().budget_modalities()
