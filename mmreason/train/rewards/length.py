"""Length penalties for RL with rule rewards. Each is a reward with the fixed signature
`(data_source, solution_str, ground_truth, extra, **settings)` that reads the reply's length in
tokens from `extra["length"]` and returns one component, `{"length_penalty": value <= 0}` (Kimi's
may be positive); settings come from the config (`rl.rewards[i].kwargs`).

- `threshold_length_penalty` (seed 004, "threshold-based length penalty"): nothing up to
  `threshold` tokens, then linear / quadratic / exponential in the excess. The accuracy component is
  kept: the penalty is capped at `max_penalty` < 1 (the reward of a right answer), so a right answer
  always scores above a wrong one whatever their lengths, and the accuracy is logged on its own.
- `kimi_length_penalty` (Kimi k1.5, arXiv 2501.12599, §2.3.3): within the group of samples of one
  prompt, λ = 0.5 − (len − min_len) / (max_len − min_len); a right answer gets λ, a wrong one
  min(0, λ) (short wrong answers are not rewarded). Reads `extra["group_lengths"]` and the accuracy
  component computed before it, `extra["accuracy"]`.
- `dapo_overlong_penalty` (DAPO, arXiv 2503.14476, Eq. 13, "soft overlong punishment"): 0 up to
  L_max − L_cache, then linear down to −1 at L_max, −1 beyond.
"""

from __future__ import annotations

import math
from typing import Any, Literal

KINDS = ("linear", "quadratic", "exponential")


def threshold_length_penalty(data_source: str, solution_str: str, ground_truth: str, extra: dict[str, Any], *,
                             threshold: int, factor: float,
                             kind: Literal["linear", "quadratic", "exponential"] = "linear",
                             max_penalty: float = 0.5) -> dict[str, float]:
    """−min(max_penalty, p(excess)), excess = max(0, length − threshold), with p = factor·excess
    (linear), factor·excess² (quadratic) or exp(factor·excess) − 1 (exponential)."""
    if kind not in KINDS:
        raise ValueError(f"threshold_length_penalty: kind must be one of {KINDS}, got {kind!r}")
    if threshold < 0 or factor < 0:
        raise ValueError(f"threshold_length_penalty: threshold and factor must be >= 0, got {threshold}, {factor}")
    if not 0 <= max_penalty < 1:
        raise ValueError(f"threshold_length_penalty: max_penalty must lie in [0, 1) so a right answer keeps "
                         f"scoring above a wrong one, got {max_penalty}")
    excess = max(0, int(extra["length"]) - threshold)
    if kind == "linear":
        raw = factor * excess
    elif kind == "quadratic":
        raw = factor * excess**2
    else:
        raw = math.expm1(min(factor * excess, 50.0))  # capped below anyway; avoid overflow
    return {"length_penalty": -min(max_penalty, raw)}


def kimi_length_penalty(data_source: str, solution_str: str, ground_truth: str,
                        extra: dict[str, Any]) -> dict[str, float]:
    """Kimi k1.5's length reward: λ for a right answer, min(0, λ) for a wrong one; 0 when every
    sample of the group has the same length."""
    lengths = extra["group_lengths"]
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return {"length_penalty": 0.0}
    lam = 0.5 - (int(extra["length"]) - lo) / (hi - lo)
    correct = extra.get("accuracy", 0.0) > 0
    return {"length_penalty": lam if correct else min(0.0, lam)}


def dapo_overlong_penalty(data_source: str, solution_str: str, ground_truth: str, extra: dict[str, Any], *,
                          cache_length: int, max_length: int | None = None) -> dict[str, float]:
    """DAPO's soft overlong punishment; `max_length` (L_max) defaults to the sampling budget
    `extra["max_new_tokens"]`, `cache_length` is L_cache."""
    l_max = int(extra["max_new_tokens"]) if max_length is None else max_length
    if not 0 < cache_length <= l_max:
        raise ValueError(f"dapo_overlong_penalty: cache_length must lie in (0, max_length={l_max}], got {cache_length}")
    length = int(extra["length"])
    if length <= l_max - cache_length:
        return {"length_penalty": 0.0}
    if length <= l_max:
        return {"length_penalty": (l_max - cache_length - length) / cache_length}
    return {"length_penalty": -1.0}
