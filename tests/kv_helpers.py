"""Shared by the tests/test_kv_*.py modules: tiny backbones built once per test process, a few
prompt rows, and batches in the layout evaluation uses (left-padded, no targets)."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass

import pytest
import torch

from mmreason.models import build_tiny, load_backbone
from mmreason.models.tokenizer import IMAGE
from mmreason.tasks import TASKS, RenderOptions, generate_example

FAMILIES = ("tiny-internvl", "tiny-anole", "tiny-phi4mm")
ALL_TRAIN = {"train": 1.0, "val": 0.0, "test": 0.0}


@functools.lru_cache(maxsize=None)
def tiny_family(name: str):
    """A tiny backbone with spread weights (a random tiny model repeats one token; spread ones give
    rows different outputs), in eval mode."""
    fam = load_backbone(name, build_tiny(name, tempfile.mkdtemp(prefix=f"kv-{name}-")))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in fam.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    fam.model.eval()
    return fam


@functools.lru_cache(maxsize=None)
def rows() -> tuple[dict, ...]:
    """Prompts of different lengths (so the batch is left-padded)."""
    opts = RenderOptions(step_images=False, image_size=64)
    return tuple(generate_example(TASKS[t], s, "train", i, 0, ALL_TRAIN, opts)
                 for i, (t, s) in enumerate([("maze", 3), ("maze", 4), ("frozenlake", 3)]))


@functools.lru_cache(maxsize=None)
def video_rows(frames: int = 4) -> tuple[dict, ...]:
    """Rows whose prompt holds `frames` images (a maze's initial state and its step images)."""
    out = []
    for i in range(2):
        r = generate_example(TASKS["maze"], 3, "train", i, 0, ALL_TRAIN, RenderOptions(step_images=True, image_size=64))
        images = (list(r["images"]) + list(r["step_images"]) + list(r["images"]) * frames)[:frames]
        out.append(dict(r, prompt=IMAGE * (frames - 1) + r["prompt"], images=images))
    return tuple(out)


def batch_of(fam, rs) -> dict[str, torch.Tensor]:
    return fam.collate([fam.encode(r, "cot", with_target=False) for r in rs], pad_side="left")


def prefill(fam, batch):
    """One forward over the prompt, as `coconut.generate` does it; returns the model output."""
    mask = batch["attention_mask"]
    return fam.model(inputs_embeds=fam.embed(batch), attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)


def forced(press):
    """The same press with the "keeps everything" shortcut off, so its full compress path runs."""
    cls = type(press)

    @dataclass
    class Forced(cls):  # type: ignore[misc, valid-type]
        def keeps_everything(self) -> bool:
            return False

    obj = Forced.__new__(Forced)
    obj.__dict__.update(press.__dict__)
    return obj


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine torch's
    spinning threads made these tests ~10× slower; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
