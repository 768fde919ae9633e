"""What every backbone family shares: turning an example row into token ids and labels, padding a
batch, and the hooks a family fills in (how images enter the token stream and the embeddings).

Sequence layout (all families, all stages):

    <bos> PROMPT(with image runs) \\n [<|start-latent|> <|latent|>×n <|end-latent|>] STEPS \\n ANSWER <eos>

Only the part after the prompt (and after the latents) is in the loss. `n` latents replace the
first `n / c_thought` steps (CoCoNuT's curriculum); vanilla targets hold the answer sentence only.
"""

from __future__ import annotations

import abc
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from PIL import Image

from mmreason.models.tokenizer import END_LATENT, IMAGE, LATENT, START_LATENT
from mmreason.tasks.base import answer_sentence

IGNORE = -100
Target = Literal["cot", "vanilla", "latent"]


def as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.open(io.BytesIO(image)).convert("RGB")


@dataclass
class Encoded:
    """One row as token ids; `images` are the prompt images in order of their placeholders."""

    input_ids: list[int]
    labels: list[int]
    images: list[Image.Image] = field(default_factory=list)
    n_latents: int = 0
    prompt_len: int = 0


class Family(abc.ABC):
    """A backbone family: subclasses say how images enter the sequence and the embeddings."""

    name: ClassVar[str]
    model_class: ClassVar[type]

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.latent_id = tokenizer.convert_tokens_to_ids(LATENT)
        self.start_latent_id = tokenizer.convert_tokens_to_ids(START_LATENT)
        self.end_latent_id = tokenizer.convert_tokens_to_ids(END_LATENT)

    # --- family hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def image_run(self) -> list[int]:
        """Token ids that stand for one image in the text stream."""

    @abc.abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Model inputs for the batch's images (e.g. `pixel_values`)."""

    @abc.abstractmethod
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings of `batch["input_ids"]` with the images merged in."""

    # --- shared -------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = [self.tokenizer.bos_token_id]
        parts = (prompt + "\n").split(IMAGE)
        for i, part in enumerate(parts):
            if i:
                ids += self.image_run()
            if part:
                ids += self._text_ids(part)
        return ids

    def encode(self, row: dict[str, Any], target: Target = "cot", n_latent_steps: int = 0,
               c_thought: int = 1, with_target: bool = True) -> Encoded:
        """Token ids and labels for one example row (see the module docstring for the layout)."""
        prompt = self.prompt_ids(row["prompt"])
        steps = list(row["steps"])
        latents: list[int] = []
        n_latents = 0
        if target == "latent":
            # as many latents as the stage asks for, whatever the row's step count: the count must
            # not tell the model how long the answer's reasoning is (CoCoNuT's pad_latent_to_max)
            n_latents = n_latent_steps * c_thought
            latents = [self.start_latent_id] + [self.latent_id] * n_latents + [self.end_latent_id]
            steps = steps[n_latent_steps:]
        elif target == "vanilla":
            steps = []
        images = [as_pil(im) for im in row["images"]]
        if not with_target:
            ids = prompt + latents
            return Encoded(ids, [IGNORE] * len(ids), images, n_latents, len(prompt))
        text = "".join(step + "\n" for step in steps) + answer_sentence(row["answer"])
        target_ids = self._text_ids(text) + [self.tokenizer.eos_token_id]
        ids = prompt + latents + target_ids
        # latents and their markers are inputs, never targets (generation inserts them itself)
        labels = [IGNORE] * (len(prompt) + len(latents)) + target_ids
        return Encoded(ids, labels, images, n_latents, len(prompt))

    def collate(self, items: list[Encoded], pad_side: Literal["left", "right"] = "right",
                align_latents: bool = False) -> dict[str, torch.Tensor]:
        """Pad a batch. `align_latents` left-pads so every row's first latent sits at one index
        (CoCoNuT's multi-pass forward relies on it)."""
        pad_id = self.tokenizer.pad_token_id
        if align_latents:
            lead = max(item.prompt_len for item in items)
            lefts = [lead - item.prompt_len for item in items]
        else:
            lefts = [0] * len(items)
        width = max(left + len(item.input_ids) for left, item in zip(lefts, items))
        ids, labels, mask = [], [], []
        for lead_pad, item in zip(lefts, items):
            n = len(item.input_ids)
            left = width - n if pad_side == "left" else lead_pad
            right = width - n - left
            ids.append([pad_id] * left + item.input_ids + [pad_id] * right)
            labels.append([IGNORE] * left + item.labels + [IGNORE] * right)
            mask.append([0] * left + [1] * n + [0] * right)
        batch = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
        images = [im for item in items for im in item.images]
        if images:
            batch.update(self.image_inputs(images))
        return batch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
