"""Checkpoints through their processors and chat templates, as a hub checkpoint loads.

- tiny-internvl saves an InternVL processor; normalisation and tiling come back from its config, and
  with tiling on, the tokens the processor makes per image (its `num_patches` × `image_seq_length`)
  are what the family lays out and what the KV presses' modality spec finds, tile by tile.
- `internvl-smollm2` — SmolLM2-135M-Instruct's pretrained weights inside InternVL — built by the CLI
  offline: text-only it answers as SmolLM2 does, prompts and targets go through its chat template,
  and CoCoNuT's latent tokens live on its BPE vocabulary across save and load.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from mmreason.kv.modality import VISION, modality_spec
from mmreason.latent.coconut import latent_forward
from mmreason.models import build_tiny, load_backbone, load_processor
from mmreason.models.internvl import IMAGENET_MEAN, IMAGENET_STD
from mmreason.models.tokenizer import END_LATENT, LATENT, START_LATENT
from mmreason.tasks import TASKS, RenderOptions, generate_example

FRACTIONS = {"train": 1.0, "val": 0.0, "test": 0.0}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiled_internvl(tmp_path_factory):
    """tiny-internvl whose saved processor tiles images (up to 4 tiles + thumbnail)."""
    path = build_tiny("tiny-internvl", tmp_path_factory.mktemp("tiled"))
    config = json.loads((path / "preprocessor_config.json").read_text())
    config.update(crop_to_patches=True, max_patches=4)
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    return path


def test_tiny_internvl_processor_round_trip(tmp_path):
    path = build_tiny("tiny-internvl", tmp_path / "m")
    processor = load_processor(path)
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"
    images = processor.image_processor
    assert tuple(images.image_mean) == pytest.approx(IMAGENET_MEAN) and tuple(images.image_std) == pytest.approx(IMAGENET_STD)
    assert (images.size.height, images.size.width) == (64, 64) and images.max_patches == 1
    assert processor.image_seq_length == 16
    family = load_backbone("tiny-internvl", path)
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    pixels = family.image_inputs([white])["pixel_values"]
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(pixels[0, :, 0, 0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (128, 64), (64, 128), (200, 90), (256, 256)])
def test_tiles_from_the_processor_are_the_family_layout_and_the_modality_grids(tiled_internvl, size):
    family = load_backbone("tiny-internvl", tiled_internvl)
    image = Image.new("RGB", size, (30, 120, 200))
    out = family.processor.image_processor(images=[image], return_tensors="pt", **family.images_kwargs)
    tiles = int(out["num_patches"][0])
    assert tiles == family.tiles(image) and out["pixel_values"].shape[0] == tiles
    if size != (64, 64):
        assert tiles > 1  # several tiles plus the thumbnail
    per_tile = family.processor.image_seq_length

    row = generate_example(TASKS["maze"], 3, "train", 0, 0, FRACTIONS, RenderOptions())
    row = {**row, "images": [png(image)]}
    batch = family.collate([family.encode(row)])
    assert batch["pixel_values"].shape[0] == tiles
    spec = modality_spec(family.model)
    modality = spec.modality(batch["input_ids"])
    assert int((modality == VISION).sum()) == tiles * per_tile
    runs = spec.images(modality[0])
    assert [length for _, length in runs] == [per_tile] * tiles  # one image per tile, each its own 4×4 grid
    assert all(grid.shape == (4, 4) for _, length in runs for grid in spec.image_grids(length))
    loss, _ = latent_forward(family, batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_internvl_smollm2_answers_like_smollm2(smollm2):
    family = load_backbone("internvl-smollm2", smollm2)
    assert type(family.model).__name__ == "InternVLForConditionalGeneration"
    ids = family.prompt_ids("What is the capital of France?")
    assert family.tokenizer.decode(ids).startswith("<|im_start|>system")  # the checkpoint's chat template
    x = torch.tensor([ids])
    out = family.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
    reply = family.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_internvl_smollm2_rows_go_through_the_chat_template_and_tiles(smollm2):
    family = load_backbone("internvl-smollm2", smollm2)
    config = json.loads((smollm2 / "processor_config.json").read_text())
    assert config["processor_class"] == "InternVLProcessor" and config["image_seq_length"] == 16
    assert family.processor.image_processor.max_patches == 6
    row = generate_example(TASKS["maze"], 3, "train", 0, 0, FRACTIONS, RenderOptions())
    encoded = family.encode(row)
    text = family.tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
    assert encoded.input_ids[-1] == family.tokenizer.eos_token_id == family.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encoded.labels[-1] == family.tokenizer.eos_token_id  # the reply is trained through its end of turn
    assert family.tokenizer.pad_token_id != family.tokenizer.eos_token_id
    image = Image.open(io.BytesIO(row["images"][0]))
    context = family.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert encoded.input_ids.count(context) == family.tiles(image) * 16


def test_coconut_tokens_on_a_bpe_vocabulary_survive_save_and_load(smollm2, tmp_path):
    family = load_backbone("internvl-smollm2", smollm2)
    tok = family.tokenizer
    ids = tok.convert_tokens_to_ids([START_LATENT, LATENT, END_LATENT])
    assert min(ids) >= 49152  # added after SmolLM2's 49 152 BPE entries
    assert tok.tokenize(f"a{LATENT}b") == ["a", LATENT, "b"]  # one token, never split by BPE
    rows = family.model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok)

    row = generate_example(TASKS["maze"], 3, "train", 0, 0, FRACTIONS, RenderOptions())
    batch = family.collate([family.encode(row, "latent", n_latent_steps=1)], align_latents=True)
    loss, _ = latent_forward(family, batch)
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        family.model.get_input_embeddings().weight[ids[1]] += 1.0  # as training would move it
    family.save(tmp_path / "export")
    again = load_backbone("internvl-smollm2", tmp_path / "export")
    assert again.tokenizer.convert_tokens_to_ids([START_LATENT, LATENT, END_LATENT]) == ids
    assert again.model.get_input_embeddings().weight.shape[0] == rows
    torch.testing.assert_close(again.model.get_input_embeddings().weight[ids],
                               family.model.get_input_embeddings().weight[ids])
    assert again.tokenizer.chat_template == tok.chat_template
