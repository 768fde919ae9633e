"""Phi-4-multimodal's image processor (dynamic-HD crops) for machines without torchvision.

transformers ships `Phi4MultimodalImageProcessor` with a torchvision backend only (no PIL one, unlike
Chameleon's or GotOcr2's), and torchvision has no wheel beside this project's CPU torch pin. This is
that class step for step (transformers 5.25, `image_processing_phi4_multimodal.py`) on transformers'
PIL backend, with the torchvision calls replaced by the torch ops they run on CPU — `tvF.resize` of
uint8 pixels is `interpolate(..., "bilinear", antialias=True)` on uint8, the global view's resize of
normalised floats is `interpolate(..., "bicubic", antialias=False)` — so its outputs are the same
tensors. It saves as `Phi4MultimodalImageProcessor` (PilBackend drops the `Pil` suffix), so a
machine with torchvision loads the saved checkpoint with transformers' own class.

What it does to an image (Phi-4-MM, arXiv 2503.01743): pick the grid of `crop_size` crops — w×h =
⌈W/crop⌉×⌈H/crop⌉, or when that is more than `dynamic_hd` crops the allowed grid closest in aspect
ratio — resize the image to fill the grid keeping its aspect ratio, pad the rest white, cut the
crops; the global view is the whole padded image resized to one crop and comes first. Crops are
padded (zeros, mask ones) to the batch's largest count. `image_attention_mask` marks the patches of
the padding, which the model leaves out of the token layout.

One deliberate difference: transformers' token count adds 256 + 16 for the global view, right only
for 448-px crops of 14-px patches (16×16 features); here it is b² + b for b×b features, which is the
same number for the real checkpoint and the right one for the tiny backbones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs


class Phi4MultimodalImagesKwargs(ImagesKwargs, total=False):
    """`patch_size`: pixels per vision-encoder patch; `dynamic_hd`: the most crops an image is cut into."""

    patch_size: int
    dynamic_hd: int


class Phi4MultimodalImageProcessorPil(PilBackend):
    resample = PILImageResampling.BICUBIC
    size = {"height": 448, "width": 448}
    patch_size = 14
    dynamic_hd = 36
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    valid_kwargs = Phi4MultimodalImagesKwargs
    model_input_names = ["image_pixel_values", "image_sizes", "image_attention_mask"]

    # --- the crop layout, as transformers computes it ------------------------------------------
    @staticmethod
    def _closest_aspect_ratio(aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int,
                              image_size: int) -> tuple[int, int]:
        best_diff, best = float("inf"), (1, 1)
        area = width * height
        for ratio in target_ratios:
            diff = abs(aspect_ratio - ratio[0] / ratio[1])
            if diff < best_diff:
                best_diff, best = diff, ratio
            elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best = ratio
        return best

    def crop_layout(self, height: int, width: int, image_size: int, max_num: int, min_num: int = 1):
        """((w crops, h crops), (new width, new height), (pad width, pad height)) of an H×W image."""
        w_crops, h_crops = math.ceil(width / image_size), math.ceil(height / image_size)
        if w_crops * h_crops > max_num:
            ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                             for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
            grid = self._closest_aspect_ratio(width / height, ratios, width, height, image_size)
        else:
            grid = (w_crops, h_crops)
        target_w, target_h = image_size * grid[0], image_size * grid[1]
        if target_w / width < target_h / height:
            new_size = (target_w, int(height * target_w / width))
            padding = (0, target_h - new_size[1])
        else:
            new_size = (int(width * target_h / height), target_h)
            padding = (target_w - new_size[0], 0)
        if min(new_size[1], target_h) < 10 or min(new_size[0], target_w) < 10:
            raise ValueError(f"the aspect ratio is very extreme {new_size}")
        return grid, new_size, padding

    @staticmethod
    def crop_attention_mask(grid: tuple[int, int], padding: tuple[int, int], patch_size: int,
                            mask_size: int) -> torch.Tensor:
        """(h·m, w·m) patch mask of the crops: 0 on patch columns/rows that are all padding."""
        mask = torch.ones(mask_size * grid[1], mask_size * grid[0], device="cpu")
        if padding[0] >= patch_size:
            mask[:, -math.floor(padding[0] / patch_size):] = 0
        if padding[1] >= patch_size:
            mask[-math.floor(padding[1] / patch_size):, :] = 0
        return mask

    @staticmethod
    def count_image_tokens(mask: torch.Tensor, mask_size: int) -> int:
        """Tokens of one image: the HD crops' useful b-grid rows (+1 separator each), one separator,
        the global view's b×b features (+1 separator per row); b = ⌈mask_size / 2⌉ (2×2 pooling)."""
        b = mask_size // 2 + mask_size % 2
        rows, cols = mask.shape[0] // mask_size, mask.shape[1] // mask_size
        pooled = (mask.reshape(rows, mask_size, cols, mask_size).transpose(1, 2)[:, :, 0::2, 0::2]
                  .transpose(1, 2).reshape(rows * b, cols * b))
        return b * b + 1 + int(pooled.sum()) + int(pooled[:, 0].sum()) + b

    def get_number_of_image_tokens(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Image tokens the processor lays out for an image of `height` × `width` pixels."""
        kwargs = self._merge_and_standardize_kwargs(**(images_kwargs or {}))
        side, patch = kwargs["size"].height, kwargs["patch_size"]
        grid, _, padding = self.crop_layout(height, width, side, max_num=kwargs["dynamic_hd"])
        return self.count_image_tokens(self.crop_attention_mask(grid, padding, patch, side // patch), side // patch)

    # --- preprocessing (on the CPU, as every processor: explicit devices, whatever torch's default) -
    def _preprocess(self, images: list[np.ndarray], size: SizeDict, resample: PILImageResampling | int,
                    do_rescale: bool, rescale_factor: float, do_normalize: bool, image_mean: tuple[float, ...],
                    image_std: tuple[float, ...], patch_size: int, dynamic_hd: int, return_tensors=None,
                    **kwargs) -> BatchFeature:
        if size.height != size.width:
            raise ValueError("Phi4MultimodalImageProcessor only supports square sizes.")
        if PILImageResampling(resample) != PILImageResampling.BICUBIC:
            raise ValueError(f"the global view is resized bicubic (transformers' default); got resample={resample}")
        side, mask_size = size.height, size.height // patch_size
        # tvF.normalize after its fused rescale: (x − mean/scale) / (std/scale), in float32
        mean = torch.tensor(image_mean, device="cpu") * (1.0 / rescale_factor if do_rescale else 1.0)
        std = torch.tensor(image_std, device="cpu") * (1.0 / rescale_factor if do_rescale else 1.0)
        crops, masks, counts, sizes = [], [], [], []
        for array in images:
            pixels = torch.from_numpy(np.ascontiguousarray(array))
            grid, (new_w, new_h), (pad_w, pad_h) = self.crop_layout(pixels.shape[-2], pixels.shape[-1], side,
                                                                    max_num=dynamic_hd)
            mask = self.crop_attention_mask(grid, (pad_w, pad_h), patch_size, mask_size)
            # tvF.resize (bilinear, antialiased; uint8 natively on CPU), then white padding right/bottom
            hd = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=True)[0]
            hd = F.pad(hd, (0, pad_w, 0, pad_h), value=255)
            if do_normalize:
                hd = (hd.float() - mean.view(3, 1, 1)) / std.view(3, 1, 1)
            elif do_rescale:
                hd = hd.float() * rescale_factor
            glb = F.interpolate(hd[None], size=(side, side), mode="bicubic", align_corners=False, antialias=False)
            height, width = hd.shape[-2:]
            tiles = (hd.reshape(3, height // side, side, width // side, side).permute(1, 3, 0, 2, 4)
                     .reshape(-1, 3, side, side))
            tile_masks = (mask.reshape(height // side, mask_size, width // side, mask_size).transpose(1, 2)
                          .reshape(-1, mask_size, mask_size))
            crops.append(torch.cat([glb, tiles]))
            masks.append(torch.cat([torch.ones(1, mask_size, mask_size, device="cpu"), tile_masks]))
            counts.append(self.count_image_tokens(mask, mask_size))
            sizes.append([height, width])
        most = max(c.shape[0] for c in crops)
        crops = [torch.cat([c, c.new_zeros(most - c.shape[0], *c.shape[1:])]) for c in crops]
        masks = [torch.cat([m, m.new_ones(most - m.shape[0], *m.shape[1:])]) for m in masks]
        data = {"image_pixel_values": torch.stack(crops), "image_sizes": torch.tensor(sizes, dtype=torch.long, device="cpu"),
                "image_attention_mask": torch.stack(masks), "num_img_tokens": counts}
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["Phi4MultimodalImageProcessorPil"]
