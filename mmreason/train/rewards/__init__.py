"""Rule rewards for the `rl` stage, chosen in config by dotted path (verl's custom reward style).

A reward is a plain function with one fixed signature,

    fn(data_source, solution_str, ground_truth, extra, **kwargs) -> float | dict[str, float]

called once per sampled reply: `data_source` is the row's task, `solution_str` the decoded reply,
`ground_truth` the answer letter, `extra` a dict with the row's `meta` (parsed) and `choices`, the
reply's `length` in tokens, whether it was `truncated` at the sampling budget `max_new_tokens`, the
lengths of every reply to the same prompt (`group_lengths`) and the `accuracy` component scored so
far. `kwargs` are the term's settings from the config. A float is one component named after the
function; a dict names its components (`accuracy`, `length_penalty`, …). A config lists terms:

    rl:
      rewards:
        - {fn: mmreason.train.rewards.correctness.multiple_choice_correct}
        - {fn: mmreason.train.rewards.length.threshold_length_penalty, kwargs: {threshold: 60, factor: 0.01}}

Terms run in order; the reward is the weighted sum of every component, and each component is
logged on its own. `check_terms` resolves and checks every path and signature when the config is
loaded, so a typo fails before any worker starts.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mmreason.config import ConfigError

SIGNATURE = ("data_source", "solution_str", "ground_truth", "extra")
DEFAULT_REWARD = "mmreason.train.rewards.correctness.multiple_choice_correct"


@dataclass
class RewardTerm:
    fn: str = DEFAULT_REWARD
    """Dotted path of a reward function fn(data_source, solution_str, ground_truth, extra, **kwargs)."""
    weight: float = 1.0
    """Multiplies every component the function returns."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword settings passed to the function (e.g. a length penalty's threshold)."""


def load_reward(path: str, where: str = "reward") -> Callable[..., Any]:
    """The function at dotted `path` (`package.module.function`); errors name `where` and the path."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}: {path!r} is not a dotted path (package.module.function)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} of reward {path!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{where}: module {module_name!r} has no reward function {attr!r} ({path!r})")
    if not callable(fn):
        raise ConfigError(f"{where}: {path!r} is a {type(fn).__name__}, not a function")
    return fn


def check_signature(fn: Callable[..., Any], kwargs: dict[str, Any], path: str, where: str = "reward") -> None:
    """`fn` must take the four positional arguments of a reward plus exactly the configured kwargs."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    expected = f"fn({', '.join(SIGNATURE)}, **kwargs)"
    if len(positional) < len(SIGNATURE) and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ConfigError(f"{where}: reward {path!r} has the signature {fn.__name__}{sig}, but a reward is called "
                          f"as {expected}")
    try:
        sig.bind(*SIGNATURE, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: reward {path!r} {fn.__name__}{sig} cannot be called as {expected} with "
                          f"kwargs {sorted(kwargs)}: {exc}") from None


def check_terms(terms: list[RewardTerm], where: str = "rl.rewards") -> list[Callable[..., Any]]:
    """Resolve and check every term; returns the functions."""
    if not terms:
        raise ConfigError(f"{where}: give at least one reward term")
    fns = []
    for i, term in enumerate(terms):
        at = f"{where}[{i}].fn"
        fn = load_reward(term.fn, at)
        check_signature(fn, term.kwargs, term.fn, at)
        fns.append(fn)
    return fns


class Rewards:
    """The configured terms, ready to score replies."""

    def __init__(self, terms: list[RewardTerm]):
        self.terms = list(terms)
        self.fns = check_terms(self.terms)

    def score(self, data_source: str, solution_str: str, ground_truth: str, extra: dict[str, Any]) -> dict[str, float]:
        """Weighted components of one reply, and their sum under `total`."""
        components: dict[str, float] = {}
        extra = dict(extra)
        extra.setdefault("accuracy", 0.0)
        for term, fn in zip(self.terms, self.fns):
            out = fn(data_source, solution_str, ground_truth, extra, **term.kwargs)
            parts = out if isinstance(out, dict) else {fn.__name__: out}
            for name, value in parts.items():
                if isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"reward {term.fn!r} returned {name}={value!r}; components must be finite numbers")
                components[name] = components.get(name, 0.0) + term.weight * float(value)
            extra["accuracy"] = components.get("accuracy", 0.0)
        return {**components, "total": sum(components.values())}

    def dry_run(self, row: dict[str, Any], max_new_tokens: int) -> dict[str, float]:
        """Score a made-up reply to a real row, so bad settings (a penalty's `kind`, …) fail before
        training rather than in a worker."""
        import json

        extra = {"meta": json.loads(row["meta"]) if isinstance(row["meta"], str) else row["meta"],
                 "choices": list(row["choices"]), "length": 3, "truncated": False, "max_new_tokens": max_new_tokens,
                 "group_lengths": [3, 5]}
        try:
            return self.score(row["task"], f"The answer is {row['answer']}.", row["answer"], extra)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"rl.rewards: scoring a reply to row {row['id']} failed: {type(exc).__name__}: {exc}") from None


__all__ = ["DEFAULT_REWARD", "SIGNATURE", "RewardTerm", "Rewards", "check_signature", "check_terms", "load_reward"]
