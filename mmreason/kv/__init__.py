"""KV-cache presses: a press is a dataclass of settings; `with press(model):` (or `press(family)`)
applies it to generation — `mmreason.latent.coconut.generate`, `mmreason.eval.runner.evaluate` or
HF `model.generate` — and removes its hooks after. Mechanics in `mmreason.kv.base`, accounting in
`mmreason.kv.accounting`.

| name | press | what it does |
|---|---|---|
| `tova` | `TovaPress` | keep the top entries by the current query's attention, every step |
| `dare` | `DarePress` | learned per-modality routers, top-k per modality, pruned from a layer on |
| `cosre` | `CosrePress` | blockwise DCT of each image's cached grid + shared slots / residuals, the answer folded in as it grows |
| `hico` | `HicoPress` | video frames: merge per frame and clip, drop progressively deeper |
| `mvot_window` | `MvotWindowPress` | MVoT's context: prompt images, text and the latest drawn image; older drawn images dropped |
| `kvpress:<method>` | `KvpressPress` | kvpress baselines: tova, snapkv, streaming_llm, knorm, expected_attention, random |

Adding a press: a module with the dataclass, one line in `PRESSES`, a config, a test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

from mmreason.config import ConfigError, from_dict
from mmreason.kv.accounting import KVMeter
from mmreason.kv.base import LayerCall, LayerState, Press, ScorePress, Session
from mmreason.kv.cosre import CosrePress
from mmreason.kv.dare import DarePress, DareRouter, anneal_temperature, ratio_loss
from mmreason.kv.hico import HicoPress
from mmreason.kv.mvot_window import MvotWindowPress
from mmreason.kv.tova import TovaPress

PRESSES: dict[str, type[Press]] = {"tova": TovaPress, "dare": DarePress, "cosre": CosrePress, "hico": HicoPress,
                                 "mvot_window": MvotWindowPress}
KVPRESS_PREFIX = "kvpress:"
NO_PRESS = "none"


def press_names() -> list[str]:
    from mmreason.kv.kvpress_baselines import METHODS

    return [NO_PRESS, *PRESSES, *(KVPRESS_PREFIX + m for m in METHODS)]


def make_press(name: str, settings: dict[str, Any] | None = None, pending: Collection[str] = ()) -> Press | None:
    """The press `name` with `settings` (its fields); None for "none". Unknown names, unknown keys,
    bad values and a missing required setting (`Press.config_requires`: DARE's `router_path`) raise
    `ConfigError` naming them — before any model is touched. `pending`: required settings a later
    step fills in (a router a stage is about to train) — for checking the rest only; the press built
    then leaves them at their defaults."""
    settings = dict(settings or {})
    if name == NO_PRESS:
        if settings:
            raise ConfigError(f"press 'none' takes no settings, got {', '.join(settings)}")
        return None
    if name.startswith(KVPRESS_PREFIX):
        from mmreason.kv.kvpress_baselines import KvpressPress, kvpress_fields

        method = name[len(KVPRESS_PREFIX):]
        known = kvpress_fields(method)  # unknown method: error naming it
        ratio = settings.pop("compression_ratio", 0.5)
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"press.compression_ratio must be a number, got {ratio!r}") from None
        for key in settings:
            if key not in known:
                raise ConfigError(f"press.{key}: unknown setting for {name} (known: "
                                  f"{', '.join(sorted(known))})")
        try:
            return KvpressPress(method=method, compression_ratio=ratio, options=settings)
        except ConfigError as exc:
            raise ConfigError(f"press {name}: {exc}") from None
    if name not in PRESSES:
        raise ConfigError(f"press: unknown press {name!r} (known: {', '.join(press_names())})")
    cls = PRESSES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in settings:
        if key not in known:
            raise ConfigError(f"press.{key}: unknown setting for press {name!r} (known: {', '.join(sorted(known))})")
    press = from_dict(cls, settings, source=f"press {name}", prefix="press.")  # bad values first
    for key, why in cls.config_requires.items():
        if settings.get(key) in (None, "") and key not in pending:
            raise ConfigError(f"press.{key}: press {name!r} needs it — {why}")
    return press


__all__ = ["CosrePress", "DarePress", "DareRouter", "HicoPress", "KVMeter", "LayerCall", "LayerState",
           "MvotWindowPress", "PRESSES", "Press", "ScorePress", "Session", "TovaPress", "anneal_temperature",
           "make_press", "press_names", "ratio_loss"]
