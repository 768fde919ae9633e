"""A checkpoint's Hugging Face processor: loaded with `AutoProcessor`, saved in the hub's layout.

One gap in transformers 5.4+ shapes this module: a processor whose signature names a video
processor (`InternVLProcessor`) can be neither built nor loaded without torchvision, even for images
only — `AutoProcessor` instantiates every sub-processor and the video ones require torchvision
(huggingface/transformers#48558). torchvision has no wheel that imports beside this project's CPU
torch pin, so where it is missing the processor is kept as its parts (`ProcessorParts`): the
checkpoint's own image processor (`AutoImageProcessor`, which has a PIL backend), its tokenizer, and
the processor's settings from `processor_config.json` — exactly what the processor itself would
hand its image processor, and the same files on disk, so a machine with torchvision loads the saved
checkpoint as the real processor class.

A second gap: an image processor with no PIL backend at all (`Phi4MultimodalImageProcessor`). Where
this project has a port of it (`IMAGE_PROCESSOR_PORTS`: the same preprocessing on transformers' PIL
backend, saved under the original class name), the processor is built around the port; elsewhere
transformers' own class loads the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.utils import cached_file, is_torchvision_available

from mmreason.models.phi4mm_images import Phi4MultimodalImageProcessorPil

PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_PROCESSOR_PORTS = {"Phi4MultimodalImageProcessor": Phi4MultimodalImageProcessorPil}
"""Image processors transformers implements with torchvision only → this project's PIL-backend port."""


@dataclass
class ProcessorParts:
    """A processor transformers cannot build here (no torchvision), as its parts; it answers the
    attributes the families read (`image_processor`, `tokenizer`, the processor's settings such as
    `image_seq_length`, `images_kwargs`, `chat_template`) and saves the hub layout."""

    processor_class: str
    image_processor: Any
    tokenizer: Any
    settings: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # only what the instance dict lacks lands here; during a copy or unpickling it is still empty
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        owner = self.__dict__.get("processor_class", "processor")
        raise AttributeError(f"{owner} (as parts): no attribute {name!r}")

    @property
    def images_kwargs(self) -> dict[str, Any]:
        """What the processor class passes its image processor by default (InternVL: crop_to_patches)."""
        return dict(getattr(getattr(transformers, self.processor_class, None), "images_kwargs", None) or {})

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.image_processor.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        config = {"processor_class": self.processor_class, **self.settings}
        (Path(out_dir) / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_processor(processor_class: str, image_processor: Any, tokenizer: Any, **settings: Any) -> Any:
    """`transformers.<processor_class>(image_processor, tokenizer, **settings)` with the tokenizer's chat
    template; its parts where transformers cannot build it without torchvision."""
    cls = getattr(transformers, processor_class)
    if not is_torchvision_available() and "video_processor" in cls.get_attributes():
        return ProcessorParts(processor_class, image_processor, tokenizer, dict(settings))
    return cls(image_processor=image_processor, tokenizer=tokenizer,
               chat_template=getattr(tokenizer, "chat_template", None), **settings)


def _read_json(path: str | Path, name: str) -> dict[str, Any] | None:
    """`name` of checkpoint `path` (a local dir, or a hub id: fetched), or None where it has none."""
    local = Path(str(path)) / name
    if local.is_file():
        return json.loads(local.read_text())
    if Path(str(path)).exists():
        return None
    found = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(found).read_text()) if found else None


def _with_ported_image_processor(path: str | Path, settings: dict[str, Any]) -> Any:
    """The checkpoint's processor (`settings` is its processor_config.json) built around the port of
    its image processor, the other parts loaded as `AutoProcessor` would; None where no port applies."""
    images = settings.get("image_processor") or _read_json(path, IMAGE_PROCESSOR_CONFIG) or {}
    port = IMAGE_PROCESSOR_PORTS.get(images.get("image_processor_type", ""))
    cls = getattr(transformers, settings.get("processor_class") or "", None)
    if port is None or cls is None:
        return None
    parts: dict[str, Any] = {}
    for attribute in cls.get_attributes():
        if attribute == "image_processor":
            parts[attribute] = port.from_pretrained(path)
        elif attribute == "tokenizer":
            parts[attribute] = AutoTokenizer.from_pretrained(path)
        else:  # Phi-4-MM's audio_processor: a feature extractor, no torchvision needed
            parts[attribute] = AutoFeatureExtractor.from_pretrained(path)
    extra = {k: v for k, v in settings.items()
             if k not in ("processor_class", "chat_template", *cls.get_attributes())}
    return cls(**parts, **extra)


def load_processor(path: str | Path) -> Any:
    """The checkpoint's processor when it ships one (processor_config.json or preprocessor_config.json
    beside the weights; a hub id is asked), else None: `AutoProcessor.from_pretrained`, or where that
    needs torchvision and it is missing, the same processor as `ProcessorParts` or around a port of
    its image processor (`IMAGE_PROCESSOR_PORTS`)."""
    local = Path(str(path))
    if local.exists() and not any((local / f).is_file() for f in (PROCESSOR_CONFIG, IMAGE_PROCESSOR_CONFIG)):
        return None
    settings = None if is_torchvision_available() else _read_json(path, PROCESSOR_CONFIG)
    if settings is not None:
        ported = _with_ported_image_processor(path, settings)
        if ported is not None:
            return ported
        name = settings.pop("processor_class", None)
        cls = getattr(transformers, name or "", None)
        if cls is not None and "video_processor" in cls.get_attributes():
            return ProcessorParts(name, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                  {k: v for k, v in settings.items() if k != "chat_template"})
    processor = AutoProcessor.from_pretrained(path)
    return processor if hasattr(processor, "tokenizer") else None  # a bare tokenizer comes back for text models
