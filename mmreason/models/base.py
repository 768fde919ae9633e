"""What every backbone family shares: turning an example row into token ids and labels, padding a
batch, and the hooks a family fills in (how images enter the token stream and the embeddings).

Sequence layout (all families, all stages):

    <bos> PROMPT(with image runs) \\n [<|start-latent|> <|latent|>×n <|end-latent|>] STEPS \\n ANSWER [\\n AFTER] <eos>

With a checkpoint that ships a chat template (real ones), `<bos> PROMPT \n` is the template's user turn
holding PROMPT followed by the assistant's header, and `<eos>` is the tokenizer's eos (the template's
end of turn, `<|im_end|>` for SmolLM2/Qwen2) — in training targets and in generation alike.

Only the part after the prompt (and after the latents) is in the loss. `n` latents replace the
first `n / c_thought` steps (CoCoNuT's curriculum); vanilla targets hold the answer sentence only.
What the model reads at the latents is its `thought` kind (`Family.thought`): `latent` — the last
hidden state of the position before (`mmreason.latent.coconut`); `pause` — the `<|latent|>` token's
own trained embedding, an ordinary token (the pause-token control); `none` — no markers and no
latents: the replaced steps are simply gone, the prompt runs straight into the kept steps.
AFTER is text a row's reply goes on with after its answer (`meta.after_answer`: a re-check placed
where it cannot change the answer), absent from most rows and from vanilla targets.
With visual thoughts (MVoT; families that write images: anole) each step is followed by the image
of the state it reaches, as image-code tokens the model is trained to write:
`STEP \n <racm3:break> codes… <eoss> STEP \n …`.

A video question's prompt holds one `<video>` and its `images` are the clip's frames (joined with
`mmreason.data.cinepile.attach_frames(..., keep_video=True)`); the family lays the frames out
(`video_run`, `video_entries`): by default one image run per frame, and HiCo merging where a family
implements it (`VideoInput.use_hico`, Phi-4-MM). Latent thoughts, when any, come after the frames.
"""

from __future__ import annotations

import abc
import io
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from PIL import Image

from mmreason.hardware import to_device
from mmreason.models.tokenizer import END_LATENT, IMAGE, LATENT, START_LATENT
from mmreason.tasks.base import after_answer, answer_sentence

IGNORE = -100
Target = Literal["cot", "vanilla", "latent"]
Thought = Literal["latent", "pause", "none"]
THOUGHTS = ("latent", "pause", "none")
"""What stands in for the steps CoCoNuT's curriculum replaces (`CurriculumSchedule.thought`)."""
VIDEO = "<video>"  # the schema's VIDEO_PLACEHOLDER
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE)}|{re.escape(VIDEO)})")


@dataclass
class VideoInput:
    """How a video's frames enter the model (seed 004's `--num_frames`, `--use_hico`)."""

    num_frames: int | None = None
    """Frames per clip given to the model, picked evenly from the clip's stored frames (None = all)."""
    use_hico: bool = False
    """HiCo (VideoChat-Flash): pool each frame's tokens to ~tokens_per_frame and average every
    clip_frames consecutive frames into one (phi4mm family)."""
    tokens_per_frame: int = 16
    """HiCo: entries each frame's feature grid is pooled to (a g×g grid, g = round(√n))."""
    clip_frames: int = 2
    """HiCo: consecutive frames merged into one."""

    def __post_init__(self) -> None:
        from mmreason.config import ConfigError

        if self.num_frames is not None and self.num_frames < 1:
            raise ConfigError(f"video.num_frames must be >= 1 or null, got {self.num_frames}")
        if self.tokens_per_frame < 1 or self.clip_frames < 1:
            raise ConfigError(f"video.tokens_per_frame and video.clip_frames must be >= 1, "
                              f"got {self.tokens_per_frame}, {self.clip_frames}")


def as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.open(io.BytesIO(image)).convert("RGB")


@dataclass
class Encoded:
    """One row as token ids; `images` are the prompt images in order of their placeholders."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)
    """PIL images, or whatever `video_entries` makes of a video's frames."""
    n_latents: int = 0
    prompt_len: int = 0


class Family(abc.ABC):
    """A backbone family: subclasses say how images enter the sequence and the embeddings."""

    name: ClassVar[str]
    model_class: ClassVar[type]

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        """The checkpoint's Hugging Face processor (`AutoProcessor`), when it ships one: its image
        preprocessing is what `image_inputs` runs."""
        self.latent_id = tokenizer.convert_tokens_to_ids(LATENT)
        self.start_latent_id = tokenizer.convert_tokens_to_ids(START_LATENT)
        self.end_latent_id = tokenizer.convert_tokens_to_ids(END_LATENT)
        self.video = VideoInput()

    @property
    def thought(self) -> Thought:
        """What this model reads in place of the steps CoCoNuT replaced — `latent`, `pause` or `none`
        (see the module docstring) — as the coconut stage trained it. Kept in the model's config
        (`coconut_thought`), so an export carries it to every evaluation; `latent` for a model no
        coconut stage set it on. `encode`, `latent_forward` and `generate` follow it."""
        return getattr(self.model.config, "coconut_thought", "latent")

    @thought.setter
    def thought(self, kind: Thought) -> None:
        if kind not in THOUGHTS:
            raise ValueError(f"thought: unknown kind {kind!r} (known: {', '.join(THOUGHTS)})")
        self.model.config.coconut_thought = kind

    # --- family hooks -------------------------------------------------------------------------
    @classmethod
    def load_model(cls, path: str | Path, dtype: torch.dtype) -> Any:
        """The checkpoint's model in `dtype`; a family whose checkpoints ship more than the weights
        (Phi-4-MM's vision LoRA) loads that here too."""
        return cls.model_class.from_pretrained(path, dtype=dtype)

    @abc.abstractmethod
    def image_run(self, image: Image.Image | None = None) -> list[int]:
        """Token ids that stand for `image` in the text stream (their count may depend on its size:
        InternVL's tiles); None: an image of the model's own input size."""

    @abc.abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Model inputs for the batch's images (e.g. `pixel_values`), on the model's device, floating
        ones in its dtype (`place`)."""

    @abc.abstractmethod
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings of `batch["input_ids"]` with the images merged in."""

    def video_run(self, n_frames: int) -> list[int]:
        """Token ids that stand for a video of `n_frames` frames; by default one image run each."""
        if self.video.use_hico:
            raise ValueError(f"video.use_hico: HiCo frame merging is implemented for the phi4mm family, "
                             f"not {self.name}")
        return self.image_run() * n_frames

    def video_entries(self, frames: list[Image.Image]) -> list[Any]:
        """What `image_inputs` gets for a video's frames, in the order of `video_run`'s tokens."""
        return list(frames)

    # --- shared -------------------------------------------------------------------------------
    def place(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` where the model is: on its device, floating ones in its dtype (pixels of a bf16
        model are bf16), ids and masks keeping theirs — so a batch follows the model wherever it is."""
        return to_device(tensors, self.model.device, self.model.dtype)

    def input_only_ids(self) -> set[int]:
        """Ids that only ever stand for model input (image slots `embed` fills, latents, bos, pad):
        a sampled reply holding one cannot be fed back through `embed` as text."""
        ids = set(self.image_run()) | {self.latent_id, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id}
        return {i for i in ids if i is not None}

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (its tokenizer's), or None: the tiny word-level tokenizers have none."""
        return getattr(self.tokenizer, "chat_template", None) or None

    def prompt_text(self, prompt: str) -> str:
        """The text before the reply: through the chat template as one user turn followed by the
        assistant's header when the checkpoint has a template, else `prompt` and a newline (after
        `<bos>`). Placeholders (`<image>`, `<video>`) pass through untouched."""
        if self.chat_template is None:
            return prompt + "\n"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, prompt: str, images: list[Image.Image] = (), n_frames: int = 0) -> list[int]:
        """Token ids of the prompt, each `<image>` expanded to `image_run` of the image in its place."""
        ids = [] if self.chat_template is not None else [self.tokenizer.bos_token_id]
        pictures = iter(images)
        for part in _PLACEHOLDERS.split(self.prompt_text(prompt)):
            if part == IMAGE:
                ids += self.image_run(next(pictures, None))
            elif part == VIDEO:
                ids += self.video_run(n_frames)
            elif part:
                ids += self._text_ids(part)
        return ids

    def save(self, out_dir: str | Path) -> None:
        """Write the model, its tokenizer and processor as a checkpoint `load_backbone` (and
        `from_pretrained` / `AutoProcessor.from_pretrained`) read back."""
        self.model.save_pretrained(out_dir, safe_serialization=True)
        (self.processor or self.tokenizer).save_pretrained(out_dir)  # a processor saves its tokenizer

    def decoding_rule(self, batch_size: int) -> Any:
        """What the next token may be, row by row, while decoding (`coconut.decode`): an object with
        `allow(logits) -> logits` and `step(tokens)`, or None when any token may follow any (every
        family but one that draws: `AnoleFamily`'s image spans)."""
        return None

    def drawn_images(self, images: list[Any]) -> list[list[int]]:
        """Token ids of images the model *writes* (MVoT's visual thoughts), one list per image;
        only families whose vocabulary holds image codes (anole) can."""
        raise ValueError(f"visual thoughts: the {self.name} family reads images but cannot write them "
                         f"(use an anole-family backbone)")

    def _target_ids(self, row: dict[str, Any], steps: list[str], first_step: int, visual_thoughts: bool,
                    tail: str = "") -> list[int]:
        """The trained part: each step (then, with visual thoughts, the image of the state it reaches —
        the row's `step_images[i]`, skipped where it is a prompt image again), then the answer, then
        `tail` (text the reply goes on with after its answer: `mmreason.tasks.base.after_answer`), eos."""
        answer = answer_sentence(row["answer"]) + ("\n" + tail if tail else "")
        if not visual_thoughts:
            text = "".join(step + "\n" for step in steps) + answer
            return self._text_ids(text) + [self.tokenizer.eos_token_id]
        shown = {bytes(im) for im in row["images"] if isinstance(im, (bytes, bytearray))}
        pictures = list(row.get("step_images") or [])[first_step:first_step + len(steps)]
        drawn_at = [i for i, im in enumerate(pictures) if not (isinstance(im, (bytes, bytearray)) and bytes(im) in shown)]
        drawn = dict(zip(drawn_at, self.drawn_images([pictures[i] for i in drawn_at]) if drawn_at else []))
        ids: list[int] = []
        for i, step in enumerate(steps):
            ids += self._text_ids(step + "\n") + drawn.get(i, [])
        return ids + self._text_ids(answer) + [self.tokenizer.eos_token_id]

    def encode(self, row: dict[str, Any], target: Target = "cot", n_latent_steps: int = 0,
               c_thought: int = 1, with_target: bool = True, visual_thoughts: bool = False,
               replaced_steps: int | None = None) -> Encoded:
        """Token ids and labels for one example row (see the module docstring for the layout).
        `visual_thoughts`: every step is followed by the image of its state, as tokens to write.
        `replaced_steps`: leading steps the latents stand for (default `n_latent_steps`; CoCoNuT's
        last stage replaces every step with `max_latent_stage` latent steps). With `thought` none a
        `latent` target drops those steps and puts nothing (no latents, no markers) in their place."""
        images = [as_pil(im) for im in row["images"]]
        if VIDEO in row["prompt"]:
            if IMAGE in row["prompt"] or row["prompt"].count(VIDEO) != 1 or not images:
                raise ValueError(f"row {row.get('id')}: a video prompt holds one {VIDEO}, no {IMAGE}, and the clip's "
                                 f"frames in 'images' (join them with mmreason.data.cinepile.attach_frames(..., "
                                 f"keep_video=True)); got {len(images)} frames")
            prompt = self.prompt_ids(row["prompt"], n_frames=len(images))
            images = self.video_entries(images)
        else:
            prompt = self.prompt_ids(row["prompt"], images)
        steps = list(row["steps"])
        latents: list[int] = []
        n_latents = 0
        if target == "latent":
            # as many latents as the stage asks for, whatever the row's step count: the count must
            # not tell the model how long the answer's reasoning is (CoCoNuT's pad_latent_to_max)
            # pause rows hold the same ids as latent ones: only the forward reads them differently
            if self.thought != "none":
                n_latents = n_latent_steps * c_thought
                latents = [self.start_latent_id] + [self.latent_id] * n_latents + [self.end_latent_id]
            steps = steps[n_latent_steps if replaced_steps is None else replaced_steps:]
        elif target == "vanilla":
            steps = []
        if not with_target:
            ids = prompt + latents
            return Encoded(ids, [IGNORE] * len(ids), images, n_latents, len(prompt))
        first_step = len(row["steps"]) - len(steps) if target == "latent" else 0
        # a vanilla reply is the answer alone: text that goes on after it (a re-check) has no steps to go over
        target_ids = self._target_ids(row, steps, first_step, visual_thoughts and target != "vanilla",
                                      "" if target == "vanilla" else after_answer(row))
        ids = prompt + latents + target_ids
        # latents and their markers are inputs, never targets (generation inserts them itself)
        labels = [IGNORE] * (len(prompt) + len(latents)) + target_ids
        return Encoded(ids, labels, images, n_latents, len(prompt))

    def collate(self, items: list[Encoded], pad_side: Literal["left", "right"] = "right",
                align_latents: bool = False) -> dict[str, torch.Tensor]:
        """Pad a batch, on the model's device (`place`). `align_latents` left-pads so every row's
        first latent sits at one index (CoCoNuT's multi-pass forward relies on it)."""
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
        device = self.model.device
        batch = {
            "input_ids": torch.tensor(ids, device=device),
            "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device),
        }
        images = [im for item in items for im in item.images]
        if images:
            batch.update(self.image_inputs(images))
        return batch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
