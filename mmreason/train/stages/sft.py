"""Supervised fine-tuning: `cot` (chain-of-thought SFT, MVoT's visual thoughts when enabled) and
`coconut` (the CoCoNuT curriculum: per epoch a stage, its latents in place of the first steps;
arXiv 2412.06769; `coconut.thought` picks what is in their place: latent thoughts, or the pause-token
or no-thought control). The `dare` and `cosre` stages are this recipe with the forward run under a press.

Gradient accumulation is exact for the language-model loss: each micro-batch's summed token loss
is divided by the tokens of the whole window, so `grad_accum` micro-batches of b rows give the
gradient one batch of grad_accum·b rows would (DeepSpeed divides by grad_accum; we multiply it back).
Auxiliary terms (visual-token discrepancy, distillation, the dare ratio loss) are micro-batch means,
averaged over the window.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import torch

from mmreason.latent.coconut import latent_forward
from mmreason.models.base import IGNORE
from mmreason.train.stages.base import EvalPlan, Recipe


def encode_batch(family: Any, rows: list[dict], cfg: Any, epoch: int, rng: random.Random) -> dict:
    """Rows → a padded training batch at this epoch's curriculum stage, with what `family.thought`
    puts in place of the replaced steps (the coconut stage sets it to `coconut.thought`)."""
    items, sched = [], cfg.coconut
    for row in rows:
        stage = sched.row_stage(epoch, rng) if cfg.stage == "coconut" else 0
        target = "latent" if stage > 0 else "cot"
        items.append(family.encode(row, target, sched.latent_steps(stage), sched.c_thought,
                                   visual_thoughts=cfg.visual_thoughts.enabled,
                                   replaced_steps=sched.replaced_steps(stage, len(row["steps"]))))
    return family.collate(items, align_latents=True)


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the language-model loss reads (shifted labels that are not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class SFT(Recipe):
    """cot / coconut: teacher-forced cross-entropy over the reply (latents are inputs, not targets)."""

    def __init__(self, cfg, family, env, reference=None):
        super().__init__(cfg, family, env)
        self.reference = reference  # distill's teacher: the starting model, reading the whole cache
        if cfg.stage == "coconut":  # kept in the model's config: exports evaluate with the same thoughts
            family.thought = cfg.coconut.thought

    def begin_epoch(self, engine: Any, epoch: int, start_epoch: int) -> None:
        super().begin_epoch(engine, epoch, start_epoch)
        sched = self.cfg.coconut
        if self.cfg.stage == "coconut" and self.cfg.reset_optimizer and epoch > start_epoch \
                and sched.stage(epoch) != sched.stage(epoch - 1):
            reset_optimizer_state(engine)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean token loss, logits) of a batch; the dare and cosre stages run it under their press."""
        return latent_forward(self.family, batch)

    def before_forward(self, batch: dict[str, torch.Tensor], step: int, total: int) -> None:
        """Per-batch state a press needs (dare)."""

    def auxiliary(self, loss: torch.Tensor, metrics: dict[str, list[float]]) -> torch.Tensor:
        """Terms added after the forward (dare's ratio loss)."""
        return loss

    def train_step(self, engine: Any, window: list[list[dict]], step: int, total: int) -> dict[str, float]:
        cfg, epoch = self.cfg, self.epoch
        batches = [encode_batch(self.family, rows, cfg, epoch, self.rng) for rows in window]
        tokens = [answer_tokens(b) for b in batches]
        total_tokens = max(1, sum(tokens))
        lm_total, parts = 0.0, defaultdict(list)
        for batch, n in zip(batches, tokens):
            self.before_forward(batch, step, total)
            lm, logits = self.forward(batch)
            lm_total += float(lm.detach()) * n
            loss = lm * (n * len(batches) / total_tokens)  # exact accumulation: see the module docstring
            if cfg.distill:  # the starting model reads the whole cache
                from mmreason.kv.training import distillation

                with torch.no_grad():
                    _, teacher_logits = latent_forward(self.reference, batch)
                kl = distillation(logits, teacher_logits, batch["labels"])
                loss = loss + cfg.distill * kl
                parts["distill_kl"].append(float(kl.detach()))
            if cfg.visual_thoughts.enabled:  # MVoT: near-miss image codes cost less than far ones
                discrepancy = self.family.visual_token_discrepancy(logits, batch["labels"])
                loss = loss + cfg.visual_thoughts.discrepancy_weight * discrepancy
                parts["visual_discrepancy"].append(float(discrepancy.detach()))
            loss = self.auxiliary(loss, parts)
            engine.backward(loss)
            engine.step()
        return {"loss": lm_total / total_tokens, **{k: sum(v) / len(v) for k, v in parts.items()}}

    def eval_plan(self, epoch: int) -> EvalPlan:
        cfg = self.cfg
        stage = cfg.coconut.stage(epoch) if cfg.stage == "coconut" else 0
        mode = "coconut" if stage > 0 else "cot"
        settings = cfg.eval.modes.get(mode) or cfg.eval.modes.get("cot") or next(iter(cfg.eval.modes.values()))
        return EvalPlan(mode, cfg.coconut.latent_steps(stage), settings)


def reset_optimizer_state(engine: Any) -> None:
    """CoCoNuT resets the optimizer between curriculum stages; clear AdamW's moments in place."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.state = defaultdict(dict)
