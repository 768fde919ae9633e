"""Phi-4-multimodal family (`phi4-mm`, `tiny-phi4mm`): a SigLIP-style vision encoder whose patch
features are 2×2-pooled, projected, and written into the language model at image-token positions.

Images go through the checkpoint's processor (`Phi4MultimodalProcessor`; its image processor cuts an
image into dynamic-HD crops: up to `dynamic_hd` crops of `crop_size`, in the grid closest to the
image's aspect ratio, plus a global view — `mmreason.models.phi4mm_images`). An image's token run is
the processor's count for its size (`num_img_tokens`), laid out as `Phi4MultimodalImageEmbedding`
does: the HD crops' features as one (rows × cols) grid with a separator after every row (rows and
columns holding only padding dropped), one separator, then the global view's b×b features with a
separator after every row, b = patches per side / 2 (real: 448-px crops, 14-px patches → b = 16; a
one-crop image is 545 tokens). `hd_layouts` reads each image's (rows, cols) off the processor's
outputs, as the model does.

The hub checkpoint is a base plus per-modality LoRA adapters; the vision one (`vision-lora/`) is
merged into the weights on load (`merge_vision_adapter`).

Transformers 5.23 runs the vision encoder *causally* under sdpa: `Phi4MultimodalVisionAttention`
sets `is_causal = True` and its all-valid patch mask is dropped, so sdpa gets `is_causal=True` and
patch i never sees patches after it (eager attention is bidirectional, as SigLIP was trained).
`Phi4MMFamily` sets `is_causal = False` on those modules whenever it wraps a model.

The tiny variant: 64 px crops, 8 px patches → 4×4 pooled features, 41 tokens for a one-crop image;
its processor cuts at most 4 crops (`dynamic_hd` 4); a 2-layer vision encoder of width 64; a minimal
audio encoder (the model always builds one); a 2-layer text model of width 128.

Video (a `<video>` prompt, seed 004): every frame is one crop (squashed to `crop_size`, as the model
saw it before dynamic HD: 41 tiny tokens), whatever its aspect ratio. With `video.use_hico` (HiCo,
VideoChat-Flash arXiv 2501.00574, at the input): each frame's b×b feature grid (global view only —
for a one-crop image the HD crop is the same picture) is average-pooled to g×g
(`mmreason.kv.hico.pooling_matrix`, g = round(√tokens_per_frame)), every `clip_frames` consecutive
frames are averaged cell by cell, and each clip enters as g² image tokens through the model's own
projection — 16 tiny frames cost 8 clips × 4 tokens instead of 16 × 41.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionAttention
from transformers.utils import cached_file

from mmreason.models.base import Family
from mmreason.models.phi4mm_images import Phi4MultimodalImageProcessorPil
from mmreason.models.processing import make_processor

IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
"""Tiny tokenizer only; real checkpoints name their own ids in the config."""
PROCESSOR_TOKENS = {"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN}
"""The tokenizer attributes `Phi4MultimodalProcessor` reads (the tiny tokenizer carries them)."""
VISION_ADAPTER = "vision-lora"
"""Subfolder of the hub checkpoint holding the vision LoRA (a PEFT adapter)."""


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


def build_processor(tokenizer: Any, config: Phi4MultimodalConfig, dynamic_hd: int = 36) -> Any:
    """A `Phi4MultimodalProcessor` for `config` around `tokenizer` (which must carry `PROCESSOR_TOKENS`):
    crops of the vision tower's input size, at most `dynamic_hd` of them, mean/std 0.5 — the hub's
    `Phi4MultimodalImageProcessor` settings — and the default audio feature extractor."""
    vision = config.vision_config
    images = Phi4MultimodalImageProcessorPil(size={"height": vision.crop_size, "width": vision.crop_size},
                                             patch_size=vision.patch_size, dynamic_hd=dynamic_hd)
    return make_processor("Phi4MultimodalProcessor", images, tokenizer,
                          audio_processor=Phi4MultimodalFeatureExtractor())


def merge_vision_adapter(model: nn.Module, path: str | Path) -> bool:
    """Merge checkpoint `path`'s vision LoRA (`vision-lora/`, a PEFT adapter) into `model`'s weights;
    False where the checkpoint ships none.

    The model card loads it as `model.load_adapter(path, adapter_name="vision",
    adapter_kwargs={"subfolder": "vision-lora"})` and `model.set_adapter("vision")`, after which it
    applies to every input; merged, it does the same, and the model stays a plain
    `Phi4MultimodalForCausalLM`: full fine-tuning trains the merged weights, the KV presses and
    continual backprop see plain linear layers, and `save_pretrained` writes a whole checkpoint (of a
    model holding an adapter it writes the adapter alone) that loads back without merging twice."""
    if cached_file(str(path), "adapter_config.json", subfolder=VISION_ADAPTER,
                   _raise_exceptions_for_missing_entries=False) is None:
        return False
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(path), subfolder=VISION_ADAPTER)
    adapted = PeftModel(model, config, adapter_name="vision")
    loaded = adapted.load_adapter(str(path), adapter_name="vision", subfolder=VISION_ADAPTER)
    # PeftModel.from_pretrained only warns when adapted modules find no weights in the file (they
    # keep their initial ones); such an adapter is for another model
    if loaded.missing_keys:
        raise ValueError(f"{path}/{VISION_ADAPTER}: {len(loaded.missing_keys)} adapter weights of "
                         f"{type(model).__name__} are not in the file (e.g. {loaded.missing_keys[0]})")
    adapted.merge_and_unload()
    return True


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


def hd_layouts(image_sizes: torch.Tensor, image_attention_mask: torch.Tensor, crop_size: int) -> list[tuple[int, int]]:
    """(rows, cols) of each image's HD feature grid, read off the processor's `image_sizes` (the
    padded image, a whole number of crops) and `image_attention_mask` (crop 0 is the global view) as
    `Phi4MultimodalImageEmbedding.forward` reads them: feature rows and columns of padding only are
    dropped."""
    layouts = []
    for (height, width), mask in zip(image_sizes.tolist(), image_attention_mask):
        rows, cols = height // crop_size, width // crop_size
        pooled = mask[1 : rows * cols + 1, 0::2, 0::2].bool()
        b = pooled.shape[-1]
        grid = pooled.reshape(rows, cols, b, b).transpose(1, 2).reshape(rows * b, cols * b)
        layouts.append((int(grid[:, 0].sum()), int(grid[0, :].sum())))
    return layouts


def layout_tokens(layout: tuple[int, int], b: int) -> int:
    """Image tokens of an image whose HD grid is `layout` (rows, cols) and global view b×b."""
    rows, cols = layout
    return rows * (cols + 1) + 1 + b * (b + 1)


@dataclass(frozen=True)
class VideoFrame:
    """A video frame among `image_inputs`' entries: one crop, whatever its aspect ratio."""

    image: Image.Image


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
        if processor is None:
            raise ValueError(f"{type(model).__name__}: the phi4mm family needs the checkpoint's processor "
                             f"(processor_config.json, saved by Family.save)")
        self.image_processor = processor.image_processor
        side = self.image_processor.size
        if (side.height, side.width) != (vision.crop_size,) * 2 or self.image_processor.patch_size != vision.patch_size:
            raise ValueError(f"processor crops are {side.height}x{side.width} px of {self.image_processor.patch_size}-px "
                             f"patches but the vision tower takes {vision.crop_size} px of {vision.patch_size}-px patches")
        if make_vision_bidirectional(model) == 0:
            raise ValueError(f"{type(model).__name__} has no Phi4MultimodalVisionAttention to fix")
        _install_output_hooks_once(model)
        self.image_token_id = vision.image_token_id
        self.crop_size = vision.crop_size
        self.patches_per_side = vision.image_size // vision.patch_size
        self.feature_side = (self.patches_per_side + self.patches_per_side % 2) // 2
        self.tokens_per_image = image_tokens_per_crop_layout(self.patches_per_side)
        """Tokens of a one-crop image: a crop-sized picture, a video frame."""
        # transformers' own Phi4MultimodalImageProcessor counts the global view as 256 + 16 tokens
        # whatever the crop (right for 448-px crops of 14-px patches only): the excess is the same
        # for every image, so take it off (0 with the real checkpoint, or with our port)
        self._count_excess = self.image_processor.get_number_of_image_tokens(self.crop_size, self.crop_size) \
            - self.tokens_per_image

    @classmethod
    def load_model(cls, path: str | Path, dtype: torch.dtype) -> nn.Module:
        model = super().load_model(path, dtype)
        merge_vision_adapter(model, path)
        return model

    def image_tokens(self, image: Image.Image | None) -> int:
        """Image tokens the processor lays out for `image` (its `num_img_tokens`); None: one crop."""
        if image is None:
            return self.tokens_per_image
        width, height = image.size
        return self.image_processor.get_number_of_image_tokens(height, width) - self._count_excess

    def image_run(self, image: Image.Image | None = None) -> list[int]:
        return [self.image_token_id] * self.image_tokens(image)

    def hico_side(self) -> int:
        """g: the side of the grid a frame is pooled to (at most the feature grid's side b)."""
        return min(self.feature_side, max(1, round(math.sqrt(self.video.tokens_per_frame))))

    def video_run(self, n_frames: int) -> list[int]:
        if not self.video.use_hico:
            return self.image_run() * n_frames
        n_clips = -(-n_frames // self.video.clip_frames)
        return [self.image_token_id] * (n_clips * self.hico_side() ** 2)

    def video_entries(self, frames: list[Image.Image]) -> list[Any]:
        if not self.video.use_hico:
            return [VideoFrame(frame) for frame in frames]
        c = self.video.clip_frames
        return [FrameClip(tuple(frames[i : i + c])) for i in range(0, len(frames), c)]

    def _processed(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return {"image_pixel_values": out["image_pixel_values"], "image_sizes": out["image_sizes"],
                "image_attention_mask": out["image_attention_mask"].bool()}

    def _one_crop(self, frame: Image.Image) -> Image.Image:
        """A frame squashed to one crop: the processor then cuts a 1×1 grid with no padding."""
        return frame.convert("RGB").resize((self.crop_size, self.crop_size), Image.BICUBIC)

    def image_inputs(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The processor's outputs for the batch's images and video frames (crops padded to the
        batch's most, as the model takes them); with HiCo clips also `frame_pixel_values` (each clip
        frame as one crop), `entry_frames` and `entry_is_clip` (entry order)."""
        pictures = [self._one_crop(e.image) if isinstance(e, VideoFrame) else e
                    for e in images if not isinstance(e, FrameClip)]
        inputs = self._processed(pictures) if pictures else {}
        is_clip = [isinstance(e, FrameClip) for e in images]
        if any(is_clip):
            frames = [self._one_crop(f) for e in images if isinstance(e, FrameClip) for f in e.frames]
            inputs["frame_pixel_values"] = self._processed(frames)["image_pixel_values"][:, 0]  # the view of the whole frame
            inputs["entry_frames"] = torch.tensor([len(e.frames) if c else 0 for e, c in zip(images, is_clip)],
                                                  device="cpu")
            inputs["entry_is_clip"] = torch.tensor(is_clip, device="cpu")
        return self.place(inputs)

    def image_token_counts(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """Image tokens of each of the batch's processed images (not HiCo clips), in order."""
        if "image_pixel_values" not in batch:
            return []
        layouts = hd_layouts(batch["image_sizes"], batch["image_attention_mask"], self.crop_size)
        return [layout_tokens(layout, self.feature_side) for layout in layouts]

    def _image_kwargs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(device) for k in ("image_pixel_values", "image_sizes", "image_attention_mask")}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        if "frame_pixel_values" in batch:
            return self._embed_hico(ids, embeds, batch)
        if "image_pixel_values" in batch:
            n_slots, counts = int((ids == self.image_token_id).sum()), self.image_token_counts(batch)
            if n_slots != sum(counts):
                raise ValueError(f"batch has {n_slots} image tokens but its {len(counts)} images make {sum(counts)} "
                                 f"({counts}); build rows with this family's encode()")
            embeds = self.model.model.embed_tokens_extend(ids, embeds, **self._image_kwargs(batch, embeds.device))
        return embeds

    def _embed_hico(self, ids: torch.Tensor, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image tokens of a batch holding HiCo clips (and maybe images), in entry order: a clip is its
        frames' pooled grids averaged, through the model's projection; images go through the model's
        own image embedding, as in `embed`."""
        from mmreason.kv.hico import pooling_matrix

        embedder = self.model.model.embed_tokens_extend.image_embed
        pixels = batch["frame_pixel_values"].to(embeds.device, embedder.img_projection_up.weight.dtype)
        p = self.patches_per_side
        mask = torch.ones(pixels.shape[0], p, p, dtype=torch.bool, device=embeds.device)
        feats = embedder.get_img_features(pixels, attention_mask=mask)  # (frames, b², d)
        b = math.isqrt(feats.shape[1])
        g = self.hico_side()
        pool = pooling_matrix(b, b, g, g, device=feats.device).to(feats.dtype)
        clips, i = [], 0
        for count in batch["entry_frames"][batch["entry_is_clip"]].tolist():
            clips.append(torch.einsum("gt,ftd->fgd", pool, feats[i : i + count]).mean(0))
            i += count
        clip_tokens = embedder.img_projection_down(torch.nn.functional.gelu(embedder.img_projection_up(torch.cat(clips))))
        image_counts = iter(self.image_token_counts(batch))
        is_clip = batch["entry_is_clip"].tolist()
        counts = torch.tensor([g * g if c else next(image_counts) for c in is_clip], device=embeds.device)
        positions = (ids == self.image_token_id).nonzero(as_tuple=True)
        if positions[0].numel() != int(counts.sum()):
            raise ValueError(f"batch has {positions[0].numel()} image tokens but its images and HiCo clips make "
                             f"{int(counts.sum())}; build rows with this family's encode()")
        at_clip = torch.tensor(is_clip, device=embeds.device).repeat_interleave(counts)
        tokens = clip_tokens.new_zeros(at_clip.numel(), clip_tokens.shape[-1])
        tokens[at_clip] = clip_tokens
        if not all(is_clip):  # the images' tokens, laid out by the model itself on a run of image ids
            n = int((~at_clip).sum())
            run = torch.full((1, n), self.image_token_id, dtype=ids.dtype, device=ids.device)
            tokens[~at_clip] = embedder(run, tokens.new_zeros(1, n, tokens.shape[-1]),
                                        **self._image_kwargs(batch, embeds.device))[0].to(tokens.dtype)
        return embeds.index_put(positions, tokens.to(embeds.dtype))


__all__ = ["AUDIO_TOKEN", "FrameClip", "IMAGE_TOKEN", "PROCESSOR_TOKENS", "Phi4MMFamily", "VideoFrame",
           "build_processor", "hd_layouts", "image_tokens_per_crop_layout", "layout_tokens",
           "make_vision_bidirectional", "merge_vision_adapter", "tiny_config"]
