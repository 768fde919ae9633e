"""The `dare` stage: train DARE's per-modality routers (seed 002; `mmreason.kv.dare`) on a `cot` or
`coconut` checkpoint, with the backbone frozen (default) or trained along.

Each training step runs the usual (latent) forward under a `DarePress` whose router is in training
mode: from `layer` on, attention sees hard Gumbel-softmax keep masks (temperature annealed
`tau_start` → `tau_end`), so the loss reaches the router; the ratio loss pulls each modality's keep
rate to `rho_text` / `rho_vis`. At inference the same router keeps exactly round(ρ·n) entries per
modality by top-k, ranked by its logits — so the number to watch is the router's *own* expected
keep rate on held-out rows (`held_out_keep_rates`: mean keep probability), which must sit at the
targets.

LoRA is not offered: the tiny backbones have two layers, and the real ones train routers with the
backbone frozen or in full (Dynamic-LLaVA); `backbone: full` covers the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mmreason.config import ConfigError
from mmreason.kv.dare import DarePress, DareRouter, anneal_temperature, save_router
from mmreason.kv.modality import TEXT, VISION
from mmreason.models.base import IGNORE

ROUTER_FILE = "dare_router.pt"
"""Saved next to the stage's exported backbone; `DarePress(router_path=...)` loads it."""


@dataclass
class DareStageConfig:
    rho_text: float = 0.7
    """Target fraction of text KV entries kept."""
    rho_vis: float = 0.4
    """Target fraction of image KV entries kept."""
    layer: int = 1
    """Decoder layer whose attention input the router reads; it and deeper layers drop entries."""
    router_width: int = 64
    ratio_weight: float = 4.0
    """Weight of the per-modality ratio loss next to the language-model loss."""
    tau_start: float = 1.0
    tau_end: float = 0.1
    """Gumbel temperature, annealed exponentially over the stage's steps."""
    backbone: Literal["frozen", "full"] = "frozen"
    """Train only the routers, or the backbone too."""
    masks: Literal["gumbel", "topk", "decode"] = "gumbel"
    """Training keep masks (`DarePress.train_masks`): Gumbel + ratio loss, the whole row's top-k,
    or what decoding keeps query by query."""

    def __post_init__(self) -> None:
        for name in ("rho_text", "rho_vis"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"dare.{name} must be in (0, 1], got {value}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"dare: need 0 < tau_end <= tau_start, got {self.tau_start} → {self.tau_end}")

    def press(self, router_path: str | None = None) -> DarePress:
        return DarePress(rho_text=self.rho_text, rho_vis=self.rho_vis, layer=self.layer,
                         router_width=self.router_width, router_path=router_path, train_masks=self.masks)


class DareTrainee(nn.Module):
    """Backbone + router as one module, so DeepSpeed reduces and checkpoints the router's gradients
    and state with the model's; `model` stays the family's own object (exports save it alone)."""

    def __init__(self, model: nn.Module, router: DareRouter):
        super().__init__()
        self.model, self.router = model, router


def build_trainee(family: Any, cfg: DareStageConfig) -> tuple[DareTrainee, DarePress]:
    router = DareRouter(family.model.config.get_text_config().hidden_size, cfg.router_width).train()
    if cfg.backbone == "frozen":
        family.model.requires_grad_(False)
    press = cfg.press()
    press.router = router
    return DareTrainee(family.model, router), press


def dare_loss(press: DarePress, lm_loss: torch.Tensor, cfg: DareStageConfig) -> tuple[torch.Tensor, float]:
    """LM loss + weighted ratio loss of the forwards since the last call; returns (loss, ratio)."""
    ratio = press.ratio_loss()
    return lm_loss + cfg.ratio_weight * ratio, float(ratio.detach())


def set_temperature(press: DarePress, cfg: DareStageConfig, step: int, total: int) -> None:
    press.tau = anneal_temperature(step, total, cfg.tau_start, cfg.tau_end)


def set_batch(press: DarePress, batch: dict[str, torch.Tensor]) -> None:
    """What the press needs of the next training batch: its rows' prompt lengths (the first
    labelled position; `masks: decode` replays decoding from there)."""
    labelled = batch["labels"] != IGNORE
    press.prompt_lengths = torch.where(labelled.any(1), labelled.int().argmax(1), labelled.shape[1])


def keep_rates(masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Fraction of valid text / image tokens a list of router masks keeps."""
    kept = {TEXT: 0.0, VISION: 0.0}
    seen = {TEXT: 0.0, VISION: 0.0}
    for keep, modality, valid in masks:
        for m in kept:
            member = valid & (modality == m)
            kept[m] += float((keep.detach() * member).sum())
            seen[m] += float(member.sum())
    return {"text": kept[TEXT] / max(seen[TEXT], 1.0), "vision": kept[VISION] / max(seen[VISION], 1.0)}


@torch.no_grad()
def held_out_keep_rates(family: Any, press: DarePress, batches: list[dict]) -> dict[str, float]:
    """The router's keep rate per modality on held-out rows — with Gumbel masks the mean keep
    probability sigmoid(logit), what they keep on average; with `topk` / `decode` masks the
    fraction those masks keep (at the row's end). Rows collated without latents (one forward
    each); run inside the press's session."""
    from mmreason.latent.coconut import latent_forward

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = press.router.register_forward_hook(lambda _m, args, out: calls.append((out, args[1])))
    masks = []
    try:
        for batch in batches:
            calls.clear()
            set_batch(press, batch)
            latent_forward(family, batch)
            logits, modality = calls[0]
            masks.append((torch.sigmoid(logits.float()), modality, batch["attention_mask"].bool()))
    finally:
        handle.remove()
        applied = press.pop_masks()  # not training signal
    # Gumbel masks keep sigmoid(logit) on average; top-k masks keep exactly what they keep
    return keep_rates(masks if press.train_masks == "gumbel" else applied)


__all__ = ["DareStageConfig", "DareTrainee", "ROUTER_FILE", "build_trainee", "dare_loss", "held_out_keep_rates",
           "keep_rates", "save_router", "set_batch", "set_temperature"]
