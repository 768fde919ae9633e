"""DARE — dynamic, asymmetric (per-modality) routing of KV entries (seed 002), built on the public
Dynamic-LLaVA / DynamicViT template:

- `DareRouter`: one small MLP per modality (text, vision) maps a token's hidden state at decoder
  layer `layer` (the attention input) to a keep logit.
- Training: `gumbel_softmax(hard=True)` keep masks at temperature `tau` (annealed 1.0 → 0.1 with
  `anneal_temperature`), applied inside attention from `layer` on as a multiplicative mask on the
  softmax weights (renormalised), so gradients reach the router; `ratio_loss` pulls each
  modality's keep rate to its target: Σ_m mean_rows (keep_rate_m − ρ_m)².
- Inference: straight-through top-k — exactly round(ρ_m × n_m) entries of each modality per row
  (`target_count`), highest logits first; the dropped entries are pruned from the KV cache of
  `layer` and every deeper layer after the prompt, and during decoding the text entries are
  re-selected at each step so text retention stays at ρ_text of the text seen.

The router trains in the `dare` stage (mmreason/train); a trained router is a state dict
(`save_router` / `router_path`). A training step, for that stage:

    press = DarePress(rho_text=0.7, rho_vis=0.4, layer=1)
    press.router = DareRouter(hidden_size).train()      # its parameters go into the optimizer
    with press(family):                                 # hooks stay on across steps
        press.tau = anneal_temperature(step, total_steps)
        loss, _ = latent_forward(family, batch)         # attention masked from `layer` on
        loss = loss + ratio_weight * press.ratio_loss() # over every forward since the last call
    save_router(press.router, path)                     # DarePress(router_path=path) evaluates it

With `press.router.eval()` the same press prunes the cache instead (top-k, no noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmreason.config import ConfigError
from mmreason.kv.base import LayerCall, Press, Session, check_fraction, keep_top
from mmreason.kv.modality import TEXT, VISION


def target_count(rho: float, n: torch.Tensor) -> torch.Tensor:
    """Entries kept of `n`: round(ρ·n) with halves up — the count top-k keeps exactly."""
    return torch.floor(n.float() * rho + 0.5).long()


def anneal_temperature(step: int, total: int, start: float = 1.0, end: float = 0.1) -> float:
    """Gumbel temperature, exponential from `start` at step 0 to `end` at step `total`."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return start * (end / start) ** frac


class DareRouter(nn.Module):
    """Per-modality importance predictors: LayerNorm → Linear → GELU → Linear → keep logit, over a
    token's hidden state — and, with `context` c > 1, the c − 1 tokens' before it (a causal window:
    at the first layer a hidden state is the token alone, and "6" after "A" is a letter's cell
    where "6" after "Go up" is a step's). Padding contributes zeros. Parameters are made on
    `device` (None: torch's default device)."""

    def __init__(self, hidden_size: int, width: int = 64, context: int = 1, device: torch.device | str | None = None):
        super().__init__()
        if context < 1:
            raise ConfigError(f"router_context must be >= 1, got {context}")
        self.hidden_size, self.width, self.context = hidden_size, width, context
        features = hidden_size * context

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(features, device=device), nn.Linear(features, width, device=device),
                                 nn.GELU(), nn.Linear(width, 1, device=device))

        self.predictors = nn.ModuleDict({"text": mlp(), "vision": mlp()})

    def forward(self, hidden: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) hidden states, (B, T) modality → (B, T) keep logits. With `context` > 1,
        `valid` (B, T) zeroes padding and `past` (B, context − 1, d) holds the tokens before this
        call's (zeros at a sequence's start); `tail(...)` gives the next call's `past`."""
        h = hidden.to(self.predictors["text"][1].weight.dtype)
        if self.context > 1:
            seq = self._sequence(h, valid, past)
            t = h.shape[1]
            h = torch.cat([seq[:, self.context - 1 - i : self.context - 1 - i + t] for i in range(self.context)], -1)
        text = self.predictors["text"](h).squeeze(-1)
        vision = self.predictors["vision"](h).squeeze(-1)
        return torch.where(modality.to(text.device) == VISION, vision, text)

    def _sequence(self, h: torch.Tensor, valid: torch.Tensor | None, past: torch.Tensor | None) -> torch.Tensor:
        if valid is not None:
            h = h * valid.to(h.device, h.dtype)[..., None]
        if past is None:
            past = h.new_zeros(h.shape[0], self.context - 1, h.shape[-1])
        return torch.cat([past.to(h.dtype), h], 1)

    def tail(self, hidden: torch.Tensor, valid: torch.Tensor | None = None,
             past: torch.Tensor | None = None) -> torch.Tensor | None:
        """The `past` for the call after this one (None when `context` is 1)."""
        if self.context == 1:
            return None
        h = hidden.to(self.predictors["text"][1].weight.dtype)
        return self._sequence(h, valid, past)[:, -(self.context - 1):].detach()


def topk_keep(logits: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor, rho_text: float,
              rho_vis: float) -> torch.Tensor:
    """(B, T) bool: per row and modality the `target_count` highest logits among valid tokens."""
    keep = torch.zeros_like(valid)
    for m, rho in ((TEXT, rho_text), (VISION, rho_vis)):
        eligible = valid & (modality == m)
        k = target_count(rho, eligible.sum(-1))
        keep |= keep_top(logits[:, None], k, eligible[:, None])[:, 0]
    return keep


def straight_through_topk(logits: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor, rho_text: float,
                          rho_vis: float) -> torch.Tensor:
    """Hard top-k keep mask (float 0/1) whose gradient is the sigmoid's (straight-through)."""
    hard = topk_keep(logits, modality, valid, rho_text, rho_vis).to(logits.dtype)
    soft = torch.sigmoid(logits)
    return hard - soft.detach() + soft


def with_recency(scores: torch.Tensor, cols: torch.Tensor, seen: int, window: int) -> torch.Tensor:
    """Router scores with the entries among the last `window` columns of `seen` lifted above every
    other, so top-k keeps them first (they still count against their modality's budget)."""
    if window <= 0:
        return scores
    recent = cols >= seen - window
    return scores.float() + recent.float() * RECENT_BONUS


RECENT_BONUS = 1e6
"""Added to a recent entry's router logit (`with_recency`): above any logit a router produces."""


def decode_visibility(logits: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor, prompt_len: torch.Tensor,
                      rho_text: float, rho_vis: float, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query of a teacher-forced row would see at inference, replaying the
    inference press step by step: the prompt (`prompt_len` (B,) tokens) is one forward, then its
    cache keeps the top round(ρ·n) entries per modality; every later token joins the cache and
    the lowest-ranked entries are evicted down to the budget of the tokens seen so far (ranks by
    logit, the last `window` tokens first, ties to the earlier token — `keep_top`). Returns
    (visible (B, T, T) bool — query i sees key j —, survivors (B, T) bool at the row's end)."""
    b, t = logits.shape
    alive = torch.zeros(b, t, dtype=torch.bool, device=logits.device)
    seen = torch.zeros(b, 2, dtype=torch.long, device=logits.device)
    after = []  # survivors after each step's eviction
    scores = logits.detach().float()[:, None]
    cols = torch.arange(t, device=logits.device)[None, None]
    for step in range(t):
        new = valid[:, step]
        alive[:, step] = new
        for m, rho in ((TEXT, rho_text), (VISION, rho_vis)):
            seen[:, m] += (new & (modality[:, step] == m)).long()
        evicting = step >= prompt_len - 1  # the prompt's last token ends its forward
        if bool(evicting.any()):
            keep = alive & ~((modality == TEXT) | (modality == VISION))
            for m, rho in ((TEXT, rho_text), (VISION, rho_vis)):
                member = (alive & (modality == m))[:, None]
                ranked = with_recency(scores, cols, step + 1, window)
                keep |= keep_top(ranked, target_count(rho, seen[:, m]), member)[:, 0]  # index = column
            alive = torch.where(evicting[:, None], keep, alive)
        after.append(alive.clone())
    survivors = torch.stack(after, dim=1)  # (B, step, key)
    before = torch.cat([torch.zeros_like(survivors[:, :1]), survivors[:, :-1]], dim=1)  # after the previous step
    q = torch.arange(t, device=logits.device)
    causal = q[None, :, None] >= q[None, None, :]
    in_prompt = q[None, :, None] < prompt_len[:, None, None]
    own = q[None, :, None] == q[None, None, :]
    visible = causal & (in_prompt | own | before) & valid[:, None, :]
    return visible, survivors[:, -1]


def future_importance(probs: torch.Tensor, prompt_len: torch.Tensor, window: int = 0,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, T) attention of a whole teacher-forced row (query × key, nothing dropped) →
    (B, T): per key the largest head-averaged attention a query pays it when decoding could have
    evicted it — a real (`valid` (B, T)) query after the prompt (`prompt_len` (B,); the prompt
    sees itself whole) at least max(window, 1) tokens later (the recent window and a query's own
    entry are kept anyway)."""
    t = probs.shape[-1]
    q = torch.arange(probs.shape[-2], device=probs.device)[:, None] + (t - probs.shape[-2])
    k = torch.arange(t, device=probs.device)[None, :]
    late = (q - k >= max(window, 1))[None] & (q[None] >= prompt_len.view(-1, 1, 1))  # (B, q, T)
    if valid is not None:
        late = late & valid[:, -probs.shape[-2]:, None].to(late.device)
    return (probs.float().mean(1) * late).amax(1)


@dataclass
class EvictionProbe(Press):
    """Teacher-forced forwards in which chosen queries cannot see chosen keys, from decoder layer
    `layer` on (layers below see everything, as under `DarePress`) — what evicting those keys at
    decoding would hide. Set `visible` ((B, T, T) 0/1 per query and key; causality is applied
    anyway) before each forward; the forward also records the attention input of layer `layer`
    and each token's modality (`inputs`: what a `DareRouter` reads)."""

    layer: int = 0

    def __post_init__(self) -> None:
        self.visible: torch.Tensor | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def setup(self, session: Session) -> None:
        n_layers = len(session.attention_modules)
        if self.layer >= n_layers:
            raise ConfigError(f"layer {self.layer} is past the model's last decoder layer ({n_layers - 1})")

    def fresh(self, call: LayerCall) -> dict[str, torch.Tensor] | None:
        if call.layer_idx == self.layer:
            self.inputs = (call.hidden_states.detach(), call.session.forward_modality(), call.session.fwd_valid)
        return None

    def soft_keep(self, call: LayerCall) -> torch.Tensor | None:
        if call.layer_idx < self.layer or self.visible is None:
            return None
        return self.visible[:, None]  # (B, 1, q, L): per query


def gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard 0/1 keep mask from a two-way Gumbel-softmax (keep vs drop), straight-through gradients."""
    pair = torch.stack([logits, torch.zeros_like(logits)], dim=-1)
    return F.gumbel_softmax(pair.float(), tau=tau, hard=True)[..., 0].to(logits.dtype)


def ratio_loss(keep: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor, rho_text: float,
               rho_vis: float) -> torch.Tensor:
    """Σ over modalities of mean over rows of (keep_rate − target)²; rows without a modality's
    tokens do not count for it."""
    loss = keep.sum() * 0.0
    for m, rho in ((TEXT, rho_text), (VISION, rho_vis)):
        member = (valid & (modality == m)).to(keep.dtype)
        n = member.sum(-1)
        has = n > 0
        if bool(has.any()):
            rate = (keep * member).sum(-1)[has] / n[has]
            loss = loss + ((rate - rho) ** 2).mean()
    return loss


def save_router(router: DareRouter, path: str | Path) -> None:
    torch.save({"hidden_size": router.hidden_size, "width": router.width, "context": router.context,
                "state_dict": router.state_dict()}, path)


def load_router(path: str | Path) -> DareRouter:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"router_path: no router file at {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    # on the CPU with its state; the press moves it to the model's device when applied
    router = DareRouter(data["hidden_size"], data["width"], data.get("context", 1), device="cpu")
    router.load_state_dict(data["state_dict"])
    return router.eval()  # a saved router prunes (top-k); `.train()` it to train further


@dataclass
class DarePress(Press):
    config_requires = {"router_path": "the router the dare stage trained (RUN/export/dare_router.pt, e.g. "
                                      "`mmreason train configs/train/dare-maze.yaml` writes "
                                      "runs/train/dare-maze/export/dare_router.pt); without one the press "
                                      "would prune with an untrained, random router"}
    """A config must name a trained router; only the dare stage builds the press with a fresh one."""

    rho_text: float = 0.7
    """Fraction of text entries kept."""
    rho_vis: float = 0.4
    """Fraction of image entries kept."""
    layer: int = 1
    """The router reads this decoder layer's attention input; this layer and deeper ones drop."""
    router_path: str | None = None
    """Router saved by the dare stage (required in a config); None = a fresh, untrained router, or
    one set on `.router` — the dare stage's training path, not an evaluation."""
    router_width: int = 64
    router_context: int = 1
    """Tokens the router reads per decision: the token and the `router_context` − 1 before it."""
    tau: float = 1.0
    """Gumbel-softmax temperature (training; anneal with `anneal_temperature`)."""
    decode: bool = True
    """Keep text retention at rho_text during decoding too (re-select at every step)."""
    train_masks: str = "gumbel"
    """Training masks: "gumbel" (Dynamic-LLaVA's: per-token Gumbel keep/drop, the ratio loss pulls
    the rate to ρ); "topk" (exactly round(ρ·n) per row and modality of the whole row by the
    router's logits); "decode" (what inference keeps, query by query: `decode_visibility` replays
    the prompt's pruning and every decode step's eviction; set `prompt_lengths` before each
    forward). "topk" and "decode" pass straight-through sigmoid gradients to the router."""
    learn_importance: bool = False
    """Training: record, per token, the largest attention a later query outside the recent window
    pays it with nothing dropped (`future_importance`) — what `importance_loss` fits the router's
    logits to (Locret's / H2O's notion of which entries decoding still needs). The router then
    learns from that fit alone: the masks take its logits without a straight-through gradient."""
    window: int = 0
    """The latest `window` entries are kept whatever their score (within each modality's budget;
    H2O / StreamingLLM's recent window): a step's own tokens stay visible to the next few steps."""

    def __post_init__(self) -> None:
        check_fraction("rho_text", self.rho_text)
        check_fraction("rho_vis", self.rho_vis)
        if self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
        if self.window < 0:
            raise ConfigError(f"window must be >= 0, got {self.window}")
        if self.window and self.train_masks == "topk":
            raise ConfigError('window: the whole-row "topk" training masks have no notion of recency; '
                              'train with train_masks "decode" (or "gumbel")')
        if self.tau <= 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if self.train_masks not in ("gumbel", "topk", "decode"):
            raise ConfigError(f"train_masks must be 'gumbel', 'topk' or 'decode', got {self.train_masks!r}")
        self.prompt_lengths: torch.Tensor | None = None
        """(B,) prompt tokens per row of the next training forward (train_masks="decode")."""
        self._past: torch.Tensor | None = None
        """The router's context carried from one forward to the next (`DareRouter.tail`)."""
        self.router: DareRouter | None = load_router(self.router_path) if self.router_path else None
        self.masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        """Training: (keep, modality, valid) of every forward since the last `pop_masks()`."""
        self.importance: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        """Training with `learn_importance`: (router logits, importance, valid) of every forward."""

    def keeps_everything(self) -> bool:
        return self.rho_text == 1.0 and self.rho_vis == 1.0 and not self.training

    @property
    def training(self) -> bool:
        return self.router is not None and self.router.training

    def setup(self, session: Session) -> None:
        n_layers = len(session.attention_modules)
        if self.layer >= n_layers:
            raise ConfigError(f"layer {self.layer} is past the model's last decoder layer ({n_layers - 1})")
        hidden = session.config.hidden_size
        device = next(session.model.parameters()).device
        if self.router is None:
            self.router = DareRouter(hidden, self.router_width, self.router_context, device=device).eval()
        elif self.router.hidden_size != hidden:
            raise ConfigError(f"router_path: router was trained for hidden size {self.router.hidden_size}, "
                              f"the model has {hidden}")
        self.router.to(device)

    def fresh(self, call: LayerCall) -> dict[str, torch.Tensor] | None:
        if call.layer_idx < self.layer:
            return None
        if call.layer_idx == self.layer:
            modality = call.session.forward_modality()
            valid, past = call.session.fwd_valid, None if call.prefill else self._past
            fit = None
            if self.training and not any(p.requires_grad for p in self.router.parameters()):
                # a router fitted before the stage and frozen (`router_fit`): its input and logits
                # are given, and nothing flows back through it into the backbone
                with torch.no_grad():
                    logits = self.router(call.hidden_states.detach(), modality, valid, past)
            elif self.training and self.learn_importance:
                # Locret-style: the router learns from the importance fit alone (its input detached,
                # so that loss does not move the backbone) and the masks take its logits as given
                fit = self.router(call.hidden_states.detach(), modality, valid, past)
                logits = fit.detach()
            else:
                logits = self.router(call.hidden_states, modality, valid, past)
            self._past = self.router.tail(call.hidden_states, valid, past)
            call.scratch["dare"] = {"router": logits}
            if self.training:
                if self.train_masks == "decode":
                    keep = self._decode_masks(call, logits, modality, valid)
                elif self.train_masks == "topk":
                    keep = straight_through_topk(logits, modality, valid, self.rho_text, self.rho_vis)
                else:
                    keep = gumbel_keep(logits, self.tau)
                call.scratch["dare"]["keep"] = keep
                self.masks.append((keep, modality, valid))
                if fit is not None:
                    if call.session.seen != call.q_len:
                        raise RuntimeError("learn_importance needs the whole row in one forward (no latent passes)")
                    call.scratch["dare_importance"] = torch.zeros_like(fit, dtype=torch.float32)
                    self.importance.append((fit, call.scratch["dare_importance"], valid))
        return call.scratch["dare"]

    def _decode_masks(self, call: LayerCall, logits: torch.Tensor, modality: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """train_masks="decode": per-query keep weights (kept in the forward's scratch for
        `soft_keep`), and the row-end survivors as this forward's keep mask."""
        if self.prompt_lengths is None or call.session.seen != call.q_len:
            raise RuntimeError('train_masks="decode" needs prompt_lengths set and the whole row in one forward '
                               "(no latent passes)")
        visible, survivors = decode_visibility(logits, modality, valid, self.prompt_lengths.to(logits.device),
                                               self.rho_text, self.rho_vis, self.window)
        t = logits.shape[1]
        q = torch.arange(t, device=logits.device)
        decided = (q[:, None] >= self.prompt_lengths.to(logits.device)[:, None, None]) & (q[:, None] > q[None, :])
        soft = torch.sigmoid(logits)
        straight = soft - soft.detach()  # zero, with the sigmoid's gradient
        call.scratch["dare_visible"] = visible.to(soft.dtype) + straight[:, None, :] * decided
        return survivors.to(soft.dtype) + straight

    def soft_keep(self, call: LayerCall) -> torch.Tensor | None:
        if not self.training or call.layer_idx < self.layer:
            return None
        if self.train_masks == "decode":
            return call.scratch["dare_visible"][:, None]  # (B, 1, q, L): per query, not an entry extra
        return call.state.extra["keep"]

    def observe_attention(self, call: LayerCall, probs: torch.Tensor) -> None:
        importance = call.scratch.get("dare_importance")
        if importance is None or call.layer_idx < self.layer:
            return
        prompt = (self.prompt_lengths.to(probs.device) if self.prompt_lengths is not None
                  else torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device))
        found = future_importance(probs, prompt, self.window, call.session.fwd_valid)
        importance.copy_(torch.maximum(importance, found))

    def importance_loss(self) -> torch.Tensor:
        """Mean squared error between the router's logits and log(importance + 1e-3) over the valid
        tokens of every forward since the last call (`learn_importance`)."""
        records, self.importance = self.importance, []
        if not records:
            raise RuntimeError("no importance recorded: train under the press with learn_importance=True first")
        losses = [((logits.float() - (imp + 1e-3).log()) ** 2)[valid].mean() for logits, imp, valid in records]
        return torch.stack(losses).mean()

    def compress(self, call: LayerCall) -> None:
        if self.training or call.layer_idx < self.layer or not (call.prefill or self.decode):
            return
        st = call.state
        seen = call.session.seen_by_mod
        scores = with_recency(st.extra["router"], st.col, call.session.seen, self.window)
        budgets = {m: target_count(rho, seen[:, m]) for m, rho in ((TEXT, self.rho_text), (VISION, self.rho_vis))}
        if not call.prefill and call.drop_lowest(scores[:, 0], budgets):
            return
        keep = st.valid & (st.mod != TEXT) & (st.mod != VISION)
        for m, k in budgets.items():
            keep |= keep_top(scores, k, st.valid & (st.mod == m), st.col)
        call.keep(keep)

    def pop_masks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The training masks recorded since the last call (for `ratio_loss`)."""
        masks, self.masks = self.masks, []
        return masks

    def ratio_loss(self) -> torch.Tensor:
        """`ratio_loss` over the tokens of every forward since the last call."""
        masks = self.pop_masks()
        if not masks:
            raise RuntimeError("no router masks recorded: run a training forward under the press first")
        widths = [k.shape[1] for k, _, _ in masks]
        keep = torch.cat([k for k, _, _ in masks], dim=1)
        modality = torch.cat([m for _, m, _ in masks], dim=1)
        valid = torch.cat([v for _, _, v in masks], dim=1)
        assert keep.shape[1] == sum(widths)
        return ratio_loss(keep, modality, valid, self.rho_text, self.rho_vis)


__all__ = ["DarePress", "DareRouter", "EvictionProbe", "anneal_temperature", "decode_visibility", "future_importance",
           "gumbel_keep", "load_router", "ratio_loss", "save_router", "straight_through_topk", "target_count", "topk_keep",
           "with_recency"]
