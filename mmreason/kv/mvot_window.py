"""MVoT's own context policy as a press (Li et al. 2025, "Imagine while Reasoning in Space:
Multimodal Visualization-of-Thought", arXiv 2501.07542): while the model reasons it draws the
state after each step (Anole writes `<racm3:break>`, the VQ codes, `<eoss>`), and MVoT keeps only
the initial image and the latest drawn one in context — in training and at inference.

Here that is a cache policy: the prompt's images and every text token stay; when a drawn image is
complete (its end marker is among a forward's tokens, `LayerCall.closed_images`), the entries of
the drawn images before the `latest` ones are dropped from every layer, per row. The markers
around a dropped image are text and stay. The cache shrinks by those entries (`KVMeter` reads the
tensors' own bytes), so it holds the prompt, the text so far and `latest` drawn images, whatever
the number of steps. A family that cannot draw (no end marker) is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmreason.config import ConfigError
from mmreason.kv.base import LayerCall, Press
from mmreason.kv.modality import VISION


@dataclass
class MvotWindowPress(Press):
    latest: int = 1
    """Drawn images kept once one is complete, the latest ones (MVoT: 1, beside the prompt's)."""

    def __post_init__(self) -> None:
        if self.latest < 1:
            raise ConfigError(f"latest must be >= 1 (MVoT keeps the latest drawn image), got {self.latest}")

    def compress(self, call: LayerCall) -> None:
        if call.prefill:
            return
        closed = call.closed_images()
        if not any(closed):
            return
        st = call.state
        col = st.col[:, 0]
        drawn = st.valid[:, 0] & (st.mod[:, 0] == VISION) & (col >= call.session.prompt_modality.shape[1])
        drop = torch.zeros_like(drawn)
        for b, images in enumerate(closed):
            if not images:
                continue
            # the drawn images up to the one just completed, by their starting column
            last_end = int(col[b, images[-1][-1]])
            done = drawn[b] & (col[b] <= last_end)
            starts = done & ~_follows(col[b], done)
            kept_from = col[b][starts].sort().values[-self.latest:]
            if kept_from.numel():
                drop[b] = done & (col[b] < kept_from[0])
        call.keep(~drop)


def _follows(col: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(L,) whether each entry's column comes right after a member's: an image's tokens after its first."""
    return torch.isin(col - 1, col[member])
