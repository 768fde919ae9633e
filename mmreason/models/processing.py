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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"


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
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{self.processor_class} (as parts): no attribute {name!r}")

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


def load_processor(path: str | Path) -> Any:
    """The checkpoint's processor when it ships one (processor_config.json or preprocessor_config.json
    beside the weights; a hub id is asked), else None: `AutoProcessor.from_pretrained`, or where that
    needs torchvision and it is missing, the same processor as `ProcessorParts`."""
    local = Path(str(path))
    if local.exists() and not any((local / f).is_file() for f in (PROCESSOR_CONFIG, IMAGE_PROCESSOR_CONFIG)):
        return None
    if local.exists() and not is_torchvision_available() and (local / PROCESSOR_CONFIG).is_file():
        settings = json.loads((local / PROCESSOR_CONFIG).read_text())
        name = settings.pop("processor_class", None)
        cls = getattr(transformers, name or "", None)
        if cls is not None and "video_processor" in cls.get_attributes():
            return ProcessorParts(name, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                  {k: v for k, v in settings.items() if k != "chat_template"})
    processor = AutoProcessor.from_pretrained(path)
    return processor if hasattr(processor, "tokenizer") else None  # a bare tokenizer comes back for text models
