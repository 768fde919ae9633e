"""Anole and Phi-4-MM images through their checkpoints' processors (tests/test_processors.py does InternVL).

- tiny-anole saves a `ChameleonProcessor` (64 px, ×0.0078 − 1, 64 codes an image); its settings come
  back from processor_config.json, its pixels are what the hand-written preprocessing made, and its
  image run is the processor's own expansion of `<image>` and the modality spec's 8×8 grid.
- tiny-phi4mm saves a `Phi4MultimodalProcessor` with dynamic-HD crops (at most 4 crops of 64 px): for
  images of several aspect ratios the processor's token count is the family's run, the model's
  layout and what the modality spec finds, grid by grid — including two images of the same token
  count and different grids, which only the model's inputs tell apart; a press session (CoSRe)
  compresses such an image grid by grid. Video frames stay one crop; HiCo clips and multi-crop
  images share a batch.
- A Phi-4-MM checkpoint's vision LoRA (`vision-lora/`) is merged on load: the outputs are the model
  card's `load_adapter`'s, an export reloads to the same model, an adapter for other modules is refused.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mmreason.kv.modality import VISION, modality_spec
from mmreason.latent.coconut import latent_forward
from mmreason.models import build_tiny, load_backbone, load_processor
from mmreason.models.base import VIDEO
from mmreason.models.phi4mm import IMAGE_TOKEN, VISION_ADAPTER, VideoFrame
from mmreason.models.tokenizer import IMAGE
from mmreason.tasks import TASKS, RenderOptions, generate_example

FRACTIONS = {"train": 1.0, "val": 0.0, "test": 0.0}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def maze_row(*images: Image.Image, index: int = 0) -> dict:
    row = generate_example(TASKS["maze"], 3, "train", index, 0, FRACTIONS, RenderOptions())
    return {**row, "images": [png(im) for im in images]} if images else row


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def finite_step(family, batch) -> None:
    loss, _ = latent_forward(family, batch)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.fixture(scope="module")
def anole(tmp_path_factory):
    return build_tiny("tiny-anole", tmp_path_factory.mktemp("anole"))


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    return build_tiny("tiny-phi4mm", tmp_path_factory.mktemp("phi"))


# --- Anole / Chameleon ------------------------------------------------------------------------------


def test_tiny_anole_saves_a_chameleon_processor_whose_settings_come_back(anole):
    saved = json.loads((anole / "processor_config.json").read_text())
    assert saved["processor_class"] == "ChameleonProcessor" and saved["image_seq_length"] == 64
    images = saved["image_processor"]
    assert images["image_processor_type"] == "ChameleonImageProcessor"  # transformers' name: loads with torchvision too
    assert images["size"] == {"shortest_edge": 64} and images["crop_size"] == {"height": 64, "width": 64}
    assert images["image_mean"] == images["image_std"] == [1.0, 1.0, 1.0] and images["rescale_factor"] == 0.0078
    assert images["resample"] == Image.LANCZOS
    processor = load_processor(anole)
    assert type(processor).__name__ == "ChameleonProcessor" and processor.image_seq_length == 64
    family = load_backbone("tiny-anole", anole)
    assert family.processor.image_processor.crop_size.height == 64 and family.codes_per_image == 64


def test_anole_pixels_are_the_hand_written_preprocessing(anole):
    """What the family computed before it read the processor: shortest edge to 64 (LANCZOS), centre
    crop, x · 0.0078 − 1 — the same on the rendered (square) rows; resize and crop come in the other
    order than PIL's `ImageOps.fit`, so other shapes are close, not equal."""
    family = load_backbone("tiny-anole", anole)
    rendered = Image.open(io.BytesIO(maze_row()["images"][0])).convert("RGB")

    def by_hand(image):
        fit = torch.from_numpy(np.asarray(ImageOps.fit(image, (64, 64), Image.LANCZOS)))
        return fit.permute(2, 0, 1).float().mul(0.0078).sub(1.0)

    pixels = family.image_inputs([rendered, Image.new("RGB", (200, 90), (255, 255, 255))])["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    torch.testing.assert_close(pixels[0], by_hand(rendered), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels[1], torch.full((3, 64, 64), 255 * 0.0078 - 1))  # white, cropped square


@pytest.mark.parametrize("size", [(64, 64), (200, 90)])
def test_anole_image_run_is_the_processors_and_the_modality_grid(anole, size):
    family = load_backbone("tiny-anole", anole)
    image = noise(size)
    out = family.processor(text=f"look {IMAGE} here", images=[image], return_for_text_completion=True,
                           return_tensors="pt")
    run = family.image_run(image)
    ids = out["input_ids"][0].tolist()
    start = ids.index(family.image_start_id)
    assert ids[start : start + len(run)] == run  # <racm3:break>, 64 × <image>, <eoss>: the processor's expansion
    assert run.count(family.image_token_id) == family.processor.image_seq_length == 64

    batch = family.collate([family.encode(maze_row(image))])
    spec = modality_spec(family.model)
    runs = spec.images(spec.modality(batch["input_ids"])[0])
    assert [length for _, length in runs] == [64]
    assert [tuple(g.shape) for g in spec.image_grids(64)] == [(8, 8)]
    with torch.no_grad():  # the VQ image tokenizer still turns the placeholders into codes
        codes = family.image_token_ids([image])
    assert codes.shape == (1, 64) and set(codes[0].tolist()) <= set(family.code_token_ids.tolist())
    finite_step(family, batch)


# --- Phi-4-multimodal ---------------------------------------------------------------------------------


def test_tiny_phi4mm_saves_a_phi4_processor_whose_settings_come_back(phi):
    saved = json.loads((phi / "processor_config.json").read_text())
    assert saved["processor_class"] == "Phi4MultimodalProcessor"
    images = saved["image_processor"]
    # transformers' own class name, so a machine with torchvision loads it as Phi4MultimodalImageProcessor
    assert images["image_processor_type"] == "Phi4MultimodalImageProcessor"
    assert images["size"] == {"height": 64, "width": 64} and images["patch_size"] == 8 and images["dynamic_hd"] == 4
    assert images["image_mean"] == images["image_std"] == [0.5, 0.5, 0.5]
    assert saved["audio_processor"]["feature_extractor_type"] == "Phi4MultimodalFeatureExtractor"
    processor = load_processor(phi)
    assert type(processor).__name__ == "Phi4MultimodalProcessor"
    assert processor.image_processor.dynamic_hd == 4 and processor.image_token == IMAGE_TOKEN
    out = processor.image_processor(images=[Image.new("RGB", (64, 64), (255, 0, 255))], return_tensors="pt")
    assert out["image_pixel_values"].shape == (1, 2, 3, 64, 64)  # global view + one crop
    torch.testing.assert_close(out["image_pixel_values"][0, :, :, 0, 0], torch.tensor([[1.0, -1.0, 1.0]] * 2))


# (width, height) → the HD grid the model lays out (rows, cols of 4×4-feature crops, padding dropped)
PHI_SIZES = {
    (64, 64): (4, 4),      # one crop: 41 tokens
    (128, 64): (4, 8),     # 2 crops side by side
    (64, 128): (8, 4),
    (30, 192): (12, 2),    # 3 crops high, the right half of each white padding: as many tokens as 128×64
    (65, 64): (4, 5),      # 2 crops, the second mostly padding
    (200, 90): (4, 8),     # 8 crops would fit; at most 4: the 2×1 grid closest in aspect ratio
    (256, 256): (8, 8),    # 4 crops
}


@pytest.mark.parametrize("size", list(PHI_SIZES))
def test_phi4mm_tokens_from_the_processor_are_the_family_layout_and_the_modality_grids(phi, size):
    family = load_backbone("tiny-phi4mm", phi)
    image = noise(size)
    rows, cols = PHI_SIZES[size]
    n = rows * (cols + 1) + 1 + 4 * 5  # HD rows + separators, one separator, the 4×4 global view + separators
    out = family.processor.image_processor(images=[image], return_tensors="pt")
    assert int(out["num_img_tokens"][0]) == len(family.image_run(image)) == n
    expanded = family.processor(text=f"look {IMAGE_TOKEN} here", images=[image], return_tensors="pt")
    assert expanded["input_ids"][0].tolist().count(family.image_token_id) == n
    crops = -(-rows // 4) * -(-cols // 4)
    assert out["image_pixel_values"].shape == (1, 1 + crops, 3, 64, 64)

    batch = family.collate([family.encode(maze_row(image))])
    assert batch["image_pixel_values"].shape == (1, 1 + crops, 3, 64, 64)
    spec = modality_spec(family.model)
    hooks = spec.watch()
    try:
        embedder = family.model.model.embed_tokens_extend.image_embed
        family.model.eval()
        with torch.no_grad():  # mark the two separators so the layout can be read off the embeddings
            embedder.sub_img_feature_extensor.normal_()
            embedder.global_img_feature_extensor.normal_()
            embeds = family.embed(batch)[0]
    finally:
        for hook in hooks:
            hook.remove()
    modality = spec.modality(batch["input_ids"])
    assert int((modality == VISION).sum()) == n
    (start, length), = spec.images(modality[0])
    assert length == n
    grids = spec.image_grids(length)
    assert [tuple(g.shape) for g in grids] == [(rows, cols), (4, 4)]
    # outside the grids are exactly the separators, where the model put its separator vectors
    in_grid = torch.zeros(n, dtype=torch.bool)
    for grid in grids:
        in_grid[grid.flatten()] = True
    run = embeds[start : start + n]
    row_sep, glb_sep = run[rows * (cols + 1) - 1], run[rows * (cols + 1)]
    is_row_sep = (run - row_sep).abs().amax(-1) < 1e-6
    is_glb_sep = (run - glb_sep).abs().amax(-1) < 1e-6
    assert int(is_glb_sep.sum()) == 1 and int(is_row_sep.sum()) == rows + 4
    assert torch.equal(~in_grid, is_row_sep | is_glb_sep)
    family.model.train()
    finite_step(family, batch)


def test_phi4mm_images_of_one_token_count_and_two_grids(phi):
    """128×64 (4 × 8) and 30×192 (12 × 2) are both 57 tokens: each image's grid comes from the model's
    inputs, not its length; with both in one batch the length alone cannot say, and only the global
    view (which ends every image) stays a grid."""
    family = load_backbone("tiny-phi4mm", phi)
    wide, tall = noise((128, 64), 1), noise((30, 192), 2)
    spec = modality_spec(family.model)
    hooks = spec.watch()
    try:
        for image, grid in ((wide, (4, 8)), (tall, (12, 2))):
            batch = family.collate([family.encode(maze_row(image))])
            with torch.no_grad():
                family.embed(batch)
            assert [tuple(g.shape) for g in spec.image_grids(57)] == [grid, (4, 4)]
        batch = family.collate([family.encode(maze_row(wide)), family.encode(maze_row(tall, index=1))])
        assert batch["image_pixel_values"].shape == (2, 4, 3, 64, 64)  # crops padded to the batch's most
        assert batch["image_attention_mask"][0, 3].all()  # a padding crop's mask is ones, as transformers pads
        with torch.no_grad():
            family.embed(batch)
        glb = spec.image_grids(57)
        assert [tuple(g.shape) for g in glb] == [(4, 4)] and int(glb[0][0, 0]) == 57 - 20
    finally:
        for hook in hooks:
            hook.remove()
    finite_step(family, batch)


def test_a_press_session_compresses_a_multi_crop_image_grid_by_grid(phi):
    """CoSRe under `with press(family)`: the session hooks the image embedding, so the 4 × 8 HD grid
    and the 4×4 global view of a 128×64 image each shrink 2×2 → 1; the 9 separators stay."""
    from mmreason.kv import CosrePress

    family = load_backbone("tiny-phi4mm", phi)
    family.model.eval()
    batch = family.collate([family.encode(maze_row(noise((128, 64))), with_target=False)], pad_side="left")
    mask = batch["attention_mask"]
    with CosrePress(block=4, keep_h=2, keep_w=2)(family) as session, torch.no_grad():
        family.model(inputs_embeds=family.embed(batch), attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        assert [tuple(g.shape) for g in session.spec.image_grids(57)] == [(4, 8), (4, 4)]
        st = session.states[0]
        assert int(((st.mod[:, 0] == VISION) & st.valid[:, 0]).sum()) == 32 // 4 + 16 // 4 + 9
    assert not session.spec.image_embedding._forward_pre_hooks  # removed with the press


def video_row(frames: list[Image.Image]) -> dict:
    return {**maze_row(), "prompt": f"Frames:\n{VIDEO}\nWhere is the goal?", "images": [png(f) for f in frames]}


def test_phi4mm_video_frames_stay_one_crop_and_hico_clips_share_a_batch_with_hd_images(phi):
    family = load_backbone("tiny-phi4mm", phi)
    frames = [noise((96, 64), seed) for seed in range(3)]  # wider than a crop: an image of this size is 2 crops
    assert len(family.image_run(frames[0])) > family.tokens_per_image
    plain = family.encode(video_row(frames))
    assert plain.input_ids.count(family.image_token_id) == 3 * family.tokens_per_image == 3 * 41
    assert all(isinstance(entry, VideoFrame) for entry in plain.images)
    batch = family.collate([plain])
    assert batch["image_pixel_values"].shape == (3, 2, 3, 64, 64)
    finite_step(family, batch)

    still = family.encode(maze_row(noise((256, 256), 5)))
    family.model.eval()
    with torch.no_grad():
        alone = family.embed(family.collate([still]))[0]
    family.video.use_hico, family.video.tokens_per_frame, family.video.clip_frames = True, 4, 2
    hico = family.encode(video_row(frames))
    assert hico.input_ids.count(family.image_token_id) == 2 * 4  # clips [0, 1] and [2], 2×2 each
    batch = family.collate([hico, still])
    assert batch["frame_pixel_values"].shape == (3, 3, 64, 64) and batch["image_pixel_values"].shape[:2] == (1, 5)
    assert batch["entry_is_clip"].tolist() == [True, True, False]
    with torch.no_grad():
        mixed = family.embed(batch)[1, : len(still.input_ids)]
    torch.testing.assert_close(mixed, alone)  # the HD image is embedded as it is on its own
    family.model.train()
    finite_step(family, batch)


# --- Phi-4-MM's vision LoRA ---------------------------------------------------------------------------


def save_vision_adapter(path, target=r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"):
    """A random LoRA (B ≠ 0) on the modules the hub's vision-lora adapts — the language model's
    attention and MLP projections — saved by PEFT as `path/vision-lora/`, the hub's layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi4MultimodalForCausalLM

    torch.manual_seed(1)
    base = Phi4MultimodalForCausalLM.from_pretrained(path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(path / VISION_ADAPTER))


def test_phi4mm_vision_lora_is_merged_on_load_as_the_model_card_loads_it(tmp_path):
    from transformers import Phi4MultimodalForCausalLM

    path = build_tiny("tiny-phi4mm", tmp_path / "phi")
    plain = load_backbone("tiny-phi4mm", path)
    save_vision_adapter(path)
    adapted = load_backbone("tiny-phi4mm", path)
    assert type(adapted.model) is Phi4MultimodalForCausalLM  # merged: no LoRA modules left
    assert not any("lora" in name for name, _ in adapted.model.named_modules())
    card = Phi4MultimodalForCausalLM.from_pretrained(path)
    card.load_adapter(str(path), adapter_name="vision", adapter_kwargs={"subfolder": VISION_ADAPTER})
    # (the card then calls set_adapter("vision"): transformers 5.25 wants peft >= 0.22 for it, the index
    # has 0.21; the only adapter loaded is the active one anyway)
    batch = adapted.collate([adapted.encode(maze_row(noise((128, 64))))])
    for model in (plain.model, adapted.model, card):
        model.eval()
    with torch.no_grad():
        ids = batch["input_ids"][:, :24]
        base_logits, merged, reference = (m(input_ids=ids).logits for m in (plain.model, adapted.model, card))
        with_image = adapted.model(inputs_embeds=adapted.embed(batch), attention_mask=batch["attention_mask"]).logits
    assert (merged - base_logits).abs().max() > 1e-2  # the adapter's weights change the outputs
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(with_image).all()

    adapted.save(tmp_path / "export")
    assert not (tmp_path / "export" / VISION_ADAPTER).exists()
    again = load_backbone("tiny-phi4mm", tmp_path / "export")
    again.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, merged)  # merged once, not twice


def test_phi4mm_vision_lora_for_other_modules_is_refused(tmp_path):
    path = build_tiny("tiny-phi4mm", tmp_path / "phi")
    save_vision_adapter(path)
    from safetensors.torch import load_file, save_file

    weights_file = path / VISION_ADAPTER / "adapter_model.safetensors"
    weights = load_file(weights_file)
    save_file({k.replace("model.layers", "model.blocks"): v for k, v in weights.items()}, weights_file)
    with pytest.raises(ValueError, match="are not in the file"):
        load_backbone("tiny-phi4mm", path)
