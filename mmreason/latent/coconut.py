"""CoCoNuT (arXiv 2412.06769; facebookresearch/coconut) for any backbone family.

- `latent_forward`: the training forward. Each `<|latent|>` position takes as input embedding the
  last hidden state of the position before it, so the sequence is run in passes: one up to the
  first latent, then one position per latent, reusing the KV cache; gradients flow through the
  thoughts. Rows must be collated with `align_latents=True` (first latent at one column).
- `generate`: batched generation with a KV cache — prompt prefill, one cached step per latent, then
  token-by-token decoding. The reference implementation is batch 1 without a cache;
  `generate_uncached` is that algorithm, kept as the oracle the batched one must equal.
- `CurriculumSchedule`: stage = first_stage + epoch // epochs_per_stage; stage k ≤ max_latent_stage
  replaces the first k steps by k·c_thought latents; the stage after max_latent_stage is CoCoNuT's
  last: every step goes, replaced by max_latent_stage·c_thought latents (the reference's
  `n_skip_steps = 10000`), so the reply is the answer alone; `uniform_prob` mixes in other stages.
  `keep_last_steps` keeps that many trailing steps in language at every stage (the reply then always
  writes the step that reaches the answer; an addition to the reference).
- Controls (`CurriculumSchedule.thought`, carried by the model as `Family.thought`): `pause` runs
  the same curriculum with every latent an ordinary `<|latent|>` token read through its own trained
  embedding (the pause-token control of CoCoNuT replications: one forward, no hidden state fed
  back); `none` drops the replaced steps with nothing in their place. `latent_forward` and
  `generate` take both as ordinary token sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmreason.models.base import IGNORE, THOUGHTS, Family, Thought, position_ids


@dataclass
class CurriculumSchedule:
    c_thought: int = 1
    """Latent thoughts per replaced reasoning step."""
    epochs_per_stage: int = 1
    max_latent_stage: int = 3
    """Latent steps at most; the stage after it drops every language step (the reply is the answer)."""
    uniform_prob: float = 0.0
    """Probability that a training row uses a random stage in [0, current] instead."""
    first_stage: int = 0
    """Stage of epoch 0: 1 when the run starts from a cot checkpoint, which already is stage 0
    (CoCoNuT's `resume` skips those epochs the same way)."""
    keep_last_steps: int = 0
    """Trailing language steps no stage replaces (0: the reference's curriculum). With 1, a maze
    reply always writes its last move — the cell reached and its letter — before the answer, even
    at the last stage, where every other step is latent."""
    thought: Thought = "latent"
    """What stands in for the replaced steps: `latent` (CoCoNuT: each `<|latent|>` input is the previous
    position's last hidden state), `pause` (the control: each is one learned token, the `<|latent|>`
    embedding, no hidden state fed back), `none` (the steps are dropped, no latents, no markers). The
    export keeps it (`Family.thought`): its evaluation reads thoughts the same way."""

    def __post_init__(self) -> None:
        from mmreason.config import ConfigError

        for name in ("c_thought", "epochs_per_stage"):
            if getattr(self, name) < 1:
                raise ConfigError(f"coconut.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_latent_stage", "first_stage", "keep_last_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"coconut.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.uniform_prob <= 1:
            raise ConfigError(f"coconut.uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if self.thought not in THOUGHTS:
            raise ConfigError(f"coconut.thought must be one of {', '.join(THOUGHTS)}, got {self.thought!r}")

    def stage(self, epoch: int) -> int:
        """The epoch's stage; max_latent_stage + 1 (every step latent) is the last."""
        return min(self.first_stage + epoch // self.epochs_per_stage, self.max_latent_stage + 1)

    def latent_steps(self, stage: int) -> int:
        """Latent steps (c_thought latents each) a stage's rows carry, whatever their step count
        (CoCoNuT's `pad_latent_to_max`: the count must not tell how long the reasoning is)."""
        return min(stage, self.max_latent_stage)

    def replaced_steps(self, stage: int, n_steps: int) -> int:
        """Language steps of an `n_steps` row the latents replace: the first `stage`, or every one
        past max_latent_stage — never the last `keep_last_steps`."""
        replaceable = max(0, n_steps - self.keep_last_steps)
        return replaceable if stage > self.max_latent_stage else min(stage, replaceable)

    def row_stage(self, epoch: int, rng: random.Random) -> int:
        stage = self.stage(epoch)
        if self.uniform_prob > 0 and rng.random() < self.uniform_prob:
            return rng.randint(0, stage)
        return stage


def latent_forward(family: Family, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of a batch whose rows may hold latent positions; a `pause` model reads them
    as ordinary tokens, in one forward."""
    model = family.model
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    embeds = family.embed(batch)
    pos = position_ids(mask)
    is_latent = ids == family.latent_id
    counts = is_latent.sum(1)
    # a pause model's latents are tokens like any other: no pass of their own
    n_pass = int(counts.max()) if ids.numel() and family.thought == "latent" else 0
    if n_pass == 0:
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        logits = out.logits
    else:
        first = is_latent.float().argmax(1)
        start = int(first[counts > 0].min())
        if not bool((first[counts > 0] == start).all()):
            raise ValueError("latent positions are not aligned; collate with align_latents=True")
        parts, cache, r0, r1 = [], None, 0, start
        for p in range(n_pass):
            out = model(inputs_embeds=embeds[:, r0:r1], attention_mask=mask[:, :r1], position_ids=pos[:, r0:r1],
                        past_key_values=cache, use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            parts.append(out.logits)
            rows = (counts > p).nonzero().flatten()
            # the latent at start+p reads the last hidden state of position start+p-1
            thought = out.hidden_states[-1][rows, start + p - 1 - r0]
            embeds = embeds.index_put((rows, torch.full_like(rows, start + p)), thought)
            r0, r1 = r1, r1 + 1
        out = model(inputs_embeds=embeds[:, r0:], attention_mask=mask, position_ids=pos[:, r0:],
                    past_key_values=cache, use_cache=True)
        logits = torch.cat(parts + [out.logits], dim=1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
    return loss, logits


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        from mmreason.config import ConfigError

        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    if not settings.do_sample:
        return logits.argmax(-1)
    # sampling in float32 whatever the model's dtype: bf16 probabilities sum off 1 by ~1e-2
    probs = torch.softmax(logits.float() / settings.temperature, -1)
    if settings.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < settings.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if generator is not None and generator.device != probs.device:
        # a generator draws on its own device only: sample there (a CPU generator seeds the same
        # draws whatever device the model is on), then bring the tokens back
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(family: Family, batch: dict[str, torch.Tensor], n_latents: int, settings: GenerationSettings,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each left-padded row of `batch` (prompt, then `<|start-latent|>` + n latents +
    `<|end-latent|>` when n > 0). Returns the generated token ids per row, up to and without eos.
    Only a `latent` model is fed thoughts: a `pause` model's latents are ordinary prompt tokens and a
    `none` model's rows hold none, so for them n is not read."""
    model = family.model
    n_latents = n_latents if family.thought == "latent" else 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = family.embed(batch)
    pos = position_ids(mask)
    width = ids.shape[1]
    # prefill up to the first latent (or everything), then one cached step per latent thought
    prefix = width - 1 - n_latents if n_latents else width
    out = model(inputs_embeds=embeds[:, :prefix], attention_mask=mask[:, :prefix], position_ids=pos[:, :prefix],
                past_key_values=None, use_cache=True, output_hidden_states=n_latents > 0)
    cache = out.past_key_values
    for j in range(n_latents):
        thought = out.hidden_states[-1][:, -1:]
        at = prefix + j
        out = model(inputs_embeds=thought, attention_mask=mask[:, : at + 1], position_ids=pos[:, at : at + 1],
                    past_key_values=cache, use_cache=True, output_hidden_states=True)
        cache = out.past_key_values
    if n_latents:  # the <|end-latent|> marker
        out = model(inputs_embeds=embeds[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return decode(family, out.logits[:, -1], cache, mask, pos[:, -1:] + 1, settings, generator)


@torch.no_grad()
def decode(family: Family, logits: torch.Tensor, cache, mask: torch.Tensor, next_pos: torch.Tensor,
           settings: GenerationSettings, generator: torch.Generator | None = None) -> list[list[int]]:
    """Token-by-token decoding from a filled cache: `logits` (B, V) of each row's last input,
    `mask` (B, L) the inputs' 2-D attention mask, `next_pos` (B, 1) the next position. Returns the
    generated token ids per row, up to and without eos (`generate`'s last part). The family's
    `decoding_rule` (an anole model's image spans) limits what each row may say next."""
    model = family.model
    eos = family.tokenizer.eos_token_id
    done = [False] * logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(logits.shape[0])]
    embed_tokens = model.get_input_embeddings()
    rule = family.decoding_rule(logits.shape[0])
    for _ in range(settings.max_new_tokens):
        token = _pick(logits if rule is None else rule.allow(logits), settings, generator)
        if rule is not None:
            rule.step(token)
        for b, t in enumerate(token.tolist()):  # one device-to-host copy per step
            if not done[b]:
                if t == eos:
                    done[b] = True
                else:
                    generated[b].append(t)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(inputs_embeds=embed_tokens(token[:, None]), attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return generated


@torch.no_grad()
def generate_uncached(family: Family, batch: dict[str, torch.Tensor], n_latents: int,
                      max_new_tokens: int) -> list[int]:
    """The reference algorithm (batch 1, greedy, no KV cache): every step re-runs the whole sequence."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("generate_uncached takes one row")
    model = family.model
    n_latents = n_latents if family.thought == "latent" else 0
    embeds = family.embed(batch)
    eos = family.tokenizer.eos_token_id
    if n_latents:
        prefix = embeds.shape[1] - 1 - n_latents
        seq = embeds[:, :prefix]
        for _ in range(n_latents):
            hidden = model(inputs_embeds=seq, use_cache=False, output_hidden_states=True).hidden_states[-1]
            seq = torch.cat([seq, hidden[:, -1:]], dim=1)
        seq = torch.cat([seq, embeds[:, -1:]], dim=1)
    else:
        seq = embeds
    out_ids: list[int] = []
    rule = family.decoding_rule(1)
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=seq, use_cache=False).logits[:, -1]
        token = (logits if rule is None else rule.allow(logits)).argmax(-1)
        if rule is not None:
            rule.step(token)
        if int(token) == eos:
            break
        out_ids.append(int(token))
        seq = torch.cat([seq, model.get_input_embeddings()(token[:, None])], dim=1)
    return out_ids
