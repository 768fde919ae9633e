"""Backbone registry: one name → (model, tokenizer, family adapter).

Real checkpoints (`anole-7b`, `internvl3-1b`, `phi4-mm`) load from a local path or hub id with
`from_pretrained` (`Family.load_model`: Phi-4-MM also merges its vision LoRA) and their processor
(`load_processor`). Tiny ones (`tiny-*`) are the same transformers
classes with small random weights: built from config once, saved with their processor, and loaded
back through the very same path — so the loading code real checkpoints take is what tests exercise.
`internvl-smollm2` is built (`mmreason models build internvl-smollm2 DIR`) from the pretrained
SmolLM2-135M-Instruct weights an installed package ships (`mmreason.models.smollm2`). No code path
here downloads anything unless a hub id is given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer

from mmreason.config import ConfigError
from mmreason.models.anole import AnoleFamily
from mmreason.models.anole import build_processor as anole_processor
from mmreason.models.anole import tiny_config as tiny_anole_config
from mmreason.models.base import Family
from mmreason.models.internvl import PROCESSOR_TOKENS as INTERNVL_TOKENS
from mmreason.models.internvl import InternVLFamily
from mmreason.models.internvl import build_processor as internvl_processor
from mmreason.models.internvl import tiny_config as tiny_internvl_config
from mmreason.models.phi4mm import PROCESSOR_TOKENS as PHI4MM_TOKENS
from mmreason.models.phi4mm import Phi4MMFamily
from mmreason.models.phi4mm import build_processor as phi4mm_processor
from mmreason.models.phi4mm import tiny_config as tiny_phi4mm_config
from mmreason.models.processing import load_processor
from mmreason.models.smollm2 import build_internvl_smollm2
from mmreason.models.tokenizer import END_LATENT, LATENT, START_LATENT, build_word_tokenizer


@dataclass
class ModelConfig:
    backbone: str = "tiny-internvl"
    """Registry name: tiny-internvl, tiny-anole, tiny-phi4mm, internvl-smollm2, internvl3-1b, anole-7b, phi4-mm."""
    checkpoint: str | None = None
    """Local checkpoint dir or hub id; None for a tiny backbone builds a fresh random one."""
    codebook_rows: int = 0
    """A fresh tiny-anole (no checkpoint, no init_from): fit its VQ-VAE codebook by k-means to the
    images (prompt and step images) of this many training rows before training (`AnoleFamily.
    fit_codebook`) — a random codebook cannot tell the cells of a small drawing apart. 0: random."""
    tokenizer_steps: int = 0
    """With `codebook_rows`: then train the VQ-VAE's encoder and codebook as an image tokenizer on the
    same images for this many steps (VQ-VAE training with a throwaway decoder, `AnoleFamily.
    train_tokenizer`), as a real Anole's VQ-VAE was trained; k-means alone keeps a random encoder,
    whose codes lose the small glyphs (maze letters). 0: k-means only."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: type[Family]
    hub_id: str | None = None
    """Default checkpoint for real backbones (used only when no local path is given)."""
    tiny_config: Any = None
    """For tiny backbones: (tokenizer) -> transformers config."""
    tiny_processor: Callable[[Any, Any], Any] | None = None
    """For tiny backbones whose family reads images through a processor: (tokenizer, config) -> processor."""
    named_tokens: dict[str, str] | None = None
    """Special tokens the family's processor reads as tokenizer attributes (tiny tokenizers carry them)."""
    builder: Callable[..., Path] | None = None
    """For backbones built locally from installed weights: (out_dir, seed) -> checkpoint dir."""

    @property
    def tiny(self) -> bool:
        return self.tiny_config is not None


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("internvl3-1b", InternVLFamily, hub_id="OpenGVLab/InternVL3-1B-hf"),
        BackboneSpec("tiny-internvl", InternVLFamily, tiny_config=tiny_internvl_config,
                     tiny_processor=lambda tok, cfg: internvl_processor(tok, cfg, max_patches=1),
                     named_tokens=INTERNVL_TOKENS),
        BackboneSpec("internvl-smollm2", InternVLFamily, builder=build_internvl_smollm2),
        BackboneSpec("anole-7b", AnoleFamily, hub_id="leloy/Anole-7b-v0.1-hf"),
        BackboneSpec("tiny-anole", AnoleFamily, tiny_config=tiny_anole_config, tiny_processor=anole_processor),
        BackboneSpec("phi4-mm", Phi4MMFamily, hub_id="microsoft/Phi-4-multimodal-instruct"),
        BackboneSpec("tiny-phi4mm", Phi4MMFamily, tiny_config=tiny_phi4mm_config,
                     tiny_processor=lambda tok, cfg: phi4mm_processor(tok, cfg, dynamic_hd=4),
                     named_tokens=PHI4MM_TOKENS),
    )
}


class CheckpointError(ConfigError):
    """A checkpoint path is missing, not a checkpoint, or holds another family's model."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})") from None


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizers' vocabulary is read from: generated rows of every grid-world task,
    with their re-checks (`recheck` and `restate` data)."""
    from mmreason.tasks import TASKS, RenderOptions, answer_sentence, generate_example
    from mmreason.tasks.base import recheck_step, restated

    fractions = {"train": 1.0, "val": 0.0, "test": 0.0}
    opts = RenderOptions(image_size=64, step_images=False)
    texts = []
    for task in TASKS.values():
        for size in task.sizes:
            for index in range(12):
                row = generate_example(task, size, "train", index, 12345, fractions, opts)
                texts += [row["prompt"], *row["steps"], recheck_step(row["steps"]), restated(row["steps"][-1]),
                          answer_sentence(row["answer"]), *row["choices"]]
    return texts


def build_tiny(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build tiny backbone `name` with random weights and save it (model + tokenizer, and the
    processor where its family reads images through one) to `out_dir`."""
    spec = get_spec(name)
    if not spec.tiny:
        raise ValueError(f"{name} is not a tiny backbone")
    tokenizer = build_word_tokenizer(tiny_corpus(), extra_special=getattr(spec.family, "extra_tokens", ()),
                                     named=spec.named_tokens)
    config = spec.tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = spec.family.model_class(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    (spec.tiny_processor(tokenizer, config) if spec.tiny_processor else tokenizer).save_pretrained(out)
    (out / "mmreason_backbone.txt").write_text(name + "\n")
    return out


def build_backbone(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write backbone `name` as a checkpoint in `out_dir`: a tiny one with random weights, or one built
    from installed pretrained weights (`internvl-smollm2`)."""
    spec = get_spec(name)
    if spec.tiny:
        return build_tiny(name, out_dir, seed)
    if spec.builder is None:
        raise ValueError(f"{name} is not built locally: give its checkpoint path or hub id "
                         f"({spec.hub_id}) as model.checkpoint")
    return spec.builder(out_dir, seed=seed)


def check_checkpoint(name: str, path: str | Path) -> None:
    """Fail early (before any worker starts) when `path` (a local dir or an s3:// / gs:// prefix) is
    not a checkpoint of `name`'s family."""
    import json

    from mmreason import storage

    spec = get_spec(name)
    path = str(path) if storage.is_remote(str(path)) else Path(path)
    if not storage.exists(str(path)) and not storage.is_dir(str(path)):
        raise CheckpointError(f"checkpoint {path} does not exist")
    config_file = storage.join(str(path), "config.json")
    if not storage.exists(config_file):
        raise CheckpointError(f"{path} is not a checkpoint: no config.json")
    model_type = json.loads(storage.read_text(config_file)).get("model_type")
    if model_type not in spec.family.model_types:
        raise CheckpointError(
            f"checkpoint {path} holds a {model_type!r} model, but backbone {name!r} is the "
            f"{spec.family.name} family ({', '.join(spec.family.model_types)})"
        )


def ensure_latent_tokens(model: Any, tokenizer: Any) -> list[str]:
    """CoCoNuT's `<|start-latent|>`, `<|latent|>`, `<|end-latent|>` as special tokens of `tokenizer`.

    A real checkpoint's tokenizer has none of them (the tiny vocabularies are built with them): add
    the missing ones, grow the embeddings (and an untied output layer) if the new ids do not fit,
    and start each new row as a copy of the row of `<<` (CoCoNuT's own initialisation; the eos
    token's where `<<` is not one token). Returns the tokens added. Saved with the next export."""
    missing = [t for t in (START_LATENT, LATENT, END_LATENT) if t not in tokenizer.get_vocab()]
    if not missing:
        return []
    tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    seed = tokenizer.encode("<<", add_special_tokens=False)
    source = seed[0] if len(seed) == 1 else tokenizer.eos_token_id
    ids = tokenizer.convert_tokens_to_ids(missing)
    with torch.no_grad():
        tables = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not tables[0]:
            tables.append(head.weight)
        for table in tables:
            table[ids] = table[source].clone()
    return missing


def load_backbone(name: str, path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Family:
    """Load backbone `name` from `path` (a local checkpoint or an s3:// / gs:// prefix; for real
    backbones a hub id is allowed) with parameters in `dtype`."""
    spec = get_spec(name)
    if path is None:
        if spec.hub_id is None:
            raise CheckpointError(f"{name}: give the path `mmreason models build {name} DIR` saved it to")
        path = spec.hub_id
    from mmreason import storage

    if storage.is_remote(str(path)):  # s3:// or gs://: read from a local copy (downloaded once per machine)
        check_checkpoint(name, path)
        path = storage.local_copy(str(path))
    elif Path(str(path)).exists() or spec.hub_id is None:
        check_checkpoint(name, path)
    model = spec.family.load_model(path, dtype)
    processor = load_processor(path)
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path)
    ensure_latent_tokens(model, tokenizer)  # a real checkpoint's tokenizer has no CoCoNuT tokens
    return spec.family(model, tokenizer, processor)


__all__ = ["BACKBONES", "BackboneSpec", "ModelConfig", "CheckpointError", "Family", "build_backbone", "build_tiny",
           "check_checkpoint", "load_processor",
           "ensure_latent_tokens", "get_spec", "load_backbone"]
