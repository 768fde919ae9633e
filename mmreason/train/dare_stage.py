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
    router_context: int = 1
    """The router reads each token with the `router_context` − 1 before it (1 = the token alone)."""
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
    window: int = 0
    """The latest `window` entries are always kept (`DarePress.window`); the router ranks the rest."""
    importance_weight: float = 0.0
    """Weight of the router's importance loss (`DarePress.importance_loss`: its logits fitted to the
    log of the attention each token gets from later queries, nothing dropped) — a dense signal
    next to the straight-through gradient hard top-k masks pass; 0 = off. Needs the row in one
    forward (not coconut's latent passes)."""

    def __post_init__(self) -> None:
        for name in ("rho_text", "rho_vis"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"dare.{name} must be in (0, 1], got {value}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"dare: need 0 < tau_end <= tau_start, got {self.tau_start} → {self.tau_end}")
        if self.window < 0:
            raise ConfigError(f"dare.window must be >= 0, got {self.window}")
        if self.window and self.masks != "decode":
            raise ConfigError(f"dare.window: only dare.masks=decode trains with the recent window inference keeps "
                              f"(got masks={self.masks!r})")
        if self.router_context < 1:
            raise ConfigError(f"dare.router_context must be >= 1, got {self.router_context}")
        if self.importance_weight < 0:
            raise ConfigError(f"dare.importance_weight must be >= 0, got {self.importance_weight}")

    def press(self, router_path: str | None = None) -> DarePress:
        return DarePress(rho_text=self.rho_text, rho_vis=self.rho_vis, layer=self.layer,
                         router_width=self.router_width,
                         router_context=self.router_context, router_path=router_path, train_masks=self.masks,
                         window=self.window, learn_importance=self.importance_weight > 0)


class DareTrainee(nn.Module):
    """Backbone + router as one module, so DeepSpeed reduces and checkpoints the router's gradients
    and state with the model's; `model` stays the family's own object (exports save it alone)."""

    def __init__(self, model: nn.Module, router: DareRouter):
        super().__init__()
        self.model, self.router = model, router


def build_trainee(family: Any, cfg: DareStageConfig) -> tuple[DareTrainee, DarePress]:
    router = DareRouter(family.model.config.get_text_config().hidden_size, cfg.router_width,
                        cfg.router_context).train()
    if cfg.backbone == "frozen":
        family.model.requires_grad_(False)
    press = cfg.press()
    press.router = router
    return DareTrainee(family.model, router), press


def dare_loss(press: DarePress, lm_loss: torch.Tensor, cfg: DareStageConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """LM loss + weighted ratio loss (+ weighted importance loss) of the forwards since the last
    call; returns (loss, {"ratio": …, "importance": …})."""
    ratio = press.ratio_loss()
    loss, parts = lm_loss + cfg.ratio_weight * ratio, {"ratio": float(ratio.detach())}
    if cfg.importance_weight > 0:
        importance = press.importance_loss()
        loss = loss + cfg.importance_weight * importance
        parts["importance"] = float(importance.detach())
    return loss, parts


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
        press.importance = []
    # Gumbel masks keep sigmoid(logit) on average; top-k masks keep exactly what they keep
    return keep_rates(masks if press.train_masks == "gumbel" else applied)


__all__ = ["DareStageConfig", "DareTrainee", "ROUTER_FILE", "build_trainee", "dare_loss", "held_out_keep_rates",
           "keep_rates", "save_router", "set_batch", "set_temperature"]
