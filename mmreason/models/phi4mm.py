"""Phi-4-multimodal family (`phi4-mm`, `tiny-phi4mm`): a SigLIP-style vision encoder whose patch
features are 2×2-pooled, projected, and written into the language model at image-token positions.

Phi-4-MM cuts an image into a global view plus HD crops of `crop_size`; the image-token count grows
with the number of crops. Every image here is resized to one crop, so each one costs the same fixed
run — the processor's count for a one-crop image: (b² + b) for the crop, 1 separator, (b² + b) for
the global view, with b = patches per side / 2 (real: 448 px, 14 px patches → 545 tokens).

Transformers 5.23 runs the vision encoder *causally* under sdpa: `Phi4MultimodalVisionAttention`
sets `is_causal = True` and its all-valid patch mask is dropped, so sdpa gets `is_causal=True` and
patch i never sees patches after it (eager attention is bidirectional, as SigLIP was trained).
`Phi4MMFamily` sets `is_causal = False` on those modules whenever it wraps a model.

The tiny variant: 64 px images, 8 px patches → 16 pooled features → 41 image tokens; a 2-layer
vision encoder of width 64; a minimal audio encoder (the model always builds one); a 2-layer text
model of width 128.

Video (a `<video>` prompt, seed 004): every frame is a one-crop image by default. With
`video.use_hico` (HiCo, VideoChat-Flash arXiv 2501.00574, at the input): each frame's b×b feature
grid (global view only — for a one-crop image the HD crop is the same picture) is average-pooled to
g×g (`mmreason.kv.hico.pooling_matrix`, g = round(√tokens_per_frame)), every `clip_frames`
consecutive frames are averaged cell by cell, and each clip enters as g² image tokens through the
model's own projection — 16 tiny frames cost 8 clips × 4 tokens instead of 16 × 41.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionAttention

from mmreason.models.base import Family

IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
"""Tiny tokenizer only; real checkpoints name their own ids in the config."""


def tiny_config(tokenizer: Any, image_size: int = 64) -> Phi4MultimodalConfig:
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, crop_size=image_size, patch_size=8, feature_layer=-1,
                  image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    # never run (no audio in our rows) but Phi4MultimodalModel always builds an audio encoder
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2,
                 ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                 audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    return Phi4MultimodalConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        original_max_position_embeddings=2048,
        # Phi-4-mini rotates 3/4 of each head; keep that code path
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vision_config=vision, audio_config=audio,
    )


def make_vision_bidirectional(model: nn.Module) -> int:
    """Undo transformers 5.23's causal vision attention (see the module docstring); returns how many
    attention modules were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, Phi4MultimodalVisionAttention):
            module.is_causal = False
            switched += 1
    return switched


def _install_output_hooks_once(model: nn.Module) -> None:
    """Transformers 5.23 installs its hidden-state capturing hooks lazily, per model, on first use;
    a call of the whole model with `output_hidden_states` (CoCoNuT's latent passes) after the vision
    encoder's own first call (it always selects its last hidden state) hooks the vision layers a
    second time, and from then on the encoder returns `hidden_states[-1] = None` (seen: every embed
    after a latent pass failed). Installing them once from the top, up front, marks every sub-model
    as hooked."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # another transformers: nothing to work around
        return
    maybe_install_capturing_hooks(model.model)


def image_tokens_per_crop_layout(patches_per_side: int) -> int:
    """Image tokens of a one-crop image: crop and global view each b×b pooled features plus one
    separator per row (b × (b + 1)), and one separator between them."""
    side = (patches_per_side + patches_per_side % 2) // 2  # odd grids are reflection-padded before pooling
    return 2 * side * (side + 1) + 1


@dataclass(frozen=True)
class FrameClip:
    """Consecutive frames HiCo merges into one entry of g² image tokens."""

    frames: tuple[Image.Image, ...]


class Phi4MMFamily(Family):
    name = "phi4mm"
    model_class = Phi4MultimodalForCausalLM
    model_types = ("phi4_multimodal",)
    extra_tokens = (IMAGE_TOKEN, AUDIO_TOKEN)

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None):
        super().__init__(model, tokenizer, processor)
        vision = model.config.vision_config
        if vision.image_size != vision.crop_size:
            raise ValueError(f"{type(model).__name__}: vision image_size {vision.image_size} != crop_size "
                             f"{vision.crop_size}; a crop must be one encoder input")
        if make_vision_bidirectional(model) == 0:
            raise ValueError(f"{type(model).__name__} has no Phi4MultimodalVisionAttention to fix")
        _install_output_hooks_once(model)
        self.image_token_id = vision.image_token_id
        self.crop_size = vision.crop_size
        self.patches_per_side = vision.image_size // vision.patch_size
        self.tokens_per_image = image_tokens_per_crop_layout(self.patches_per_side)

    def image_run(self, image: Image.Image | None = None) -> list[int]:
        return [self.image_token_id] * self.tokens_per_image

    def hico_side(self) -> int:
        """g: the side of the grid a frame is pooled to (at most the feature grid's side b)."""
        b = (self.patches_per_side + self.patches_per_side % 2) // 2
        return min(b, max(1, round(math.sqrt(self.video.tokens_per_frame))))

    def video_run(self, n_frames: int) -> list[int]:
        if not self.video.use_hico:
            return self.image_run() * n_frames
        n_clips = -(-n_frames // self.video.clip_frames)
        return [self.image_token_id] * (n_clips * self.hico_side() ** 2)

    def video_entries(self, frames: list[Image.Image]) -> list[Any]:
        if not self.video.use_hico:
            return list(frames)
        c = self.video.clip_frames
        return [FrameClip(tuple(frames[i : i + c])) for i in range(0, len(frames), c)]

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        size = (self.crop_size, self.crop_size)
        arr = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BICUBIC)) for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # processor: mean .5, std .5

    def image_inputs(self, images: list[Any]) -> dict[str, torch.Tensor]:
        device = self.model.device
        if any(isinstance(entry, FrameClip) for entry in images):
            frames = [f for e in images for f in (e.frames if isinstance(e, FrameClip) else (e,))]
            return self.place({
                "frame_pixel_values": self._pixels(frames),
                "entry_frames": torch.tensor([len(e.frames) if isinstance(e, FrameClip) else 1 for e in images],
                                             device=device),
                "entry_is_clip": torch.tensor([isinstance(e, FrameClip) for e in images], device=device)})
        pixels = self._pixels(images)
        n = len(images)
        # crop 0 is the global view, crop 1 the single HD crop; for a one-crop image both are the image
        return self.place({
            "image_pixel_values": pixels.unsqueeze(1).repeat(1, 2, 1, 1, 1),
            "image_sizes": torch.tensor([[self.crop_size, self.crop_size]] * n, device=device),
            "image_attention_mask": torch.ones(n, 2, self.patches_per_side, self.patches_per_side, dtype=torch.bool,
                                               device=device),
        })

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        if "frame_pixel_values" in batch:
            return self._embed_hico(ids, embeds, batch)
        if "image_pixel_values" in batch:
            pixels = batch["image_pixel_values"]
            n_slots = int((ids == self.image_token_id).sum())
            if n_slots != pixels.shape[0] * self.tokens_per_image:
                raise ValueError(
                    f"batch has {n_slots} image tokens but {pixels.shape[0]} images × {self.tokens_per_image}; "
                    "build rows with this family's encode()"
                )
            embeds = self.model.model.embed_tokens_extend(
                ids, embeds, image_pixel_values=pixels.to(embeds.device),
                image_sizes=batch["image_sizes"].to(embeds.device),
                image_attention_mask=batch["image_attention_mask"].to(embeds.device),
            )
        return embeds


    def _embed_hico(self, ids: torch.Tensor, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image tokens of a batch holding HiCo clips (and maybe plain images), in entry order: a
        clip is its frames' pooled grids averaged; a plain image is laid out as transformers'
        `Phi4MultimodalImageEmbedding` does for one crop (HD crop rows + separators, one separator,
        global view rows + separators). One projection for all, as in the model."""
        from mmreason.kv.hico import pooling_matrix

        embedder = self.model.model.embed_tokens_extend.image_embed
        pixels = batch["frame_pixel_values"].to(embeds.device, embedder.img_projection_up.weight.dtype)
        p = self.patches_per_side
        mask = torch.ones(pixels.shape[0], p, p, dtype=torch.bool, device=embeds.device)
        feats = embedder.get_img_features(pixels, attention_mask=mask)  # (frames, b², d)
        b = math.isqrt(feats.shape[1])
        g = self.hico_side()
        pool = pooling_matrix(b, b, g, g, device=feats.device).to(feats.dtype)
        sep = embedder.sub_img_feature_extensor.reshape(1, 1, -1).expand(b, 1, -1)
        pieces, i = [], 0
        for count, is_clip in zip(batch["entry_frames"].tolist(), batch["entry_is_clip"].tolist()):
            f = feats[i : i + count]
            i += count
            if is_clip:
                pieces.append(torch.einsum("gt,ftd->fgd", pool, f).mean(0))
            else:
                view = torch.cat([f[0].reshape(b, b, -1), sep], dim=1).reshape(b * (b + 1), -1)
                pieces.append(torch.cat([view, embedder.global_img_feature_extensor.reshape(1, -1), view]))
        tokens = torch.cat(pieces)
        tokens = embedder.img_projection_down(torch.nn.functional.gelu(embedder.img_projection_up(tokens)))
        positions = (ids == self.image_token_id).nonzero(as_tuple=True)
        if positions[0].numel() != tokens.shape[0]:
            raise ValueError(f"batch has {positions[0].numel()} image tokens but its images and HiCo clips make "
                             f"{tokens.shape[0]}; build rows with this family's encode()")
        return embeds.index_put(positions, tokens.to(embeds.dtype))


__all__ = ["AUDIO_TOKEN", "FrameClip", "IMAGE_TOKEN", "Phi4MMFamily", "image_tokens_per_crop_layout", "make_vision_bidirectional",
           "tiny_config"]
