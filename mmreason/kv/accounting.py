"""KV accounting: exact cache bytes per layer after prefill and at the peak of decoding, the bytes
the uncompressed cache would hold, retained fraction per modality, and prefill / decode timing.

    with press(family) as session, KVMeter(family.model, session) as meter:
        evaluate(family, rows, "cot", settings)
    meter.summary()

Bytes are the cache tensors' own (`numel × element_size` of each layer's keys and values), read
after every forward of the model; with a press, the moment inside a step when the newest entry is
in and nothing has been dropped yet is counted too (the press session reports it), so the peak is
the true high-water mark of decoding. A generation starts at a forward with an empty cache
(prefill); every later forward (latent thoughts, decoded tokens) is decoding. Presses that act
after the prompt hold the whole prompt for a moment inside the prefill forward; that transient is
reported on its own (`kv_bytes_prefill_transient`).

Under a press session the meter also records what the cache holds at its peak, per modality
(`cache_composition`, read from the session's per-entry state after the forward that left the
cache largest): `image_share_peak` is the share of those bytes that are image entries — prompt
images and images the model drew (MVoT's visual thoughts). Without a session the meter cannot
tell entries apart (a generation feeds embeddings, not ids); a press that keeps everything gives
one (`Press()`: the model's output is unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


def cache_kwarg(kwargs: dict[str, Any]) -> Any:
    """The KV cache a model or attention forward hook sees in its kwargs: `cache` since transformers
    5.25 (which renamed `past_key_values`, kept as a deprecated alias at the top-level call), else
    `past_key_values`."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def cache_output(output: Any) -> Any:
    """The KV cache a model forward returned (`cache` since transformers 5.25, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def layer_bytes(cache: Any) -> list[int]:
    """Bytes of keys + values per layer of a transformers cache."""
    return [tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
            for layer in cache.layers]


def full_layer_bytes(cache: Any, columns: int) -> list[int]:
    """What each layer would hold uncompressed after `columns` tokens (batch × heads × columns × dim × 2)."""
    out = []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or k.dim() != 4:
            out.append(0)
            continue
        b, h, _, d = k.shape
        out.append(b * h * columns * (d * k.element_size() + v.shape[-1] * v.element_size()))
    return out


def cache_composition(states: dict[int, Any], cache: Any) -> dict[str, int]:
    """Bytes each modality's entries hold in `cache`: {"text", "vision", "shared"} (CoSRe's slots),
    summed over layers, rows and heads (per-head pruning counts per head). `states` are a press
    session's per-layer `LayerState`s (`Session.states`: each entry's modality and whether it is
    real); padding and entries dropped for a row count in none. An entry's bytes are its layer's
    key + value head dims × their element sizes."""
    from mmreason.kv.modality import MODALITY_NAMES

    out = dict.fromkeys(MODALITY_NAMES.values(), 0)
    for index, state in states.items():
        layer = cache.layers[index]
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or k.dim() != 4:
            continue
        per_entry = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()
        for mod, name in MODALITY_NAMES.items():
            out[name] += int(((state.mod == mod) & state.valid).sum()) * per_entry
    return out


def image_share(composition: dict[str, int]) -> float | None:
    """Share of a cache's entry bytes (`cache_composition`) that are image entries; None when empty."""
    total = sum(composition.values())
    return composition.get("vision", 0) / total if total else None


@dataclass
class GenerationRecord:
    rows: int
    prefill_columns: int
    prefill_bytes: list[int]
    full_prefill_bytes: list[int]
    peak_bytes: list[int]
    columns: int = 0
    full_final_bytes: list[int] = field(default_factory=list)
    prefill_transient_bytes: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_forwards: int = 0
    retained_prefill: dict[str, float] = field(default_factory=dict)
    retained_final: dict[str, float] = field(default_factory=dict)
    peak_composition: dict[str, int] = field(default_factory=dict)
    """`cache_composition` after the forward that left the cache largest (a session's only)."""
    peak_total: int = 0
    """That forward's cache bytes."""


class KVMeter:
    """Forward hooks on `model` that record a `GenerationRecord` per generation (see module doc)."""

    def __init__(self, model: torch.nn.Module, session: Any = None):
        self.model = model
        self.session = session
        self.records: list[GenerationRecord] = []
        self._handles: list[Any] = []
        self._t0 = 0.0
        self._new = False

    def __enter__(self) -> "KVMeter":
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._finish()

    def _pre(self, module, args, kwargs) -> None:
        cache = cache_kwarg(kwargs)
        self._new = cache is None or cache.get_seq_length() == 0
        if self._new:
            self._finish()
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids", args[0] if args else None)
        self._q = ref.shape[1]
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        seconds = time.perf_counter() - self._t0
        cache = cache_output(output)
        if cache is None:
            return
        now = layer_bytes(cache)
        if self._new:
            rec = self._start(cache, self._q, seconds)
        else:
            rec = self.records[-1]
            rec.columns += self._q
            rec.decode_seconds += seconds
            rec.decode_forwards += 1
            rec.peak_bytes = [max(a, b) for a, b in zip(rec.peak_bytes, now)]
        if self.session is not None and not self._new:  # inside a step: newest entry in, none dropped yet
            inner = self.session.layer_peak_bytes
            rec.peak_bytes = [max(a, inner.get(i, 0)) for i, a in enumerate(rec.peak_bytes)]
            self._compose(rec, cache, now)
        rec.full_final_bytes = full_layer_bytes(cache, rec.columns)

    def _compose(self, rec: GenerationRecord, cache: Any, now: list[int]) -> None:
        """What the cache holds, if it is the largest it has been after a forward (ties: the later)."""
        if sum(now) >= rec.peak_total and self.session.states:
            rec.peak_total = sum(now)
            rec.peak_composition = cache_composition(self.session.states, cache)

    def prompt_done(self, cache: Any, columns: int, seconds: float) -> None:
        """Start a generation's record from a prompt that did not run under this meter (`columns`
        tokens, `seconds` to prefill; `Session.replay_prompt`): its cache is the prompt's, and the
        generation's later forwards are metered as decoding."""
        self._finish()
        self._start(cache, columns, seconds)

    def _start(self, cache: Any, columns: int, seconds: float) -> GenerationRecord:
        now = layer_bytes(cache)
        rows = next(t.shape[0] for t in (getattr(layer, "keys", None) for layer in cache.layers) if t is not None)
        rec = GenerationRecord(rows=rows, prefill_columns=columns, prefill_bytes=now,
                               full_prefill_bytes=full_layer_bytes(cache, columns), peak_bytes=list(now),
                               columns=columns, prefill_seconds=seconds)
        rec.prefill_transient_bytes = list(now)
        if self.session is not None:
            rec.retained_prefill = self.session.retained()
            inner = self.session.layer_prefill_peak_bytes
            rec.prefill_transient_bytes = [max(a, inner.get(i, 0)) for i, a in enumerate(now)]
            self._compose(rec, cache, now)
        rec.full_final_bytes = full_layer_bytes(cache, columns)
        self.records.append(rec)
        return rec

    def _finish(self) -> None:
        if self.records and self.session is not None and not self.records[-1].retained_final:
            self.records[-1].retained_final = self.session.retained()

    def summary(self) -> dict[str, Any]:
        """Totals over all generations, per example where it says so."""
        recs = self.records
        rows = sum(r.rows for r in recs)
        if not rows:
            return {}

        def total(attr: str) -> int:
            return sum(sum(getattr(r, attr)) for r in recs)

        def per_layer(attr: str) -> list[float]:
            return [sum(getattr(r, attr)[i] for r in recs) / rows for i in range(len(getattr(recs[0], attr)))]

        out: dict[str, Any] = {
            "generations": len(recs),
            "examples": rows,
            "kv_bytes_prefill": total("prefill_bytes") / rows,
            "kv_bytes_peak": total("peak_bytes") / rows,
            "kv_bytes_full_prefill": total("full_prefill_bytes") / rows,
            "kv_bytes_full_final": total("full_final_bytes") / rows,
            "kv_bytes_prefill_transient": total("prefill_transient_bytes") / rows,
            "kv_fraction_prefill": total("prefill_bytes") / max(1, total("full_prefill_bytes")),
            "kv_fraction_peak": total("peak_bytes") / max(1, total("full_final_bytes")),
            "kv_bytes_prefill_per_layer": per_layer("prefill_bytes"),
            "kv_bytes_peak_per_layer": per_layer("peak_bytes"),
            "prefill_seconds": sum(r.prefill_seconds for r in recs),
            "prefill_ms_per_example": 1000 * sum(r.prefill_seconds for r in recs) / rows,
            "decode_seconds": sum(r.decode_seconds for r in recs),
            "decode_forwards": sum(r.decode_forwards for r in recs),
        }
        composed = [r.peak_composition for r in recs if r.peak_composition]
        if composed:  # bytes, so every generation weighs by its rows and length
            out["image_share_peak"] = image_share({k: sum(c.get(k, 0) for c in composed) for k in composed[0]})
        for when in ("prefill", "final"):
            names = {k for r in recs for k in getattr(r, f"retained_{when}")}
            for name in sorted(names):
                weighted = sum(getattr(r, f"retained_{when}").get(name, 0.0) * r.rows for r in recs)
                out[f"retained_{name}_{when}"] = weighted / rows
        return out
