"""Inference follows the model's device and dtype: decoding under every press (none, tova, dare with
a saved router, cosre, hico, the six kvpress baselines), with and without CoCoNuT latent thoughts,
on a tiny-phi4mm (partial rotary, HiCo at the input and in the cache) — and the training forwards
the presses take part in.

Stray tensors, without a GPU. `torch.set_default_device("meta")` sends every tensor made without an
explicit device (`torch.zeros(n)`, `torch.tensor(list)`, `torch.arange(n)`) to `meta`, while the
model and everything derived from its tensors stays on the CPU. A meta tensor meeting a CPU one
raises ("Tensor on device meta is not on the expected device cpu!"), `.to("cpu")` of one raises
("Cannot copy out of meta tensor"), and reading its value (`bool(t)`, `t.item()`) raises — so code
that would put a CPU tensor next to CUDA ones fails here, on the CPU, at the same line. It is
stricter than CUDA where that is wanted (a bare host-side flag tensor fails too) and blind to one
thing: `torch.Generator()` is always a CPU generator, so a sampling generator on the wrong device
is left to the GPU tests. The first test shows the trick catching a planted bare `torch.zeros`.
transformers 5.25's own forward (masks, rotary, cache) passes devices explicitly, so the whole
decode runs under the meta default; no narrower variant (patching only our modules) was needed.
Outputs are compared with the same decode outside the meta default: indexing a CPU tensor with a
meta index silently reads garbage (where CUDA would index correctly), and equal tokens rule out
the garbage mattering. Checked by reverting fixes one at a time: every reverted line was caught
except CoSRe's k-means init index (such garbage seeds, then k-means converged to the same
replies; on CUDA a CPU index works) and TOVA's fixed-size budget (the `tova-fixed` case since).

What the trick caught before this file existed (HEAD bebe9f1): `Family.collate`'s ids and masks,
the families' image tensors, `ModalitySpec`'s lookup tables, CoCoNuT `generate`'s `done` flags,
CoSRe's k-means init and quantisation steps and grid coordinates, HiCo's pooling matrix, DARE's
default prompt lengths in `observe_attention`, and kvpress's ExpectedAttention RoPE average.

Precision. The same decoding with the model loaded in bfloat16 (on the CPU) must run without dtype
errors and keep the cache in bf16; its greedy tokens must mostly match fp32's. A random tiny model
has near-flat logits whose top two differ by less than bf16's rounding (8 mantissa bits: ~0.4 %
relative), so its fp32 and bf16 replies part at the first token; the model here is first trained
for 100 steps on the prompts it is asked (~25 s), which makes its greedy choices clear. Once a row's
tokens part they stay apart, and presses add near-ties of their own (top-k of scores, k-means
assignments), so the measure is the share of fp32's tokens bf16 reproduces before a row's first
difference. Measured: 1.00 with no press, 0.95 over all cases, at least 0.68 for any one (cosre with latents). Asserted:
>= 0.9 with no press, >= 0.85 pooled, >= 0.5 for each case.

GPU (`pytest -m gpu`; skipped where CUDA is missing): the same cases on `cuda` in bf16 against the
CPU's fp32 tokens, under the same tolerances, and sampling with the evaluation runner's generator.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from mmreason.kv import CosrePress, DarePress, HicoPress, TovaPress, make_press
from mmreason.kv.dare import DareRouter, save_router
from mmreason.kv.kvpress_baselines import METHODS
from mmreason.kv.training import compressed_forward
from mmreason.latent.coconut import GenerationSettings, generate, latent_forward
from mmreason.models import build_tiny, load_backbone
from mmreason.models.base import VIDEO, VideoInput
from mmreason.models.tokenizer import IMAGE
from tests.kv_helpers import one_thread, rows, video_rows  # noqa: F401

BACKBONE = "tiny-phi4mm"
SETTINGS = GenerationSettings(max_new_tokens=24)
TRAIN_STEPS = 100
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextmanager
def default_device(device: str) -> Iterator[None]:
    """Tensors made without a device land on `device` inside; the previous default comes back after."""
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)


@dataclass(frozen=True)
class Case:
    press: str
    latents: int = 0

    @property
    def id(self) -> str:
        return f"{self.press}-latents{self.latents}"


PRESS_NAMES = ("none", "tova", "tova-fixed", "dare", "cosre", "hico", "hico-input", *(f"kvpress:{m}" for m in METHODS))
CASES = [Case(p, n) for p in PRESS_NAMES for n in (0, 2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """tiny-phi4mm trained to answer this file's prompts (see the module doc), saved as a checkpoint
    (so every variant goes through `load_backbone`'s dtype), and a DARE router file."""
    root = tmp_path_factory.mktemp("devices")
    family = load_backbone(BACKBONE, build_tiny(BACKBONE, root / "init"))
    optim = torch.optim.AdamW(family.model.parameters(), lr=3e-3)
    batch = family.collate([family.encode(r, "cot") for r in list(rows()) + list(video_rows(3))])
    family.model.train()
    for _ in range(TRAIN_STEPS):
        loss, _ = latent_forward(family, batch)
        optim.zero_grad()
        loss.backward()
        optim.step()
    family.model.eval()
    checkpoint = root / "trained"
    family.save(checkpoint)
    torch.manual_seed(0)
    save_router(DareRouter(family.model.get_decoder().config.hidden_size), root / "router.pt")
    return {"family": family, "checkpoint": checkpoint, "router": root / "router.pt", "loss": float(loss.detach())}


def make(name: str, router: Path) -> Any:
    """A fresh press that drops or merges entries (None for none / hico-input)."""
    if name in ("none", "hico-input"):
        return None
    if name == "tova":
        return TovaPress(factor=0.5, min_size=4, vision_factor=0.5, entropy_weight=0.2, recency_weight=0.2)
    if name == "tova-fixed":
        return TovaPress(cache_size=24)
    if name == "dare":
        return DarePress(rho_text=0.5, rho_vis=0.5, router_path=str(router), window=2)
    if name == "cosre":  # DCT with quantisation, slots, and decode-time folding
        return CosrePress(block=2, keep_h=1, keep_w=1, base_delta=0.05, slots=4, every=2, recent=2)
    if name == "hico":
        return HicoPress(tokens_per_frame=4, clip_frames=2, drop_from_layer=1, drop_keep=0.5)
    method = name.split(":", 1)[1]
    extra = {"seed": 0} if method == "random" else {"window_size": 4} if method == "snapkv" else {}
    return make_press(name, {"compression_ratio": 0.5, **extra})


def case_rows(case: Case) -> list[dict]:
    if case.press == "hico":  # frames as images: HiCo merges them in the cache
        return list(video_rows(3))
    if case.press == "hico-input":  # a <video> prompt: the family merges the frames before the model
        return [dict(r, prompt=r["prompt"].replace(IMAGE * 2, "").replace(IMAGE, VIDEO)) for r in video_rows(3)]
    return list(rows())


def decode(family: Any, case: Case, router: Path, check: Callable[[Any], None] | None = None) -> list[list[int]]:
    """Greedy replies to the case's rows under its press, batch collated (and the press made) here;
    `check(session)` looks at the press session after the decode."""
    press = make(case.press, router)
    video = family.video
    if case.press == "hico-input":
        family.video = VideoInput(use_hico=True, tokens_per_frame=4, clip_frames=2)
    try:
        target = "latent" if case.latents else "cot"
        items = [family.encode(r, target, n_latent_steps=case.latents, with_target=False) for r in case_rows(case)]
        batch = family.collate(items, pad_side="left")
        with (press(family) if press is not None else nullcontext()) as session:
            out = generate(family, batch, case.latents, SETTINGS)
            if check is not None:
                check(session)
    finally:
        family.video = video
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of `reference`'s tokens `other` reproduces before each row's first difference."""
    same = total = 0
    for a, b in zip(reference, other):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        same, total = same + k, total + max(len(a), len(b))
    return same / max(total, 1)


def check_agreement(scores: dict[str, float]) -> None:
    """The module doc's tolerances; the message names every case."""
    table = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
    assert min(scores[c.id] for c in CASES if c.press == "none") >= 0.9, table
    assert sum(scores.values()) / len(scores) >= 0.85, table
    assert min(scores.values()) >= 0.5, table


# --------------------------------------------------------------------------- stray tensors (meta default)

def test_the_meta_default_device_catches_a_tensor_made_without_a_device(trained):
    cpu = torch.ones(3)
    with default_device("meta"):
        stray = torch.zeros(3)
        assert stray.is_meta
        with pytest.raises(RuntimeError, match="is not on the expected device"):
            stray + cpu
        with pytest.raises(NotImplementedError, match="meta tensor"):
            stray.to("cpu")
        assert torch.equal(torch.zeros(3, device=cpu.device) + cpu, cpu)  # an explicit device is fine

    class Planted(TovaPress):
        def score(self, call):  # a bare torch.zeros inside a press, as a CUDA bug would have it
            return super().score(call) + torch.zeros(call.state.length)

    family = trained["family"]
    batch = family.collate([family.encode(r, "cot", with_target=False) for r in rows()], pad_side="left")
    with Planted(factor=0.5, min_size=4)(family):
        generate(family, batch, 0, GenerationSettings(max_new_tokens=3))  # fine on the CPU default
        with default_device("meta"), pytest.raises(RuntimeError, match="is not on the expected device"):
            generate(family, batch, 0, GenerationSettings(max_new_tokens=3))
    assert torch.get_default_device() == torch.device("cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decoding_makes_no_tensor_on_the_default_device(trained, case):
    family, router = trained["family"], trained["router"]
    compressed = []
    reference = decode(family, case, router, check=lambda s: compressed.append(s is None or s.compressed))
    assert compressed == [True] and all(reference)  # the press did rewrite the cache; every row answered
    with default_device("meta"):
        assert decode(family, case, router) == reference


def test_training_forwards_make_no_tensor_on_the_default_device(trained):
    """CoCoNuT's multi-pass forward, the cosre stage's chunked forward over a compressed cache, and
    DARE's three kinds of training masks (with the importance fit), each with its backward."""
    from mmreason.train.stages.dare import set_batch

    family = trained["family"]
    latent = family.collate([family.encode(r, "latent", n_latent_steps=2) for r in rows()], align_latents=True)
    cot = family.collate([family.encode(r, "cot") for r in rows()], align_latents=True)
    torch.manual_seed(0)
    # made on the CPU, as a trainer makes them; the press moves each to the model's device
    routers = {m: DareRouter(family.model.get_decoder().config.hidden_size).train() for m in ("gumbel", "topk", "decode")}

    def losses() -> list[float]:
        torch.manual_seed(0)  # the Gumbel noise
        out = [latent_forward(family, latent)[0]]
        out.append(compressed_forward(family, cot, CosrePress(block=2, keep_h=1, keep_w=1, slots=4, every=2), 2)[0])
        for masks, router in routers.items():
            press = DarePress(rho_text=0.5, rho_vis=0.5, layer=0, train_masks=masks, learn_importance=masks == "decode")
            press.router = router
            with press(family):
                set_batch(press, cot)
                loss = latent_forward(family, cot)[0] + press.ratio_loss()
                if masks == "decode":
                    loss = loss + press.importance_loss()
            out.append(loss)
        torch.stack(out).sum().backward()
        grads = [p.grad for r in routers.values() for p in r.parameters()]
        assert all(g is not None and g.device == family.model.device for g in grads)
        family.model.zero_grad()
        for r in routers.values():
            r.zero_grad()
        return [float(x) for x in out]

    reference = losses()
    with default_device("meta"):
        assert losses() == pytest.approx(reference, rel=1e-6)


def test_a_batch_follows_the_model_to_its_device_and_dtype(trained):
    """`collate` (and each family's `image_inputs`) put ids and masks on the model's device and
    floating inputs in its dtype; a model moved to `meta` gets a batch on `meta`."""
    for name in ("tiny-internvl", "tiny-anole", BACKBONE):
        path = trained["checkpoint"] if name == BACKBONE else build_tiny(name, trained["checkpoint"].parent / name)
        family = load_backbone(name, path, dtype=torch.bfloat16)
        batch = family.collate([family.encode(r, "cot") for r in rows()])
        pixels = {k: v for k, v in batch.items() if v.is_floating_point()}
        assert pixels and all(v.dtype == torch.bfloat16 for v in pixels.values()), name
        assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
        family.model.to("meta")
        batch = family.collate([family.encode(r, "cot") for r in rows()])
        assert {v.device.type for v in batch.values()} == {"meta"}, name
        if name == BACKBONE:  # HiCo clips: frame counts and flags too
            family.video = VideoInput(use_hico=True, tokens_per_frame=4, clip_frames=2)
            clips = family.collate([family.encode(r, "cot") for r in case_rows(Case("hico-input"))])
            assert {"entry_frames", "entry_is_clip"} <= set(clips)
            assert {v.device.type for v in clips.values()} == {"meta"}
            assert clips["frame_pixel_values"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- precision

@pytest.fixture(scope="module")
def fp32_replies(trained) -> dict[str, list[list[int]]]:
    return {c.id: decode(trained["family"], c, trained["router"]) for c in CASES}


def test_bfloat16_decodes_under_every_press_and_mostly_matches_fp32(trained, fp32_replies):
    assert trained["loss"] < 0.05  # the module doc's premise: the model is sure of its replies
    family = load_backbone(BACKBONE, trained["checkpoint"], dtype=torch.bfloat16)
    family.model.eval()
    assert {p.dtype for p in family.model.parameters()} == {torch.bfloat16}

    def cache_in_bf16(session):
        if session is not None:
            assert {layer.keys.dtype for layer in session.cache.layers} == {torch.bfloat16}

    scores = {c.id: agreement(fp32_replies[c.id], decode(family, c, trained["router"], cache_in_bf16)) for c in CASES}
    check_agreement(scores)


# --------------------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
@ON_GPU
def test_cuda_bfloat16_decodes_under_every_press_and_mostly_matches_cpu_fp32(trained, fp32_replies):
    family = load_backbone(BACKBONE, trained["checkpoint"], dtype=torch.bfloat16)
    family.model.to("cuda").eval()

    def on_cuda(session):
        if session is not None:
            assert {layer.keys.device.type for layer in session.cache.layers} == {"cuda"}
            assert {layer.keys.dtype for layer in session.cache.layers} == {torch.bfloat16}

    scores = {c.id: agreement(fp32_replies[c.id], decode(family, c, trained["router"], on_cuda)) for c in CASES}
    check_agreement(scores)


@pytest.mark.gpu
@ON_GPU
def test_cuda_sampling_with_the_runners_generator_is_reproducible(trained):
    from mmreason.eval.runner import evaluate

    family = load_backbone(BACKBONE, trained["checkpoint"], dtype=torch.bfloat16)
    family.model.to("cuda").eval()
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    runs = [evaluate(family, list(rows()), "cot", settings, batch_size=2, seed=s) for s in (3, 3)]
    assert [p["output"] for p in runs[0].predictions] == [p["output"] for p in runs[1].predictions]
    # a CPU generator with a CUDA model: drawn on the generator's device, still reproducible
    batch = family.collate([family.encode(r, "cot", with_target=False) for r in rows()], pad_side="left")
    a, b = (generate(family, batch, 0, settings, torch.Generator().manual_seed(5)) for _ in range(2))
    assert a == b and all(a)
