"""InternVL family (`internvl3-1b`, `internvl-smollm2`, `tiny-internvl`): a ViT whose patch features are
pixel-shuffled and projected into the language model at `<IMG_CONTEXT>` positions.

Images go through the checkpoint's processor (`InternVLProcessor`: a `GotOcr2ImageProcessor` with
ImageNet mean/std and dynamic tiling). With tiling on (the processor's default, `crop_to_patches`),
an image becomes the tiles of the grid whose aspect ratio best matches it (`min_patches`..`max_patches`
tiles of the vision tower's input size) plus a thumbnail of the whole image when there is more than
one tile; each tile is `image_seq_length` `<IMG_CONTEXT>` tokens, the image's run is
`<img> <IMG_CONTEXT>×(tiles·image_seq_length) </img>`. Video frames are one tile each, untiled, as
the processor's video path does.

The tiny variant: 64 px tiles, 8 px patches, pixel-shuffle 0.5 → 16 tokens per tile; a 2-layer Qwen2
text model of width 128 — the setting REFERENCE.md measured maze CoT learning on; its processor keeps
one tile per image (`max_patches: 1`) unless a test saves another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mmreason.models.base import Family
from mmreason.models.processing import make_processor

IMAGE_CONTEXT = "<IMG_CONTEXT>"
IMAGE_START, IMAGE_END = "<img>", "</img>"
VIDEO_TOKEN = "<video>"
PROCESSOR_TOKENS = {"start_image_token": IMAGE_START, "end_image_token": IMAGE_END,
                    "context_image_token": IMAGE_CONTEXT, "video_token": VIDEO_TOKEN}
"""The tokenizer attributes `InternVLProcessor` reads (InternVL3-hf's tokenizer_config `extra_special_tokens`)."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def build_processor(tokenizer: Any, config: InternVLConfig, max_patches: int = 12) -> Any:
    """An `InternVLProcessor` (its parts without torchvision: `mmreason.models.processing`) for `config`
    around `tokenizer` (which must carry `PROCESSOR_TOKENS` as its `extra_special_tokens`): tiles of the
    vision tower's input size, ImageNet normalisation, as InternVL3-hf's `preprocessor_config.json`."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side = config.vision_config.image_size[0]
    images = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, image_mean=IMAGENET_MEAN,
                                      image_std=IMAGENET_STD, crop_to_patches=max_patches > 1, min_patches=1,
                                      max_patches=max_patches)
    return make_processor("InternVLProcessor", images, tokenizer, image_seq_length=config.image_seq_length)


@dataclass(frozen=True)
class VideoFrame:
    """A video frame among `image_inputs`' entries: one untiled tile."""

    image: Image.Image


class InternVLFamily(Family):
    name = "internvl"
    model_class = InternVLForConditionalGeneration
    model_types = ("internvl",)
    extra_tokens = (IMAGE_CONTEXT, IMAGE_START, IMAGE_END, VIDEO_TOKEN)

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None):
        super().__init__(model, tokenizer, processor)
        cfg = model.config
        if processor is None:
            raise ValueError(f"{type(model).__name__}: the InternVL family needs the checkpoint's processor "
                             f"(preprocessor_config.json and processor_config.json, saved by Family.save)")
        self.tile_tokens = cfg.image_seq_length
        if processor.image_seq_length != self.tile_tokens:
            raise ValueError(f"processor image_seq_length {processor.image_seq_length} != the model's "
                             f"image_seq_length {self.tile_tokens}")
        side = processor.image_processor.size
        if (side.height, side.width) != tuple(cfg.vision_config.image_size):
            raise ValueError(f"processor tiles are {side.height}x{side.width} px but the vision tower takes "
                             f"{cfg.vision_config.image_size}")
        # what InternVLProcessor passes its image processor unless told otherwise (crop_to_patches=True)
        self.images_kwargs = dict(getattr(processor, "images_kwargs", {}))
        self.start_id, self.context_id, self.end_id = tokenizer.convert_tokens_to_ids(
            [IMAGE_START, IMAGE_CONTEXT, IMAGE_END])

    def tiles(self, image: Image.Image | None) -> int:
        """Tiles (thumbnail included) the processor cuts `image` into; 1 for None (a video frame)."""
        if image is None:
            return 1
        width, height = image.size
        return self.processor.image_processor.get_number_of_image_patches(height, width, self.images_kwargs)

    def image_run(self, image: Image.Image | None = None) -> list[int]:
        return [self.start_id] + [self.context_id] * (self.tile_tokens * self.tiles(image)) + [self.end_id]

    def video_entries(self, frames: list[Image.Image]) -> list[Any]:
        return [VideoFrame(frame) for frame in frames]

    def image_inputs(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Tiles of every entry, in the order of their runs: still images tiled as the processor
        does, video frames one untiled tile each (consecutive entries of a kind processed together)."""
        processor, pixels, start = self.processor.image_processor, [], 0
        for end in range(1, len(images) + 1):
            if end < len(images) and isinstance(images[end], VideoFrame) == isinstance(images[start], VideoFrame):
                continue
            group = images[start:end]
            if isinstance(group[0], VideoFrame):
                out = processor(images=[f.image for f in group], return_tensors="pt", crop_to_patches=False)
            else:
                out = processor(images=group, return_tensors="pt", **self.images_kwargs)
            pixels.append(out["pixel_values"])
            start = end
        return self.place({"pixel_values": torch.cat(pixels)})

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        if "pixel_values" in batch:
            pixels = batch["pixel_values"].to(embeds.device, self.model.dtype)
            features = self.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            mask = (ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            n_slots, n_features = int(mask[..., 0].sum()), features.shape[0] * features.shape[1]
            if n_slots != n_features:
                raise ValueError(f"batch has {n_slots} {IMAGE_CONTEXT} tokens but its images make {n_features} "
                                 f"(tiles × image_seq_length); build rows with this family's encode()")
            embeds = embeds.masked_scatter(mask, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return embeds
