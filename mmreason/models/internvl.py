"""InternVL family (`internvl3-1b`, `tiny-internvl`): a ViT whose patch features are pixel-shuffled
and projected into the language model at `<IMG_CONTEXT>` positions (`image_seq_length` per image).

The tiny variant: 64 px images, 8 px patches, pixel-shuffle 0.5 → 16 image tokens; a 2-layer Qwen2
text model of width 128 — the setting REFERENCE.md measured maze CoT learning on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mmreason.models.base import Family

IMAGE_CONTEXT = "<IMG_CONTEXT>"
IMAGE_START, IMAGE_END = "<img>", "</img>"


def tiny_config(tokenizer: Any, image_size: int = 64) -> InternVLConfig:
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[image_size, image_size], patch_size=[8, 8], use_mask_token=False,
                  layer_scale_init_value=0.1)
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    tokens_per_image = (image_size // 8) ** 2 // 4
    return InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                          image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
                          image_seq_length=tokens_per_image, tie_word_embeddings=True)


class InternVLFamily(Family):
    name = "internvl"
    model_class = InternVLForConditionalGeneration
    model_types = ("internvl",)
    extra_tokens = (IMAGE_CONTEXT, IMAGE_START, IMAGE_END)

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any = None):
        super().__init__(model, tokenizer)
        cfg = model.config
        self.image_size = cfg.vision_config.image_size[0]
        run = [IMAGE_START] + [IMAGE_CONTEXT] * cfg.image_seq_length + [IMAGE_END]
        self._run = tokenizer.convert_tokens_to_ids(run)
        self.image_processor = image_processor

    def image_run(self) -> list[int]:
        return list(self._run)

    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if self.image_processor is not None:  # a real checkpoint's own preprocessing
            out = self.image_processor(images=images, crop_to_patches=False, return_tensors="pt")
            return self.place({"pixel_values": out["pixel_values"]})
        arr = np.stack([np.asarray(im.resize((self.image_size, self.image_size))) for im in images])
        # normalised in float32, then cast once to the model's dtype
        pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return self.place({"pixel_values": pixels})

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        if "pixel_values" in batch:
            pixels = batch["pixel_values"].to(embeds.device, self.model.dtype)
            features = self.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            mask = (ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return embeds
