"""GRPO (DeepSeekMath, arXiv 2402.03300) with rule rewards: the math of the `rl` stage.

One step on a batch of prompts:
1. `rollout`: sample `group_size` replies per prompt with the backbone's own batched, cached
   `generate` (cot mode: reasoning then answer; coconut mode: the prompt, `max_latent_stage`
   latent thoughts, then the answer) and score each with the configured rewards.
2. `group_advantages`: A = (r − mean of the prompt's group) / (std of the group + ε) (sample std,
   as verl and TRL; `scale_by_std: false` keeps only the mean, Dr. GRPO's variant).
3. `policy_loss`: PPO's clipped surrogate per reply token, −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)
   with ρ = π/π_old, plus `kl_coef` × KL(π‖π_ref) by the k3 estimator (exp(d) − d − 1,
   d = log π_ref − log π), averaged over tokens (`token-mean`, DAPO) or per reply first
   (`seq-mean-token-mean`, the GRPO paper).
With `updates_per_batch` = 1 (the default) π_old is the policy itself (ρ = 1, gradient of the plain
policy gradient); with more, π_old is fixed before the first update and the clip matters.

`grpo_step` runs the three on any engine with `backward(loss)` and `step()`: DeepSpeed's in the
Ray Train worker, `TorchEngine` in a plain process (tests, benchmarks).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmreason.config import ConfigError
from mmreason.latent.coconut import GenerationSettings, generate, latent_forward
from mmreason.models.base import IGNORE, Encoded, Family
from mmreason.train.rewards import RewardTerm, Rewards, check_terms
from mmreason.train.stages.base import EvalPlan, Recipe


def _default_sampling() -> GenerationSettings:
    return GenerationSettings(max_new_tokens=256, do_sample=True, temperature=1.0, top_p=1.0)


@dataclass
class RLConfig:
    group_size: int = 8
    """Replies sampled per prompt (GRPO's n); advantages are normalised within each group."""
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    """Reward terms by dotted path, summed with their weights (see mmreason.train.rewards)."""
    sampling: GenerationSettings = field(default_factory=_default_sampling)
    """How replies are sampled (do_sample must be true; temperature, top_p, max_new_tokens)."""
    mode: Literal["cot", "coconut"] = "cot"
    """cot: sample reasoning then answer; coconut: coconut.max_latent_stage latent steps, then the answer."""
    clip_eps: float = 0.2
    """PPO clip range below 1 (and above, unless clip_eps_high is set)."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO's clip-higher); None = clip_eps."""
    kl_coef: float = 0.0
    """Weight of KL(π‖π_ref) to the frozen starting model; 0 loads no reference model."""
    scale_by_std: bool = True
    """Divide advantages by the group's std (false: Dr. GRPO, mean-centred only)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """Average the per-token loss over all reply tokens, or per reply first."""
    updates_per_batch: int = 1
    """Optimizer steps per sampled batch (PPO epochs, μ)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size must be >= 2: GRPO normalises each reward against the other "
                              f"replies to the same prompt, got {self.group_size}")
        if not self.sampling.do_sample:
            raise ConfigError("rl.sampling.do_sample must be true: greedy replies to one prompt are all the same, "
                              "so every advantage would be 0")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ConfigError(f"rl.clip_eps and rl.clip_eps_high must be > 0, got {self.clip_eps}, {self.clip_eps_high}")
        if self.kl_coef < 0:
            raise ConfigError(f"rl.kl_coef must be >= 0, got {self.kl_coef}")
        if self.updates_per_batch < 1:
            raise ConfigError(f"rl.updates_per_batch must be >= 1, got {self.updates_per_batch}")
        check_terms(self.rewards)


# --- the math ------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(groups, n) rewards → (groups, n) advantages: minus the group mean, over the group's sample
    std + eps. A group whose replies all scored the same gets 0 everywhere."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, n >= 2), got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + eps)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token) of every labelled position: (B, T, V) logits and (B, T) labels (IGNORE where not a
    reply token) → (B, T−1) log-probs (0 where masked) and the (B, T−1) bool mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = picked - logits.logsumexp(-1)
    return logp * mask, mask


def sequence_logprobs(family: Family, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the reply tokens of `batch` under `family`'s model (latents included)."""
    _, logits = latent_forward(family, batch)
    return token_logprobs(logits, batch["labels"])


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    m = mask.float()
    if how == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if how == "seq-mean-token-mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq[m.sum(-1) > 0].mean() if bool((m.sum(-1) > 0).any()) else per_seq.sum() * 0
    raise ValueError(f"unknown loss aggregation {how!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, clip_eps_high: float | None = None, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0, agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss from (B, T) per-token log-probs under the policy, the sampling policy and
    (optionally) the reference, (B,) per-reply advantages and the (B, T) reply-token mask."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    adv = advantages[:, None].to(logp.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    n_tokens = mask.sum().clamp(min=1)
    stats = {"clip_frac": float(((clipped > unclipped) & mask).sum() / n_tokens)}  # ratios outside the range
    if ref_logp is not None and kl_coef > 0:
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
        stats["kl"] = float((kl.detach() * mask).sum() / n_tokens)
    loss = aggregate(per_token, mask, agg)
    stats["policy_loss"] = float(loss.detach())
    return loss, stats


# --- sampling and one step -----------------------------------------------------------------------------


@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]
    """Prompt + reply sequences (replies labelled, eos included unless truncated), collated."""
    rewards: torch.Tensor
    """(groups × n,) total reward per reply, group-major."""
    components: dict[str, torch.Tensor]
    lengths: torch.Tensor
    """Generated tokens per reply (eos not counted), as `tokens_per_answer` counts them."""
    truncated: torch.Tensor
    texts: list[str]


def rollout(family: Family, rows: list[dict[str, Any]], rl: RLConfig, rewards: Rewards,
            generator: torch.Generator | None = None, n_latent_steps: int = 0, c_thought: int = 1) -> Rollout:
    """Sample `rl.group_size` replies to every row and score them."""
    coconut = rl.mode == "coconut"
    target, n_steps = ("latent", n_latent_steps) if coconut else ("cot", 0)
    prompts = [family.encode(row, target, n_steps, c_thought, with_target=False) for row in rows]
    repeated = [p for p in prompts for _ in range(rl.group_size)]
    was_training = family.model.training
    family.model.eval()
    try:
        replies = generate(family, family.collate(repeated, pad_side="left"), n_steps * c_thought if coconut else 0,
                           rl.sampling, generator)
    finally:
        family.model.train(was_training)
    eos, budget = family.tokenizer.eos_token_id, rl.sampling.max_new_tokens
    # generate stops at eos (not returned) or at the budget. A reply that samples an input-only id
    # (an image slot, a latent) is cut just before it and counts as truncated: re-embedded in the
    # update, that id would be taken for an image or a thought (an untrained model does sample them).
    banned = family.input_only_ids()
    cut = [next((i for i, t in enumerate(r) if t in banned), None) for r in replies]
    truncated_flags = [c is not None or len(r) >= budget for r, c in zip(replies, cut)]
    replies = [r if c is None else r[:c] for r, c in zip(replies, cut)]
    items, texts, scores = [], [], []
    for g, row in enumerate(rows):
        group = replies[g * rl.group_size : (g + 1) * rl.group_size]
        lengths = [len(r) for r in group]
        meta = json.loads(row["meta"]) if isinstance(row["meta"], str) else dict(row["meta"])
        for j, reply in enumerate(group):
            prompt = prompts[g]
            truncated = truncated_flags[g * rl.group_size + j]
            tail = reply if truncated else reply + [eos]
            items.append(Encoded(prompt.input_ids + tail, prompt.labels + tail, prompt.images, prompt.n_latents,
                                 prompt.prompt_len))
            text = family.tokenizer.decode(reply, skip_special_tokens=False)
            texts.append(text)
            extra = {"meta": meta, "choices": list(row["choices"]), "length": len(reply), "truncated": truncated,
                     "max_new_tokens": budget, "group_lengths": lengths}
            scores.append(rewards.score(row["task"], text, row["answer"], extra))
    names = sorted({k for s in scores for k in s if k != "total"})
    batch = family.collate(items, align_latents=coconut)
    device = batch["input_ids"].device  # the model's (collate puts batches there): advantages meet log-probs
    return Rollout(
        batch=batch,
        rewards=torch.tensor([s["total"] for s in scores], device=device),
        components={k: torch.tensor([s.get(k, 0.0) for s in scores], device=device) for k in names},
        lengths=torch.tensor([len(r) for r in replies], dtype=torch.float, device=device),
        truncated=torch.tensor(truncated_flags, dtype=torch.float, device=device),
        texts=texts,
    )


class TorchEngine:
    """The two calls `grpo_step` makes of a DeepSpeed engine, for a plain model + optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@contextmanager
def whole_weights_for_sampling(engine: Any) -> Iterator[None]:
    """Under ZeRO-3 every forward gathers each layer's weights from all ranks, so ranks whose replies
    stop at different lengths would wait on each other forever. For the rollout, every rank gathers
    the full weights once and DeepSpeed's module hooks come off: each rank then samples as many
    tokens as its own replies need, with no collective; the hooks go back on before the update (as
    TRL's `unwrap_model_for_generation` does for its GRPO). Costs one full copy of the weights per
    rank while sampling. A no-op for other engines (ZeRO-0/1/2, `TorchEngine`)."""
    stage = getattr(engine, "zero_optimization_stage", None)
    if stage is None or stage() != 3:
        yield
        return
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for param in engine.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def grpo_step(engine: Any, family: Family, rows: list[dict[str, Any]], rl: RLConfig, rewards: Rewards,
              generator: torch.Generator | None = None, reference: Family | None = None, n_latent_steps: int = 0,
              c_thought: int = 1) -> dict[str, float]:
    """Sample, score, and update on one batch of prompt rows; returns the step's metrics (means over
    this worker's replies; `gen_seconds` / `update_seconds` split the wall time)."""
    t0 = time.perf_counter()
    with whole_weights_for_sampling(engine):
        ro = rollout(family, rows, rl, rewards, generator, n_latent_steps, c_thought)
    t1 = time.perf_counter()
    advantages = group_advantages(ro.rewards.view(len(rows), rl.group_size), rl.scale_by_std).flatten()
    old_logp = ref_logp = None
    if rl.updates_per_batch > 1:
        with torch.no_grad():
            old_logp, _ = sequence_logprobs(family, ro.batch)
    if reference is not None and rl.kl_coef > 0:
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(reference, ro.batch)
    stats: dict[str, float] = {}
    for _ in range(rl.updates_per_batch):
        logp, mask = sequence_logprobs(family, ro.batch)
        loss, stats = policy_loss(logp, logp.detach() if old_logp is None else old_logp, advantages, mask,
                                  rl.clip_eps, rl.clip_eps_high, ref_logp, rl.kl_coef, rl.loss_agg)
        engine.backward(loss)
        engine.step()
    t2 = time.perf_counter()
    groups = ro.rewards.view(len(rows), rl.group_size)
    metrics = {
        "loss": stats["policy_loss"], "reward_total": float(ro.rewards.mean()),
        **{f"reward_{k}": float(v.mean()) for k, v in ro.components.items()},
        "response_length": float(ro.lengths.mean()), "truncated_frac": float(ro.truncated.mean()),
        "flat_group_frac": float((groups.std(-1) == 0).float().mean()),
        "clip_frac": stats["clip_frac"], "samples": float(len(ro.texts)),
        "gen_seconds": t1 - t0, "update_seconds": t2 - t1,
    }
    if "kl" in stats:
        metrics["kl"] = stats["kl"]
    return metrics


class RL(Recipe):
    """The `rl` stage's recipe: one `grpo_step` per micro-batch of prompts (metrics averaged over the
    workers, logged every step as `rl_*`); with `grad_accum` > 1 the window's policy gradients add up
    to one optimizer step (so `updates_per_batch` must then be 1: see `TrainConfig`)."""

    metric_prefix = "rl_"

    def __init__(self, cfg, family, env, reference=None):
        super().__init__(cfg, family, env)
        self.rewards, self.reference = Rewards(cfg.rl.rewards), reference
        self.n_latent_steps = cfg.coconut.max_latent_stage if cfg.rl.mode == "coconut" else 0
        # sampling draws on the model's device, so its generator lives there too
        self.sampler = torch.Generator(device=env.device).manual_seed(cfg.seed * 1000 + env.rank)

    def train_step(self, engine: Any, window: list[list[dict]], step: int, total: int) -> dict[str, float]:
        from mmreason.train.stages.base import mean_over_workers

        parts = [mean_over_workers(grpo_step(engine, self.family, rows, self.cfg.rl, self.rewards, self.sampler,
                                             self.reference, self.n_latent_steps, self.cfg.coconut.c_thought))
                 for rows in window]
        return {k: sum(p[k] for p in parts) / (1 if k.endswith("seconds") else len(parts)) for k in parts[0]}

    def rows_per_prompt(self) -> int:
        return self.cfg.rl.group_size

    def eval_plan(self, epoch: int) -> EvalPlan:
        cfg = self.cfg
        settings = cfg.eval.modes.get(cfg.rl.mode) or cfg.eval.modes.get("cot") or next(iter(cfg.eval.modes.values()))
        return EvalPlan(cfg.rl.mode, self.n_latent_steps, settings)


__all__ = ["RL", "RLConfig", "Rollout", "TorchEngine", "aggregate", "group_advantages", "grpo_step", "policy_loss",
           "rollout", "sequence_logprobs", "token_logprobs", "whole_weights_for_sampling"]
