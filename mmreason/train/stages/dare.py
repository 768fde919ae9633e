"""The `dare` stage (recipe `Dare`): train DARE's per-modality routers (seed 002; `mmreason.kv.dare`) on a `cot` or
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

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmreason.config import ConfigError
from mmreason.kv.dare import DarePress, DareRouter, anneal_temperature, save_router
from mmreason.kv.modality import TEXT, VISION
from mmreason.models.base import IGNORE
from mmreason.train.stages.sft import SFT

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

    router_fit: Literal["none", "knockout"] = "none"
    """How the router learns. "none": during the stage, with the backbone (straight-through
    gradients of the masks, plus `importance_weight`). "knockout": before the stage, fitted to
    each token's measured necessity — how much the answer's loss rises on `fit_rows` training rows
    of the starting model when decoding evicts that token (`knockout_importance`) — then frozen,
    with what computes its input (`freeze_router_input`: embeddings, layers below `layer`, the
    image encoder when rho_vis < 1), while the rest of the backbone learns to answer under its
    masks. Needs `masks: decode` and `backbone: full`."""
    fit_rows: int = 256
    """router_fit knockout: training rows measured (each costs ~its length in forwards)."""
    fit_epochs: int = 200
    """router_fit knockout: passes over the measured rows when fitting the router."""

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
        if self.router_fit not in ("none", "knockout"):
            raise ConfigError(f"dare.router_fit must be 'none' or 'knockout', got {self.router_fit!r}")
        if self.router_fit == "knockout":
            if self.masks != "decode" or self.backbone != "full" or self.importance_weight:
                raise ConfigError("dare.router_fit=knockout fits the router before the stage to what decoding's "
                                  "evictions cost and freezes it: it needs dare.masks=decode, dare.backbone=full "
                                  f"and no dare.importance_weight (got masks={self.masks!r}, "
                                  f"backbone={self.backbone!r}, importance_weight={self.importance_weight})")
            if self.fit_rows < 1 or self.fit_epochs < 1:
                raise ConfigError(f"dare.fit_rows and dare.fit_epochs must be >= 1, got {self.fit_rows}, "
                                  f"{self.fit_epochs}")

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
    if cfg.router_fit == "knockout":
        freeze_router_input(family.model, cfg.layer, images=cfg.rho_vis < 1.0)
    press = cfg.press()
    press.router = router
    return DareTrainee(family.model, router), press


def freeze_router_input(model: nn.Module, layer: int, images: bool = True) -> None:
    """Freeze what computes the hidden state a router at decoder layer `layer` reads — input
    embeddings, decoder layers below `layer` and, when images are routed (`images`), the image
    encoder and projector — so a router fitted before training keeps seeing what it was fitted on
    (with images kept whole their encoder stays trainable: no router decision reads it). Decoder
    layers from `layer` on, the final norm and an untied output head stay trainable; what was
    frozen before (Anole's VQ-VAE) stays frozen."""
    decoder, embeddings = model.get_decoder(), model.get_input_embeddings()
    trainable = [p.requires_grad for p in model.parameters()]
    keep = [*decoder.layers[layer:], decoder.norm]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        keep.append(head)
    if images:
        model.requires_grad_(False)
    else:  # everything outside the language model (the image side) stays as it was
        decoder.requires_grad_(False)
        embeddings.requires_grad_(False)
    for module in keep:
        module.requires_grad_(True)
    for p, was in zip(model.parameters(), trainable):
        p.requires_grad_(p.requires_grad and was)


@dataclass
class Knockout:
    """One row's knockout measurement: the router's input at its layer (T, d), each token's
    modality (T,), which tokens decoding could evict and were measured (T,) bool, and the rise of
    the row's answer loss (summed NLL, nats, clamped at 0) when decoding evicts that token alone (T,)."""

    hidden: torch.Tensor
    modality: torch.Tensor
    measured: torch.Tensor
    rise: torch.Tensor


@torch.no_grad()
def knockout_importance(family: Any, rows: list[dict], layer: int, window: int, chunk: int = 64) -> list[Knockout]:
    """For each row (teacher-forced `cot` target): per text / image token j, the answer's loss with
    j evicted as decoding would evict it — hidden, from layer `layer` on, from every answer query
    at least max(window, 1) tokens later (the prompt's own forward sees it) — minus the loss with
    nothing evicted. One forward of the row, then its measurable tokens in copies of `chunk` rows
    (cost ~ T forwards of a T-token row)."""
    import torch.nn.functional as F

    from mmreason.kv.dare import EvictionProbe
    from mmreason.latent.coconut import latent_forward

    def answer_nll(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _, logits = latent_forward(family, batch)
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], ignore_index=IGNORE,
                               reduction="none").sum(1)

    probe, out = EvictionProbe(layer=layer), []
    with probe(family):
        for row in rows:
            encoded = family.encode(row)
            base = family.collate([encoded])
            t, prompt = base["input_ids"].shape[1], encoded.prompt_len
            probe.visible = None
            base_nll = answer_nll(base)[0]
            hidden, modality, _ = probe.inputs
            modality = modality[0].long()
            device = base["input_ids"].device  # the model's: collate puts batches there
            q = torch.arange(t, device=device)
            first_hidden = torch.clamp(q + max(window, 1), min=prompt)  # first query that loses key j
            measured = ((modality == TEXT) | (modality == VISION)) & (first_hidden <= t - 2)
            rise = torch.zeros(t, device=device)
            keys = measured.nonzero().flatten()
            for i in range(0, len(keys), chunk):
                part = keys[i : i + chunk]
                batch = family.collate([encoded] * len(part))
                visible = torch.ones(len(part), t, t, device=device)
                hide = q[None, :] >= first_hidden[part][:, None]  # (n, query)
                visible[torch.arange(len(part), device=device)[:, None], q[None, :], part[:, None]] = (~hide).float()
                probe.visible = visible
                rise[part] = (answer_nll(batch) - base_nll).clamp(min=0).float()
            out.append(Knockout(hidden[0].float().cpu().clone(), modality.cpu(), measured.cpu(), rise.cpu()))
    probe.visible = None
    return out


IMPORTANCE_FLOOR = 1e-2
"""The router is fitted to log(rise + floor): rises below ~0.01 nats rank as equally unneeded."""


def fit_router(router: DareRouter, records: list[Knockout], epochs: int, lr: float = 3e-3, batch_size: int = 32,
               seed: int = 0) -> float:
    """Fit the router's logits to log(knockout rise + `IMPORTANCE_FLOOR`) over the measured tokens
    (mean squared error, Adam); returns the last epoch's mean loss. Only the ranking within each
    modality matters to top-k."""
    if not records:
        raise ValueError("fit_router: no knockout measurements")
    n, t = len(records), max(r.hidden.shape[0] for r in records)
    hidden = torch.zeros(n, t, records[0].hidden.shape[1])
    modality = torch.full((n, t), -1, dtype=torch.long)
    measured = torch.zeros(n, t, dtype=torch.bool)
    target = torch.zeros(n, t)
    for i, r in enumerate(records):
        k = r.hidden.shape[0]
        hidden[i, :k], modality[i, :k], measured[i, :k] = r.hidden, r.modality, r.measured
        target[i, :k] = (r.rise + IMPORTANCE_FLOOR).log()
    valid = modality >= 0
    device = next(router.parameters()).device  # measurements are gathered on the CPU; the router may sit on a GPU
    hidden, modality, valid, measured, target = (x.to(device) for x in (hidden, modality, valid, measured, target))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    for _ in range(epochs):
        total, batches = 0.0, 0
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            idx = idx.to(device)
            logits = router(hidden[idx], modality[idx].clamp(min=0), valid[idx])
            loss = ((logits.float() - target[idx]) ** 2)[measured[idx]].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
    return total / batches


def fit_router_by_knockout(family: Any, router: DareRouter, rows: list[dict], cfg: DareStageConfig, rank: int = 0,
                           world: int = 1, seed: int = 0) -> dict[str, float]:
    """`router_fit: knockout` before the stage's first step: each worker measures its share of
    `rows` (`knockout_importance`), the measurements are gathered, rank 0 fits the router
    (`fit_router`) and every worker loads rank 0's weights. Returns the fit's metrics."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    records = knockout_importance(family, rows[rank::world], cfg.layer, cfg.window)
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    measured = time.perf_counter() - t0
    loss = fit_router(router, records, cfg.fit_epochs, seed=seed) if rank == 0 else 0.0
    if distributed:
        shared = [router.state_dict() if rank == 0 else None, loss]
        dist.broadcast_object_list(shared, src=0)
        router.load_state_dict(shared[0])
        loss = shared[1]
    return {"dare_fit_loss": loss, "dare_fit_rows": float(len(records)), "dare_fit_measure_s": measured,
            "dare_fit_s": time.perf_counter() - t0}


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


class Dare(SFT):
    """The stage's recipe: the SFT step under the router's `DarePress` (its hooks on for the whole
    stage), the ratio (and importance) loss added, the temperature annealed per optimizer step."""

    def __init__(self, cfg, family, env, reference=None):
        super().__init__(cfg, family, env, reference)
        # before the optimizer exists: it decides what is frozen (a knockout-fitted router's input)
        self.trainee, self.press = build_trainee(family, cfg.dare)
        self.trainee.router.to(env.device)

    @property
    def module(self) -> nn.Module:
        return self.trainee

    def prepare(self, resumed: bool, fit_rows: list[dict]) -> dict[str, float]:
        cfg, router = self.cfg, self.trainee.router
        if cfg.dare.router_fit != "knockout":
            return {}
        metrics = {}
        if not resumed:  # a resumed run loads the fitted router with its state
            metrics = fit_router_by_knockout(self.family, router, fit_rows, cfg.dare, self.env.rank, self.env.world,
                                             cfg.seed)
        router.requires_grad_(False)
        return metrics

    def session(self):
        return self.press(self.family)

    def before_forward(self, batch: dict[str, torch.Tensor], step: int, total: int) -> None:
        self.press.pop_masks()  # a recomputed (activation-checkpointed) forward records its masks again
        self.press.importance = []
        set_temperature(self.press, self.cfg.dare, step, total)
        set_batch(self.press, batch)

    def auxiliary(self, loss: torch.Tensor, metrics: dict[str, list[float]]) -> torch.Tensor:
        loss, parts = dare_loss(self.press, loss, self.cfg.dare)
        for key, value in parts.items():  # ratio, importance
            metrics[f"dare_{key}_loss"].append(value)
        return loss

    def epoch_metrics(self, eval_rows: list[dict]) -> dict[str, float]:
        size = self.cfg.eval.batch_size
        batches = [self.family.collate([self.family.encode(r) for r in eval_rows[i : i + size]])
                   for i in range(0, len(eval_rows), size)]
        rates = held_out_keep_rates(self.family, self.press, batches)
        self.trainee.router.eval()  # evaluation decodes with the cache pruned by top-k
        return {"dare_keep_text": rates["text"], "dare_keep_vision": rates["vision"]}

    def eval_session(self, family: Any, export_dir: Path | None = None):
        if family is self.family:
            return nullcontext()  # the stage's press is on, its router in eval mode
        return self.cfg.dare.press(str(export_dir / ROUTER_FILE))(family)

    def export_extras(self, out_dir: Path) -> None:
        save_router(self.trainee.router, out_dir / ROUTER_FILE)


__all__ = ["Dare", "DareStageConfig", "DareTrainee", "Knockout", "ROUTER_FILE", "build_trainee", "dare_loss", "fit_router",
           "fit_router_by_knockout", "freeze_router_input", "held_out_keep_rates", "keep_rates", "knockout_importance",
           "save_router", "set_batch", "set_temperature"]
