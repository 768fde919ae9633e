"""The mechanics every press shares, written once (kvpress's design: a press is a dataclass of
settings; `with press(model): model.generate(...)` installs hooks and removes them after).

What `with press(model)` does, and undoes on exit:

- the decoder's attention implementation is swapped for `mmreason_press_<impl>` (registered once
  with transformers' `AttentionInterface`); it runs the model's own attention (`sdpa`/`eager`)
  and then calls the press. While nothing has been dropped it passes the model's own mask through,
  so a press that keeps everything changes no bit of the output;
- forward hooks read the token ids off the input embedding (so both the CoCoNuT generation path,
  which feeds `inputs_embeds`, and HF `generate` are seen), the 2-D padding mask and positions
  off the decoder call, and each attention layer's input hidden states and cache.

Per layer the session keeps a `LayerState` parallel to the cache's keys: for every cached entry its
column in the uncompressed sequence (`col`, for causality), position (`pos`, float: merged entries
sit between tokens), whether it is real (`valid`: left padding and rows padded after per-row
pruning are not), its modality (text / vision / shared slot) and `log_mass` (log of how many tokens
a merged entry stands for, added to its attention logit — ToMe's proportional attention). Once any
entry is gone, attention is computed with a mask built from this state (valid ∧ col ≤ query col),
so left-padded batches, per-row budgets and per-head pruning all work.

Writing a press: subclass `Press`, override `compress(call)` (after each attention call: decide
what to keep — `call.keep(mask)` — or replace entries — `call.replace(...)`), and, if the method
needs per-token data from the forward (a router's scores), `fresh(call)`. `ScorePress` does the
top-budget selection for methods that only produce scores. Images the model draws while decoding
(Anole's visual thoughts) are complete in the forward that feeds their end marker:
`call.closed_images()` names their entries, per row.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmreason.kv.accounting import cache_kwarg, cache_output
from mmreason.kv.modality import MODALITY_NAMES, SHARED, TEXT, VISION, ModalitySpec, modality_spec
from mmreason.kv.rope import Rope

IMPL_PREFIX = "mmreason_press_"
KV = ("k", "v")
"""Keys of the per-entry tensors that carry a head and a channel axis in `LayerCall.replace_rows`."""


# --- per-layer state ---------------------------------------------------------------------------
@dataclass
class LayerState:
    """Metadata of one layer's cached entries, all (B, H, L) like the cache's keys minus head_dim."""

    col: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    mod: torch.Tensor
    log_mass: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-entry values a press keeps alongside (e.g. DARE's router scores); gathered with the rest."""
    per_head: bool = False
    """Whether heads hold different entries (kvpress prunes per head); if not, head 0 speaks for all."""

    @property
    def length(self) -> int:
        return self.col.shape[-1]

    def fields(self) -> dict[str, torch.Tensor]:
        out = {"col": self.col, "pos": self.pos, "valid": self.valid, "mod": self.mod}
        if self.log_mass is not None:
            out["log_mass"] = self.log_mass
        return out | {f"extra.{k}": v for k, v in self.extra.items()}

    @classmethod
    def from_fields(cls, data: dict[str, torch.Tensor]) -> "LayerState":
        extra = {k[6:]: v for k, v in data.items() if k.startswith("extra.")}
        return cls(data["col"], data["pos"], data["valid"], data["mod"], data.get("log_mass"), extra)

    def cat(self, other: "LayerState") -> "LayerState":
        if (self.log_mass is None) != (other.log_mass is None):
            zeros = torch.zeros_like(other.pos if self.log_mass is None else self.pos)
            a = self.log_mass if self.log_mass is not None else zeros
            b = other.log_mass if other.log_mass is not None else zeros
            self.log_mass, other.log_mass = a, b
        mine, theirs = self.fields(), other.fields()
        for key in list(mine):
            if key not in theirs:  # an extra only this side has (e.g. scores not computed yet)
                theirs[key] = torch.zeros_like(other.pos, dtype=mine[key].dtype)
        for key in list(theirs):
            if key not in mine:
                mine[key] = torch.zeros_like(self.pos, dtype=theirs[key].dtype)
        out = LayerState.from_fields({k: torch.cat([mine[k], theirs[k]], dim=-1) for k in mine})
        out.per_head = self.per_head or other.per_head
        return out

    def gather(self, index: torch.Tensor) -> "LayerState":
        out = LayerState.from_fields({k: v.gather(-1, index) for k, v in self.fields().items()})
        out.per_head = self.per_head
        return out


def keep_top(scores: torch.Tensor, budget: torch.Tensor | int, eligible: torch.Tensor,
             cols: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L) bool: per (row, head) the `budget` (int or (B,)) highest-scoring eligible entries;
    of equal scores the earlier one is kept — earlier in the sequence when `cols` (B, H, L) is given
    (a cache `evict` has reordered), else earlier in the tensor."""
    s = scores.float().masked_fill(~eligible, float("-inf"))
    if cols is None:
        order = s.argsort(dim=-1, descending=True, stable=True)
    else:
        by_col = cols.argsort(dim=-1, stable=True)
        order = by_col.gather(-1, s.gather(-1, by_col).argsort(dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    if isinstance(budget, torch.Tensor):
        budget = budget.view(-1, 1, 1).to(rank.device)
    return (rank < budget) & eligible


def packed(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., L) bool → (..., n) indices of the True entries, in order, first (n = the most any row
    has; a row with fewer goes on with its other entries) and (..., n) whether each is True."""
    n = int(mask.sum(-1).max())
    order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :n]
    return order, mask.gather(-1, order)


# --- one attention call, as a press sees it ----------------------------------------------------
class LayerCall:
    """Everything a press may look at in one attention call of one layer."""

    def __init__(self, session: "Session", module: torch.nn.Module, query: torch.Tensor, attn_kwargs: dict):
        self.session = session
        self.module = module
        self.layer_idx: int = module.layer_idx
        self.query = query
        self.attn_kwargs = attn_kwargs
        self._last_attention: torch.Tensor | None = None

    # read-only views
    @property
    def press(self) -> "Press":
        return self.session.press

    @property
    def cache_layer(self) -> Any:
        return self.session.cache.layers[self.layer_idx]

    @property
    def keys(self) -> torch.Tensor:
        return self.cache_layer.keys

    @property
    def values(self) -> torch.Tensor:
        return self.cache_layer.values

    @property
    def state(self) -> LayerState:
        return self.session.states[self.layer_idx]

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.session.layer_inputs[self.layer_idx]["hidden_states"]

    @property
    def prefill(self) -> bool:
        """True in the first forward of a generation (the prompt), False at every later step."""
        return self.session.forward_index == 0

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def n_layers(self) -> int:
        return len(self.session.attention_modules)

    @property
    def scratch(self) -> dict[str, Any]:
        """Shared by all layers within one forward (e.g. a router's decision made at one layer)."""
        return self.session.forward_scratch

    def query_cols(self) -> torch.Tensor:
        return torch.arange(self.session.seen - self.q_len, self.session.seen, device=self.query.device)

    def attention(self, window: int = 1) -> torch.Tensor:
        """(B, H_q, window, L) softmax attention of the last `window` queries over the current
        entries (valid, causal, with mass), in float32 — what the layer just computed."""
        if window == 1 and self._last_attention is not None:
            return self._last_attention
        b, hq, _, d = self.query.shape
        hk, length = self.keys.shape[1], self.keys.shape[2]
        groups = hq // hk
        # grouped-query attention without repeating the keys: (B, H_kv, groups·window, D)
        q = self.query[:, :, -window:].float().reshape(b, hk, groups * window, d)
        scaling = self.attn_kwargs.get("scaling") or d ** -0.5
        logits = (q @ self.keys.float().transpose(-1, -2) * scaling).view(b, hq, window, length)
        mask = self.session.additive_mask(self.state, self.query_cols()[-window:], groups, torch.float32)
        probs = (logits if mask is None else logits + mask).softmax(-1)
        if window == 1:
            self._last_attention = probs
        return probs

    def rope(self) -> Rope:
        return self.session.rope

    def closed_images(self) -> list[list[torch.Tensor]]:
        """Per row, the images the model drew that this forward completed (their end marker,
        `ModalitySpec.image_end_ids`, is among its tokens; MVoT's visual thoughts): for each, the
        (n,) indices of its entries in this layer, in column order — the generated image tokens
        right before the marker, still uncompressed. [] for a row that completed none."""
        ends = self.session.forward_image_ends()
        rows = self.state.valid.shape[0]
        if ends is None:
            return [[] for _ in range(rows)]
        st = self.state
        raw = st.valid[:, 0] & (st.mod[:, 0] == VISION) & (st.col[:, 0] >= self.session.prompt_modality.shape[1])
        if st.log_mass is not None:
            raw &= st.log_mass[:, 0] == 0
        first_col = self.session.seen - self.q_len
        out = []
        for b in range(rows):
            found = []
            idx = raw[b].nonzero().flatten()
            idx = idx[st.col[b, 0, idx].argsort()]
            cols = st.col[b, 0, idx]
            for j in ends[b].nonzero().flatten().tolist():
                end = first_col + j
                c = cols[cols < end]
                n = c.numel()
                # the run of consecutive columns that ends right before the marker
                run = int((c == torch.arange(end - n, end, device=c.device)).flip(0).cumprod(0).sum()) if n else 0
                if run:
                    found.append(idx[n - run:n])
            out.append(found)
        return out

    # writes
    def keep(self, mask: torch.Tensor) -> bool:
        """Keep the entries where `mask` ((B, H, L) or (B, L), bool) is True; returns whether any
        valid entry was dropped (if none is, nothing changes)."""
        st = self.state
        if mask.dim() == 2:
            mask = mask[:, None, :].expand_as(st.valid)
        drop = st.valid & ~mask
        if not bool(drop.any()):
            return False
        mask = mask & st.valid
        order, kept = packed(mask)
        new = st.gather(order)
        new.valid = new.valid & kept
        new.per_head = st.per_head or not bool((mask == mask[:, :1]).all())
        idx = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.replace(self.keys.gather(2, idx), self.values.gather(2, idx), new)
        return True

    def drop_lowest(self, scores: torch.Tensor, budgets: dict) -> bool:
        """Decode-step fast path of top-budget selection. `scores` (B, L), higher is kept;
        `budgets` {modality or None (= all): (B,) or int}. At a step that added one entry, a cache
        that met its budgets is over by at most one entry per modality: when every row is over by
        exactly one in one modality (or by none anywhere), evict that modality's lowest-scoring
        entry per row (`evict`) and return True — the same entries `keep_top` would keep, ties
        included. Return False, touching nothing, where that does not hold (several queries,
        per-head entries, rows over by different counts): the caller then selects in full."""
        st = self.state
        if self.q_len != 1 or st.per_head or scores.dim() != 2:
            return False
        valid, mod = st.valid[:, 0], st.mod[:, 0]
        over_by_one = []
        for modality, k in budgets.items():
            eligible = valid if modality is None else valid & (mod == modality)
            lo, hi = torch.aminmax(eligible.sum(-1) - (k.to(valid.device) if isinstance(k, torch.Tensor) else k))
            lo, hi = int(lo), int(hi)
            if hi <= 0:
                continue
            if lo != 1 or hi != 1:
                return False
            over_by_one.append(eligible)
        if len(over_by_one) > 1:
            return False
        if over_by_one:  # the lowest score; of equal ones the latest in the sequence (as keep_top)
            s = scores.float().masked_fill(~over_by_one[0], math.inf)
            lowest = s == s.amin(-1, keepdim=True)
            self.evict(st.col[:, 0].masked_fill(~lowest, -1).argmax(-1))
        return True

    def evict(self, index: torch.Tensor) -> None:
        """Drop one entry per row, (B,) indices (the same in every head): the last entry moves
        into each dropped slot and the last slot is cut off — a few small writes where `keep`
        gathers the whole cache. Entry order changes; nothing reads it (causality and positions
        come from `col` and `pos`)."""
        st = self.state
        rows = torch.arange(index.shape[0], device=index.device)
        last = st.length - 1

        def move(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, ...): in place, then a view
            t[rows, :, index] = t[:, :, last]
            return t[:, :, :last]

        layer = self.cache_layer
        layer.keys, layer.values = move(self.keys), move(self.values)
        new = LayerState.from_fields({k: move(v) for k, v in st.fields().items()})
        new.per_head = st.per_head
        self.session.states[self.layer_idx] = new
        self.session.compressed = True
        self._last_attention = None

    def replace(self, keys: torch.Tensor, values: torch.Tensor, state: LayerState) -> None:
        """Put new cache entries (and their metadata) in place of this layer's."""
        layer = self.cache_layer
        layer.keys, layer.values = keys.contiguous(), values.contiguous()
        self.session.states[self.layer_idx] = state
        self.session.compressed = True
        self._last_attention = None

    def replace_rows(self, rows: list[dict[str, torch.Tensor]], proportional: bool = True) -> None:
        """Replace the cache by per-row entry lists (merging presses): each row a dict of `k`
        (H, n, D) *un-rotated* keys, `v` (H, n, D), and (n,) `col`, `pos`, `mod`, `mass` (tokens
        each entry stands for), `valid`; optionally (n,) `rotated`: entries whose `k` is the cache's
        own, already rotated, key, kept bit for bit (a rebuild that changes a few entries leaves the
        rest untouched). Rows are padded to one length; keys are rotated at `pos`."""
        heads = rows[0]["k"].shape[0]
        length = max(r["col"].numel() for r in rows)
        dev = self.keys.device

        def pad(t: torch.Tensor, value: float = 0) -> torch.Tensor:
            n = t.shape[-2] if t.dim() == 3 else t.shape[-1]
            if t.dim() == 3:
                return torch.cat([t, t.new_full((t.shape[0], length - n, t.shape[-1]), value)], dim=1)
            return torch.cat([t, t.new_full((length - n,), value)])

        def meta(key: str, value: float = 0) -> torch.Tensor:
            stacked = torch.stack([pad(r[key], value) for r in rows]).to(dev)
            return stacked[:, None, :].expand(-1, heads, -1).contiguous()

        state = LayerState(col=meta("col").long(), pos=meta("pos").float(), valid=meta("valid").bool(),
                           mod=meta("mod").to(torch.int8))
        mass = meta("mass", 1.0).float()
        if proportional and bool((mass != 1).any()):
            state.log_mass = mass.clamp(min=1e-6).log()
        k_pre = torch.stack([pad(r["k"]) for r in rows]).to(dev)
        values = torch.stack([pad(r["v"]) for r in rows]).to(dev)
        keys = self.rope().rotate(k_pre, state.pos)
        if any("rotated" in r for r in rows):
            keys = torch.where(meta("rotated").bool()[..., None], k_pre, keys)
        self.replace(keys.to(self.keys.dtype), values.to(self.values.dtype), state)


# --- the press interface -----------------------------------------------------------------------
@dataclass
class Press:
    """Base class: a press is a dataclass whose fields are its settings (see the module docstring)."""

    wants_attention = False
    """Class flag: the press reads `call.attention()` at decode steps; the session then computes
    that attention once and uses it for the layer's output as well."""

    config_requires: ClassVar[dict[str, str]] = {}
    """Class setting: settings a config must give (`mmreason.kv.make_press` refuses it without
    them), each with why. Python code may still leave them at the default (a stage training it)."""

    def fresh(self, call: LayerCall) -> dict[str, torch.Tensor] | None:
        """Before attention: extra per-entry data (B, q) for this call's new tokens, or None."""
        return None

    def compress(self, call: LayerCall) -> None:
        """After attention: shrink or rewrite this layer's cache (`call.keep`, `call.replace`)."""

    def soft_keep(self, call: LayerCall) -> torch.Tensor | None:
        """Differentiable keep weights applied inside attention (training), or None: per key
        (B, H, L), or per query and key (B, 1 or H, q, L)."""
        return None

    def observe_attention(self, call: LayerCall, probs: torch.Tensor) -> None:
        """Training (`soft_keep` forwards): the layer's attention (B, H_q, q, L) before the keep
        weights reshape it — what the model would attend to with nothing dropped. Default: ignored."""

    def keeps_everything(self) -> bool:
        """True when the settings say "keep every entry" (the press then never touches the cache)."""
        return False

    def setup(self, session: "Session") -> None:
        """Called once when the press is applied (e.g. to build modules sized from the model)."""

    def teardown(self, session: "Session") -> None:
        """Called when the press is removed: undo whatever `setup` did to the model."""

    @contextmanager
    def __call__(self, target: Any) -> Iterator["Session"]:
        """Apply this press to `target` (a model, or a `Family` whose model is used)."""
        model = getattr(target, "model", target) if not isinstance(target, torch.nn.Module) else target
        session = Session(self, model)
        try:
            session.install()
            self.setup(session)
            yield session
        finally:
            self.teardown(session)
            session.remove()


class ScorePress(Press):
    """A press that only scores entries: `score(call)` → (B, L) or (B, H, L), higher is kept;
    `budget(call)` → how many to keep per modality. Selection keeps original order."""

    def score(self, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError

    def budget(self, call: LayerCall) -> dict[int, torch.Tensor | int]:
        raise NotImplementedError

    def select(self, call: LayerCall, scores: torch.Tensor | None = None) -> torch.Tensor:
        st = call.state
        scores = self.score(call) if scores is None else scores
        if scores.dim() == 2:
            scores = scores[:, None, :].expand_as(st.valid)
        keep = st.valid & ~torch.isin(st.mod, torch.tensor(list(self.budget_modalities()), device=st.mod.device))
        for modality, k in self.budget(call).items():
            eligible = st.valid if modality is None else st.valid & (st.mod == modality)
            keep |= keep_top(scores, k, eligible, st.col)
        return keep

    def budget_modalities(self) -> tuple[int, ...]:
        """Modalities `budget` rules over; entries of others are kept (default: all of them)."""
        return (TEXT, VISION, SHARED)

    def compress(self, call: LayerCall) -> None:
        scores = self.score(call)
        if not call.prefill and call.drop_lowest(scores, self.budget(call)):
            return
        call.keep(self.select(call, scores))


@dataclass
class PromptRecorder(Press):
    """Keeps every entry and records, per layer, the query and attention settings of the prompt's
    forward — what a prompt-time `compress` reads besides the session's state — so that other
    presses can be replayed on that prompt (`Session.replay_prompt`)."""

    calls: dict[int, tuple[torch.Tensor, dict]] = field(default_factory=dict)

    def compress(self, call: LayerCall) -> None:
        if call.prefill:
            self.calls[call.layer_idx] = (call.query, call.attn_kwargs)


# --- the session: hooks and state while a press is applied --------------------------------------
_ACTIVE_IMPLS: set[str] = set()


def _press_attention(orig: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        session = getattr(module, "_mmreason_session", None)
        session = session() if session is not None else None
        if session is None:
            return ALL_ATTENTION_FUNCTIONS[orig](module, query, key, value, attention_mask, **kwargs)
        return session.attend(module, query, key, value, attention_mask, kwargs)

    return attention


def _register(orig: str) -> str:
    name = IMPL_PREFIX + orig
    if name not in _ACTIVE_IMPLS:
        if orig not in ALL_MASK_ATTENTION_FUNCTIONS or (orig != "eager" and orig not in ALL_ATTENTION_FUNCTIONS):
            raise ValueError(f"presses need an sdpa or eager attention model, got attn_implementation={orig!r}")
        AttentionInterface.register(name, _press_attention(orig))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])
        _ACTIVE_IMPLS.add(name)
    return name


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


class Session:
    """Hooks and per-layer state of one press applied to one model (see the module docstring)."""

    def __init__(self, press: Press, model: torch.nn.Module):
        self.press = press
        self.model = model
        self.decoder = model.get_decoder()
        self.attention_modules = [layer.self_attn for layer in self.decoder.layers]
        self.config = self.attention_modules[0].config
        self.spec: ModalitySpec = modality_spec(model)
        self.rope = Rope(self.decoder.rotary_emb)
        self.orig_impl = self.config._attn_implementation or "eager"
        self.handles: list[Any] = []
        self.stats: dict[str, float] = {"press_seconds": 0.0, "press_prefill_seconds": 0.0,
                                        "press_decode_seconds": 0.0, "generations": 0}
        self.ids_fresh: list[torch.Tensor] = []
        self._reset(None)

    # lifecycle
    def install(self) -> None:
        name = _register(self.orig_impl)
        ref = weakref.ref(self)
        for module in self.attention_modules:
            module._mmreason_session = ref
            self.handles.append(module.register_forward_pre_hook(self._attention_pre_hook, with_kwargs=True))
        self.handles.append(self.model.get_input_embeddings().register_forward_hook(self._embedding_hook))
        self.handles.append(self.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
        self.handles.append(self.decoder.register_forward_hook(self._decoder_hook))
        self.handles += self.spec.watch()  # image layouts the ids alone do not tell (Phi-4-MM's HD crops)
        # set on the decoder's config only (the setter would recurse into vision/audio sub-configs)
        self.config._attn_implementation_internal = name

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.attention_modules:
            if hasattr(module, "_mmreason_session"):
                del module._mmreason_session
        self.config._attn_implementation_internal = self.orig_impl

    def _reset(self, cache: Any) -> None:
        self.cache = cache
        self.states: dict[int, LayerState] = {}
        self.seen = 0
        self.seen_by_mod: torch.Tensor | None = None  # (B, 2) valid tokens seen per modality
        self.next_pos: torch.Tensor | None = None
        self.compressed = False
        # per layer, inside a step before the press acts: during the prompt / during decoding
        self.layer_prefill_peak_bytes: dict[int, int] = {}
        self.layer_peak_bytes: dict[int, int] = {}
        self.forward_index = -1
        self.ids_rest: torch.Tensor | None = None
        self.prompt_modality: torch.Tensor | None = None

    # hooks
    def _embedding_hook(self, module, args, output) -> None:
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            self.ids_fresh = (self.ids_fresh + [ids.detach()])[-4:]

    def _decoder_pre_hook(self, module, args, kwargs):
        cache = cache_kwarg(kwargs)
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        ref = embeds if embeds is not None else ids
        if ref is None and args:
            ref = args[0]
        batch, q_len = ref.shape[0], ref.shape[1]
        if cache is None or cache.get_seq_length() == 0 or cache is not self.cache:
            self._reset(cache)
            self.stats["generations"] += 1
        self.forward_index += 1
        self.forward_scratch: dict[str, Any] = {}
        self.layer_inputs: dict[int, dict[str, Any]] = {}
        mask = kwargs.get("attention_mask")
        self.fwd_valid = (mask[:, -q_len:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2
                          else torch.ones(batch, q_len, dtype=torch.bool, device=ref.device))
        pos = kwargs.get("position_ids")
        if pos is None:
            start = self.next_pos if self.next_pos is not None else torch.zeros(batch, device=ref.device)
            pos = start[:, None] + torch.arange(q_len, device=ref.device)
            if self.compressed:  # the model would count positions from the (shorter) cache
                kwargs["position_ids"] = pos.long()
        elif pos.dim() == 3:  # multimodal rotary (t, h, w): keep the temporal one
            pos = pos[0]
        pos = pos.float().expand(batch, -1)
        self.fwd_pos = pos
        self.next_pos = pos[:, -1] + 1
        self.fwd_q, self.fwd_batch = q_len, batch
        self.fwd_modality: torch.Tensor | None = None
        self.fwd_ids: torch.Tensor | None = None  # (B, q) this forward's token ids, where known
        self.seen += q_len
        return args, kwargs

    def _decoder_hook(self, module, args, output) -> None:
        if self.cache is None:
            self.cache = cache_output(output)

    def _attention_pre_hook(self, module, args, kwargs):
        cache = cache_kwarg(kwargs)
        if cache is not None and self.cache is None:
            self.cache = cache
        self.layer_inputs[module.layer_idx] = {"hidden_states": kwargs.get("hidden_states", args[0] if args else None),
                                              "position_embeddings": kwargs.get("position_embeddings")}
        return None

    def forward_modality(self) -> torch.Tensor:
        """(B, q) modality of this forward's tokens, from the ids the embedding saw (see module doc)."""
        if self.fwd_modality is not None:
            return self.fwd_modality
        b, q = self.fwd_batch, self.fwd_q
        ids = None
        # the latest embedding call shaped like this forward's input (Chameleon also embeds the VQ
        # codes of its images on their own), else what is left of an earlier one (CoCoNuT embeds
        # prompt + latents at once and feeds them over several forwards)
        fresh = [t for t in self.ids_fresh if t.shape[0] == b and t.shape[1] >= q]
        if fresh:
            ids, self.ids_rest = fresh[-1][:, :q], fresh[-1][:, q:]
        elif self.ids_rest is not None and self.ids_rest.shape[0] == b and self.ids_rest.shape[1] >= q:
            ids, self.ids_rest = self.ids_rest[:, :q], self.ids_rest[:, q:]
        self.ids_fresh = []
        if ids is None:  # e.g. a latent thought fed as a hidden state with no id left: text
            mod = torch.zeros(b, q, dtype=torch.int8, device=self.fwd_valid.device)
        else:
            mod = self.spec.modality(ids)
        self.fwd_modality, self.fwd_ids = mod, ids
        counts = torch.stack([((mod == m) & self.fwd_valid).sum(1) for m in (TEXT, VISION)], dim=1)
        self.seen_by_mod = counts if self.seen_by_mod is None else self.seen_by_mod + counts
        if self.forward_index == 0:
            self.prompt_modality = mod
        return mod

    def forward_image_ends(self) -> torch.Tensor | None:
        """(B, q) which of this forward's (valid) tokens end an image the model drew; None when
        none does or the ids are unknown. Computed once per forward."""
        if "image_ends" not in self.forward_scratch:
            self.forward_modality()
            ends = None
            if self.fwd_ids is not None and self.spec.image_end_ids is not None:
                ends = self.spec.closes_image(self.fwd_ids) & self.fwd_valid
                ends = ends if bool(ends.any()) else None
            self.forward_scratch["image_ends"] = ends
        return self.forward_scratch["image_ends"]

    # attention
    def additive_mask(self, state: LayerState, qcols: torch.Tensor, groups: int, dtype: torch.dtype,
                      always: bool = False) -> torch.Tensor | None:
        """(B, H_q or 1, q, L) additive mask: 0 (+ log mass) where valid and causal, dtype-min
        elsewhere; None (no mask needed) for one query over all-valid entries without mass."""
        if not always and qcols.numel() == 1 and state.log_mass is None and bool(state.valid.all()):
            return None
        heads = slice(None) if state.per_head else slice(0, 1)
        valid, col = state.valid[:, heads], state.col[:, heads]
        allowed = valid[:, :, None, :] & (col[:, :, None, :] <= qcols.view(1, 1, -1, 1))
        if state.log_mass is not None:
            bias = state.log_mass[:, heads, None, :].to(dtype)
            mask = bias.masked_fill(~allowed, torch.finfo(dtype).min)
        else:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                                 torch.finfo(dtype).min)
        return mask.repeat_interleave(groups, dim=1) if groups > 1 and state.per_head else mask

    def _append(self, layer: int, q_len: int, n_heads: int, extra: dict[str, torch.Tensor] | None) -> None:
        mod = self.forward_modality()
        b = mod.shape[0]
        cols = torch.arange(self.seen - q_len, self.seen, device=mod.device).expand(b, -1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x[:, None, :].expand(b, n_heads, q_len).contiguous()

        new = LayerState(heads(cols), heads(self.fwd_pos), heads(self.fwd_valid), heads(mod),
                         extra={k: heads(v) for k, v in (extra or {}).items()})
        old = self.states.get(layer)
        if old is None:
            self.states[layer] = new
        else:
            if old.log_mass is not None:
                new.log_mass = torch.zeros_like(new.pos)
            self.states[layer] = old.cat(new)

    def attend(self, module, query, key, value, attention_mask, kwargs):
        layer = module.layer_idx
        call = LayerCall(self, module, query, kwargs)
        extra = self.press.fresh(call) if not self.press.keeps_everything() else None
        self._append(layer, query.shape[2], key.shape[1], extra)
        state = self.states[layer]
        if state.length != key.shape[2]:
            raise RuntimeError(f"layer {layer}: press state holds {state.length} entries, cache {key.shape[2]} "
                               "(was the cache changed outside the press?)")
        orig = ALL_ATTENTION_FUNCTIONS[self.orig_impl] if self.orig_impl != "eager" else _eager
        groups = query.shape[1] // key.shape[1]
        soft = self.press.soft_keep(call)
        if soft is not None:
            out = self._soft_attention(call, query, key, value, soft, groups, kwargs)
        elif (self.press.wants_attention and self.compressed and query.shape[2] == 1
              and kwargs.get("sliding_window") is None):
            # the press reads this step's attention: compute it once, use it for the output too
            # (only once something was dropped: until then the model's own kernel runs, bit for bit)
            probs = call.attention()
            b, hq, _, length = probs.shape
            out = probs.view(b, key.shape[1], groups, length).to(value.dtype) @ value
            out = out.view(b, hq, 1, -1).transpose(1, 2).contiguous()
            out = (out, None)
        elif (not self.compressed or self.forward_index == 0) and state.log_mass is None:
            # (in the prompt's forward no layer's cache is touched before its own attention ran)
            out = orig(module, query, key, value, attention_mask, **kwargs)
        else:
            mask = self.additive_mask(state, call.query_cols(), groups, query.dtype)
            out = orig(module, query, key, value, mask, **kwargs)
        size = key.numel() * key.element_size() + value.numel() * value.element_size()
        peaks = self.layer_prefill_peak_bytes if self.forward_index == 0 else self.layer_peak_bytes
        peaks[layer] = max(peaks.get(layer, 0), size)
        if not self.press.keeps_everything() and self.cache is not None:
            self._compress(call)
        return out

    def _compress(self, call: LayerCall) -> None:
        t0 = time.perf_counter()
        self.press.compress(call)
        seconds = time.perf_counter() - t0
        self.stats["press_seconds"] += seconds
        self.stats["press_prefill_seconds" if self.forward_index == 0 else "press_decode_seconds"] += seconds

    def replay_prompt(self, source: "Session") -> None:
        """Continue from `source` — a session of `PromptRecorder` right after its prompt's forward —
        as if this session's press had been on during that forward: its state and a copy of its
        cache are taken over and the press compresses each layer from what that layer's call saw.
        The result is the same (tests/test_kv_replay.py): inside the prompt's forward each layer
        attends over the whole prompt before its press acts, so neither the forward's outputs nor
        what a prompt-time `compress` reads depend on the press — unless it acts before attention
        too (`fresh`: DARE's router), which is refused. The next forward (a question, decoding) then
        runs under this press as usual. A benchmark prefills once and replays every press."""
        import copy

        if not isinstance(source.press, PromptRecorder) or source.forward_index != 0:
            raise ValueError("replay_prompt: the source must be a PromptRecorder session right after its prompt's "
                             "forward")
        if type(self.press).fresh is not Press.fresh:
            raise ValueError(f"replay_prompt: {type(self.press).__name__} acts before attention in the prompt's "
                             "forward (fresh); run the prompt under it instead")
        self._reset(copy.deepcopy(source.cache))
        self.stats["generations"] += 1
        for name in ("forward_index", "seen", "seen_by_mod", "next_pos", "prompt_modality", "fwd_pos", "fwd_valid",
                     "fwd_q", "fwd_batch", "fwd_modality", "fwd_ids", "layer_inputs"):
            setattr(self, name, getattr(source, name))
        self.layer_prefill_peak_bytes = dict(source.layer_prefill_peak_bytes)
        self.states = {}
        for layer, st in source.states.items():  # copies: `evict` writes in place
            self.states[layer] = LayerState.from_fields({k: v.clone() for k, v in st.fields().items()})
            self.states[layer].per_head = st.per_head
        self.forward_scratch = {}
        if self.press.keeps_everything():
            return
        for module in self.attention_modules:
            query, kwargs = source.press.calls[module.layer_idx]
            self._compress(LayerCall(self, module, query, kwargs))

    def _soft_attention(self, call, query, key, value, soft, groups, kwargs):
        """Eager attention whose weights are multiplied by differentiable keep weights and
        renormalised (Dynamic-LLaVA's masked softmax); a query always keeps its own entry."""
        state = call.state
        qcols = call.query_cols()
        k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        logits = (query @ k.transpose(-1, -2)) * scaling
        logits = logits + self.additive_mask(state, qcols, groups, logits.dtype)
        probs = logits.float().softmax(-1)
        self.press.observe_attention(call, probs.detach())
        if soft.dim() == 4:  # per query: (B, 1 or H, q, L)
            weights = soft.float().expand(-1, key.shape[1], -1, -1)
        else:
            weights = soft.float()[:, :, None, :].expand(-1, -1, query.shape[2], -1)
        own = state.col[:, :, None, :] == qcols.view(1, 1, -1, 1)
        weights = torch.where(own, torch.ones_like(weights), weights)
        weights = weights.repeat_interleave(groups, dim=1) if groups > 1 else weights
        probs = probs * weights
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-9)
        out = probs.to(v.dtype) @ v
        return out.transpose(1, 2).contiguous(), None

    # reporting
    def retained(self) -> dict[str, float]:
        """Cached entries per modality over tokens seen of it, averaged over layers (and heads);
        shared slots are reported as their count per token seen."""
        if not self.states or self.seen_by_mod is None:
            return {}
        seen = self.seen_by_mod.float().sum(0)  # (2,)
        total = {m: 0.0 for m in (TEXT, VISION, SHARED)}
        for st in self.states.values():
            heads = st.valid.shape[1]
            for m in total:
                total[m] += float(((st.mod == m) & st.valid).sum()) / heads
        n = len(self.states)
        all_seen = float(seen.sum())
        out = {}
        for m, name in MODALITY_NAMES.items():
            denom = float(seen[m]) if m in (TEXT, VISION) else all_seen
            if denom > 0:
                out[name] = total[m] / n / denom
        return out


def clamp_budget(factor: float, length: torch.Tensor, lo: int, hi: int | None) -> torch.Tensor:
    """Dynamic cache size: clamp(round(factor × length), lo, hi), never more than `length`."""
    k = torch.round(length.float() * factor).long().clamp(min=lo)
    if hi is not None:
        k = k.clamp(max=hi)
    return torch.minimum(k, length.long())


def check_fraction(name: str, value: float, allow_zero: bool = False) -> None:
    """Retention targets and ratios live in (0, 1] (or [0, 1)); anything else names the setting."""
    from mmreason.config import ConfigError

    ok = (0 <= value <= 1) if allow_zero else (0 < value <= 1)
    if not ok or math.isnan(value):
        span = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{name} must be in {span}, got {value}")


__all__ = ["LayerCall", "LayerState", "Press", "PromptRecorder", "ScorePress", "Session", "check_fraction",
           "clamp_budget", "keep_top"]
