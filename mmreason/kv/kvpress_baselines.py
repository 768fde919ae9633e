"""kvpress (NVIDIA/kvpress 0.5.5) presses as baselines on our backbones.

kvpress is installed with `pip install --no-deps kvpress==0.5.5`: it pins transformers < 5.3 and we
run ≥ 5.23 (tested on 5.25), so pip must not resolve its requirements (it would downgrade
transformers). What breaks on these and our models, and the shim for each:

- `import kvpress` needs `fire` (only its stats-collection CLI uses it): a stub module stands in.
- importing kvpress wraps every attention function transformers knows, process-wide, for its
  head-wise masking; we snapshot and restore the registry around the import (our session masks
  per-head pruning itself).
- kvpress's own hook (`BasePress.forward_hook`) reads `kwargs["cache_position"]`, which
  transformers 5.x no longer passes to attention layers, and assumes batch 1 without padding.
  We do not use it: `KvpressPress` calls the kvpress press's `score()` — the method itself —
  from our session, once per row on that row's unpadded tokens (so sinks, windows and "last
  token" mean what they mean at batch 1), then keeps kvpress's own count per head
  (`compute_n_kept(n, compression_ratio)`, top scores, per head as kvpress does) in our state.
- attention-based scorers (TOVA, SnapKV) get their attention weights from our session (the
  layer's real post-RoPE queries), which also covers Chameleon's q-norm and Phi-4's partial
  rotary that kvpress's own query reconstruction does not handle.
- `ExpectedAttentionPress` rebuilds pre-RoPE queries itself: its query helper is replaced by one
  that knows Chameleon (q_norm) and Phi-4 (fused qkv_proj), its RoPE average by one that rotates
  only the rotary channels (and makes its tensors on the queries' device, where kvpress's own
  makes some on the default device), and attention layers get `rotary_emb` while the press is
  applied.

Like kvpress, these presses compress once, after the prompt.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from mmreason.config import ConfigError
from mmreason.kv.base import LayerCall, Press, Session

METHODS = {
    "tova": "TOVAPress",
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "random": "RandomPress",
}
"""Registry name (`kvpress:<name>`) → kvpress class."""

INSTALL_HINT = "pip install --no-deps kvpress==0.5.5"


def import_kvpress() -> types.ModuleType:
    """`import kvpress` with the shims above; a missing install is an error that says how to install."""
    if "kvpress" in sys.modules:
        return sys.modules["kvpress"]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if importlib.util.find_spec("kvpress") is None:
        raise ConfigError(f"press: kvpress baselines need kvpress installed: {INSTALL_HINT}")
    if importlib.util.find_spec("fire") is None:
        sys.modules["fire"] = types.ModuleType("fire")
    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    try:
        module = importlib.import_module("kvpress")
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)
    _patch_expected_attention(module)
    return module


def prerope_queries(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) queries before RoPE for the three families' attention layers (and Llama-likes)."""
    bsz, q_len, _ = hidden_states.shape
    heads, dim = module.config.num_attention_heads, module.head_dim
    if hasattr(module, "qkv_proj"):  # Phi-3 / Phi-4: fused projection, queries first
        q = module.qkv_proj(hidden_states)[..., : heads * dim]
    else:
        q = module.q_proj(hidden_states)
    q_norm = getattr(module, "q_norm", None)
    if q_norm is not None and type(module).__name__.startswith("Chameleon"):
        q = q_norm(q.reshape(-1, heads, dim))  # Chameleon normalises (tokens, heads, dim)
    q = q.reshape(bsz, q_len, heads, dim).transpose(1, 2)
    if q_norm is not None and not type(module).__name__.startswith("Chameleon"):
        q = q_norm(q)  # Qwen3 / Gemma3: per head
    return q


def _patch_expected_attention(kvpress: types.ModuleType) -> None:
    ea = importlib.import_module("kvpress.presses.expected_attention_press")
    ea.get_prerope_query_states = prerope_queries
    if getattr(ea.ExpectedAttentionPress.apply_avg_rope, "_mmreason_shim", False):
        return

    def apply_avg_rope(self, module, mu, cov, q_len):
        # kvpress's own: the average rotation over the next positions, for every head channel; this
        # one rotates only the first rd channels under partial rotary (Phi-4) and builds its index
        # tensors on mu's device (kvpress's are made on the default device, then moved or copied)
        position_ids = torch.arange(q_len, q_len + self.n_future_positions, device=mu.device).unsqueeze(0)
        cos, sin = module.rotary_emb(mu, position_ids)
        dim, rd = module.head_dim, cos.shape[-1]
        cos, sin = cos[0], sin[0]
        eye = torch.eye(rd, device=cos.device, dtype=cos.dtype)
        half = torch.zeros(rd, rd, device=cos.device, dtype=cos.dtype)
        half[rd // 2 :, : rd // 2] = torch.eye(rd // 2, device=cos.device, dtype=cos.dtype)
        half[: rd // 2, rd // 2 :] = -torch.eye(rd // 2, device=cos.device, dtype=cos.dtype)
        block = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * half).mean(0)
        rot = torch.eye(dim, device=cos.device, dtype=cos.dtype)
        rot[:rd, :rd] = block
        mu = mu @ rot.T.to(mu.dtype)
        if cov is not None:
            cov = rot.to(cov.dtype) @ cov @ rot.T.to(cov.dtype)
        return mu, cov

    apply_avg_rope._mmreason_shim = True
    ea.ExpectedAttentionPress.apply_avg_rope = apply_avg_rope


def kvpress_fields(method: str) -> dict[str, dataclasses.Field]:
    """The settings of kvpress's press for `method` (its dataclass fields)."""
    if method not in METHODS:
        raise ConfigError(f"press: unknown kvpress method {method!r} (known: {', '.join(METHODS)})")
    cls = getattr(import_kvpress(), METHODS[method])
    return {f.name: f for f in dataclasses.fields(cls)}


@dataclass
class KvpressPress(Press):
    method: str = "snapkv"
    """One of METHODS (`kvpress:<method>` in the press registry)."""
    compression_ratio: float = 0.5
    """Fraction of each row's prompt entries removed (kvpress's own meaning)."""
    options: dict[str, Any] = field(default_factory=dict)
    """kvpress's other settings for this method (window_size, n_sink, …)."""

    def __post_init__(self) -> None:
        known = kvpress_fields(self.method)
        if not 0 <= self.compression_ratio < 1:
            raise ConfigError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        for key in self.options:
            if key not in known or key == "compression_ratio":
                settable = sorted(k for k in known if k != "compression_ratio")
                raise ConfigError(f"unknown setting {key!r} for kvpress:{self.method} "
                                  f"(known: compression_ratio, {', '.join(settable)})")
        kvpress = import_kvpress()
        try:
            self.inner = getattr(kvpress, METHODS[self.method])(compression_ratio=self.compression_ratio,
                                                                **self.options)
        except (AssertionError, TypeError, ValueError) as exc:
            raise ConfigError(f"kvpress:{self.method}: {exc}") from None

    def keeps_everything(self) -> bool:
        return self.compression_ratio == 0

    def setup(self, session: Session) -> None:
        self._added_rotary = []
        for module in session.attention_modules:
            if not hasattr(module, "rotary_emb"):
                module.rotary_emb = session.decoder.rotary_emb
                self._added_rotary.append(module)

    def teardown(self, session: Session) -> None:
        for module in getattr(self, "_added_rotary", []):
            del module.rotary_emb
        self._added_rotary = []

    def _window(self) -> int | None:
        if self.method == "tova":
            return 1
        if self.method == "snapkv":
            return self.inner.window_size
        return None

    def compress(self, call: LayerCall) -> None:
        if not call.prefill:
            return
        from kvpress.utils import compute_n_kept

        st = call.state
        window = self._window()
        attn = call.attention(window) if window else None
        cos, sin = call.session.layer_inputs[call.layer_idx]["position_embeddings"]
        keep = torch.zeros_like(st.valid)
        for b in range(st.valid.shape[0]):
            idx = st.valid[b, 0].nonzero().flatten()
            n = idx.numel()
            kwargs = {"position_embeddings": (cos[b : b + 1, idx], sin[b : b + 1, idx]), "attention_mask": None}
            scores = self.inner.score(call.module, call.hidden_states[b : b + 1, idx], call.keys[b : b + 1, :, idx],
                                      call.values[b : b + 1, :, idx],
                                      attn[b : b + 1][..., idx] if attn is not None else None, kwargs)
            top = scores[0].topk(compute_n_kept(n, self.compression_ratio), dim=-1).indices  # (H, n_kept)
            keep[b].scatter_(-1, idx[top], True)
        call.keep(keep)
