"""Evaluation in the three modes — `vanilla` (answer directly), `cot` (reasoning steps, then the
answer), `coconut` (latent thoughts, then the answer) — each with its own generation settings.

Accuracy reads the final `The answer is X.` with `mmreason.tasks.parse_answer`; tokens per answer
count the generated tokens (latent thoughts are not tokens and are reported separately, as
`latents_per_answer`). `coconut` mode reads thoughts as the model was trained to (`Family.thought`):
a pause model's pause tokens count as its latents, a `none` model has 0. A-OKVQA
rows are also scored as direct answers: the chosen option's text against the annotators' answers
(`mmreason.data.aokvqa.direct_answer_score`, the official rule), reported as `<mode>_direct_answer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from mmreason.latent.coconut import GenerationSettings, generate
from mmreason.models.base import Family
from mmreason.tasks import parse_answer

MODES = ("vanilla", "cot", "coconut")


def _default_modes() -> dict[str, GenerationSettings]:
    return {
        "vanilla": GenerationSettings(max_new_tokens=16),
        "cot": GenerationSettings(max_new_tokens=320),
        "coconut": GenerationSettings(max_new_tokens=320),
    }


@dataclass
class EvalConfig:
    modes: dict[str, GenerationSettings] = field(default_factory=_default_modes)
    """Generation settings per evaluation mode (vanilla, cot, coconut)."""
    batch_size: int = 64
    max_examples: int | None = 200
    """Held-out rows to evaluate after training (None = all)."""
    epoch_examples: int = 100
    """Held-out rows evaluated after every epoch during training (0 = none)."""
    seed: int = 0

    def __post_init__(self) -> None:
        from mmreason.config import ConfigError

        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(f"eval.modes: unknown mode {mode!r} (known: {', '.join(MODES)})")


@dataclass
class EvalResult:
    mode: str
    accuracy: float
    tokens_per_answer: float
    latents_per_answer: int
    n: int
    predictions: list[dict[str, Any]]

    def by(self, key: str) -> dict[str, float]:
        """Accuracy per value of a prediction field (e.g. `size`)."""
        groups: dict[str, list[bool]] = {}
        for p in self.predictions:
            groups.setdefault(str(p.get(key)), []).append(p["correct"])
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    @property
    def direct_answer(self) -> float | None:
        """Mean A-OKVQA direct-answer score over the rows that have one (None: no such rows)."""
        scores = [p["direct_answer"] for p in self.predictions if "direct_answer" in p]
        return sum(scores) / len(scores) if scores else None

    def metrics(self) -> dict[str, float]:
        out = {f"{self.mode}_accuracy": self.accuracy, f"{self.mode}_tokens_per_answer": self.tokens_per_answer}
        if self.direct_answer is not None:
            out[f"{self.mode}_direct_answer"] = self.direct_answer
        return out


def direct_answer(row: dict[str, Any], meta: dict[str, Any], prediction: str | None) -> dict[str, float]:
    """`{"direct_answer": score}` for an A-OKVQA row the official evaluation counts, else {}: the
    predicted letter's option text scored against the annotators' direct answers."""
    from mmreason.data.aokvqa import direct_answer_eligible, direct_answer_score
    from mmreason.tasks.base import LETTERS

    if not direct_answer_eligible(meta):
        return {}
    choices = list(row.get("choices") or [])
    index = LETTERS.find(prediction) if prediction and len(prediction) == 1 else -1
    text = choices[index] if 0 <= index < len(choices) else None
    return {"direct_answer": direct_answer_score(text, meta["direct_answers"])}


def evaluate(family: Family, rows: Iterable[dict[str, Any]], mode: str, settings: GenerationSettings,
             n_latent_steps: int = 0, c_thought: int = 1, batch_size: int = 64, seed: int = 0) -> EvalResult:
    """Generate for every row in `mode` and score the answers."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r} (known: {', '.join(MODES)})")
    rows = list(rows)
    n_latents = n_latent_steps * c_thought if mode == "coconut" and family.thought != "none" else 0
    target = {"vanilla": "vanilla", "cot": "cot", "coconut": "latent"}[mode]
    # on the model's device: `torch.multinomial` draws with a generator of the probabilities' device
    generator = torch.Generator(device=family.model.device).manual_seed(seed)
    was_training = family.model.training
    family.model.eval()
    predictions = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            items = [family.encode(r, target, n_latent_steps, c_thought, with_target=False) for r in chunk]
            outs = generate(family, family.collate(items, pad_side="left"), n_latents, settings, generator)
            for row, ids in zip(chunk, outs):
                text = family.tokenizer.decode(ids, skip_special_tokens=False)
                pred = parse_answer(text)
                meta = json.loads(row["meta"])
                predictions.append({"id": row["id"], "task": row["task"], "size": meta.get("size"),
                                    "answer": row["answer"], "prediction": pred, "correct": pred == row["answer"],
                                    "n_tokens": len(ids), "output": text, **direct_answer(row, meta, pred)})
    finally:
        family.model.train(was_training)
    n = len(predictions)
    return EvalResult(
        mode=mode,
        accuracy=sum(p["correct"] for p in predictions) / n if n else 0.0,
        tokens_per_answer=sum(p["n_tokens"] for p in predictions) / n if n else 0.0,
        latents_per_answer=n_latents,
        n=n,
        predictions=predictions,
    )
