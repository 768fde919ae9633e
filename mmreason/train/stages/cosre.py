"""The `cosre` stage: fine-tune the model under the CoSRe press it will decode with (seed 000's
compression, `mmreason.kv.cosre`) — teacher forcing over the compressed cache
(`mmreason.kv.training.compressed_forward`: the prompt's forward compresses it, the answer runs over
it in chunks that end where the press folds, every `cosre.every` tokens). Optional `distill`: KL to
the starting model reading the whole cache (KV-Distill). Evaluation decodes under the same press.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from mmreason.kv.training import compressed_forward
from mmreason.train.stages.sft import SFT


class Cosre(SFT):
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        press = self.cfg.cosre
        return compressed_forward(self.family, batch, press, press.every)

    def eval_session(self, family: Any, export_dir: Path | None = None) -> AbstractContextManager[Any]:
        return self.cfg.cosre(family)
