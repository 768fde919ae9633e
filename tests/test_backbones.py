"""Tiny backbones end to end: build → save → from_pretrained, encode/collate/embed, loss and grads,
cached generation from `inputs_embeds`, images reaching the logits; plus the family-specific parts
(Anole's VQ tokens and MVoT loss, Phi-4-MM's bidirectional vision encoder)."""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoTokenizer

from mmreason.models import CheckpointError, build_tiny, check_checkpoint, get_spec, load_backbone, load_processor
from mmreason.models.anole import image_code_token, visual_token_discrepancy
from mmreason.models.base import IGNORE, position_ids
from mmreason.models.phi4mm import make_vision_bidirectional
from mmreason.tasks import TASKS, RenderOptions, generate_example, parse_answer

TINY = ["tiny-internvl", "tiny-anole", "tiny-phi4mm"]
FRACTIONS = {"train": 1.0, "val": 0.0, "test": 0.0}
# parameters that only see images; everything else is the language model
IMAGE_SIDE = ("vision", "vqmodel", "multi_modal_projector", "embed_tokens_extend")


@pytest.fixture(scope="module")
def rows():
    maze = generate_example(TASKS["maze"], 3, "train", 0, 0, FRACTIONS, RenderOptions())
    lake = generate_example(TASKS["frozenlake"], 3, "train", 0, 0, FRACTIONS, RenderOptions())
    return [maze, lake]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_tiny(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def forward(family, batch, **kwargs):
    mask = batch["attention_mask"]
    return family.model(inputs_embeds=family.embed(batch), attention_mask=mask, position_ids=position_ids(mask),
                        **kwargs)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", TINY)
def test_save_load_keeps_weights_and_logits(name, tiny_dir, rows):
    path = tiny_dir(name)
    spec = get_spec(name)
    processor = load_processor(path)
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # build_tiny's default seed: the same random weights again, never saved
    fresh = spec.family(spec.family.model_class(spec.tiny_config(tokenizer)).eval(), tokenizer, processor)

    start = time.perf_counter()
    loaded = load_backbone(name, path)
    assert time.perf_counter() - start < 10.0

    fresh_state, loaded_state = fresh.model.state_dict(), loaded.model.state_dict()
    assert fresh_state.keys() == loaded_state.keys()
    for key, value in fresh_state.items():
        assert torch.equal(value, loaded_state[key]), key
    batch = loaded.collate([loaded.encode(row) for row in rows])
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded, batch).logits, forward(fresh, batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_encode_collate_embed_loss_backward(name, tiny_dir, rows):
    family = load_backbone(name, tiny_dir(name))
    family.model.train()
    items = [family.encode(row) for row in rows]
    run = family.image_run()
    for item in items:
        assert len(item.images) == 1
        ids = item.input_ids
        starts = [i for i in range(len(ids) - len(run) + 1) if ids[i:i + len(run)] == run]
        assert len(starts) == 1 and starts[0] < item.prompt_len  # one image run, inside the prompt
        assert all(label == IGNORE for label in item.labels[: item.prompt_len])
    batch = family.collate(items)

    out = forward(family, batch, labels=batch["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()

    params = dict(family.model.named_parameters())
    text = {n: p for n, p in params.items() if not any(k in n for k in IMAGE_SIDE)}
    missing = [n for n, p in text.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    image_side = {n: p for n, p in params.items() if any(k in n for k in IMAGE_SIDE)}
    if name == "tiny-anole":  # Chameleon's VQ-VAE is frozen: codes are discrete, no gradient reaches it
        assert all(not p.requires_grad and p.grad is None for p in image_side.values())
    else:  # the vision encoder is trained through the merged features
        assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in image_side.values()) > 10


@pytest.mark.parametrize("name", TINY)
def test_cached_generation_matches_full_forward(name, tiny_dir, rows):
    family = load_backbone(name, tiny_dir(name))
    batch = family.collate([family.encode(row, with_target=False) for row in rows], pad_side="left")
    assert batch["attention_mask"][:, 0].tolist() != [1, 1]  # rows differ in length: one is left-padded
    embed_tokens = family.model.get_input_embeddings()
    with torch.no_grad():
        embeds = family.embed(batch)
        mask = batch["attention_mask"]
        out = family.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
        cache, step_logits, new_embeds = out.past_key_values, [out.logits[:, -1]], []
        for _ in range(6):  # greedy, one token at a time, pixels never passed again
            token = step_logits[-1].argmax(-1, keepdim=True)
            new_embeds.append(embed_tokens(token))
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = family.model(inputs_embeds=new_embeds[-1], attention_mask=mask,
                               position_ids=position_ids(mask)[:, -1:], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits[:, -1])
        full = family.model(inputs_embeds=torch.cat([embeds, *new_embeds], dim=1), attention_mask=mask,
                            position_ids=position_ids(mask)).logits
    prompt_len = embeds.shape[1]
    cached = torch.stack(step_logits, dim=1)
    torch.testing.assert_close(cached, full[:, prompt_len - 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_image_changes_first_target_logits(name, tiny_dir, rows):
    family = load_backbone(name, tiny_dir(name))
    family.model.eval()
    row = rows[0]
    inverted = ImageOps.invert(Image.open(io.BytesIO(row["images"][0])).convert("RGB"))
    items = [family.encode(row), family.encode(dict(row, images=[png(inverted)]))]
    assert items[0].input_ids == items[1].input_ids  # same text: only the image differs
    first_target = next(i for i, label in enumerate(items[0].labels) if label != IGNORE)
    with torch.no_grad():
        logits = forward(family, family.collate(items)).logits[:, first_target - 1]
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_check_checkpoint_names_backbone_and_family(tiny_dir):
    internvl = tiny_dir("tiny-internvl")
    with pytest.raises(CheckpointError, match=r"(?s)'internvl'.*'tiny-anole'.*chameleon"):
        check_checkpoint("tiny-anole", internvl)
    with pytest.raises(CheckpointError, match=r"(?s)'chameleon'.*'tiny-phi4mm'"):
        check_checkpoint("tiny-phi4mm", tiny_dir("tiny-anole"))
    with pytest.raises(CheckpointError, match="tiny-anole"):
        load_backbone("tiny-anole", internvl)


def test_real_backbones_registered_with_hub_ids():
    assert get_spec("anole-7b").hub_id == "leloy/Anole-7b-v0.1-hf"
    assert get_spec("phi4-mm").hub_id == "microsoft/Phi-4-multimodal-instruct"
    assert get_spec("anole-7b").family is get_spec("tiny-anole").family
    assert get_spec("phi4-mm").family is get_spec("tiny-phi4mm").family


# --- Anole: VQ tokens, image labels, MVoT loss -----------------------------------------------------


def test_anole_embed_writes_vq_tokens_at_placeholders(tiny_dir, rows):
    family = load_backbone("tiny-anole", tiny_dir("tiny-anole"))
    assert len(family.image_run()) == 64 + 2
    tokens = family.image_token_ids(rows[0]["images"])
    assert tokens.shape == (1, 64)
    vocab = family.tokenizer.get_vocab()
    code_tokens = {vocab[image_code_token(code)] for code in range(256)}
    assert set(tokens[0].tolist()) <= code_tokens
    assert len(set(tokens[0].tolist())) > 8  # a grid image is not one code
    # the same ids the model's own Chameleon path produces
    pixels = family.image_inputs([Image.open(io.BytesIO(rows[0]["images"][0]))])["pixel_values"]
    assert torch.equal(tokens, family.model.model.get_image_tokens(pixels).long())

    batch = family.collate([family.encode(rows[0])])
    embeds = family.embed(batch)
    slots = batch["input_ids"][0] == family.image_token_id
    torch.testing.assert_close(embeds[0, slots], family.model.get_input_embeddings()(tokens[0]))
    with pytest.raises(ValueError, match="placeholders"):
        family.embed(dict(batch, pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1)))


def test_anole_codebook_fitted_to_images_quantises_them_closer_and_survives_save(tmp_path):
    """k-means on the encoder's latents: the fitted codebook leaves less of their variance than the
    random one (a random codebook is no better than the latents' mean), uses more codes on these
    images, and is what a reloaded checkpoint quantises with."""
    images = [png_bytes for i in range(6) for task in ("maze", "frozenlake")
              for png_bytes in generate_example(TASKS[task], 3, "train", i, 0, FRACTIONS, RenderOptions()).get("images")]
    family = load_backbone("tiny-anole", build_tiny("tiny-anole", tmp_path / "m"))
    random_codes = family.image_token_ids(images)
    kept = family.drawn_images(images)  # drawn_images keeps each image's codes; a fitted codebook forgets them
    assert [run[1:-1] for run in kept] == random_codes.tolist()
    family.image_token_ids = lambda ims: pytest.fail(f"{len(list(ims))} kept images encoded again")
    assert family.drawn_images(images) == kept
    del family.image_token_ids
    stats = family.fit_codebook(images, iters=10)
    assert stats["residual_after"] < 0.8 * stats["residual_before"] and stats["residual_before"] > 0.9
    fitted_codes = family.image_token_ids(images)
    assert len(set(fitted_codes.flatten().tolist())) > len(set(random_codes.flatten().tolist()))
    assert [run[1:-1] for run in family.drawn_images(images)] == fitted_codes.tolist()
    family.save(tmp_path / "m")
    assert torch.equal(load_backbone("tiny-anole", tmp_path / "m").image_token_ids(images), fitted_codes)


def test_anole_tokenizer_training_reconstructs_images_and_changes_only_the_vq_encoder(tmp_path):
    """VQ-VAE training of the tiny-anole's encoder + codebook (with a decoder that is then dropped):
    reconstruction error falls well below where it starts, the transformer is untouched, the VQ-VAE
    is frozen again afterwards, kept drawing codes are forgotten, and a saved checkpoint holds the
    trained encoder and no decoder."""
    images = [png_bytes for i in range(6) for task in ("maze", "frozenlake")
              for png_bytes in generate_example(TASKS[task], 3, "train", i, 0, FRACTIONS, RenderOptions()).get("images")]
    family = load_backbone("tiny-anole", build_tiny("tiny-anole", tmp_path / "m"))
    family.fit_codebook(images, iters=5)
    before = {k: v.clone() for k, v in family.model.state_dict().items()}
    family.drawn_images(images)
    stats = family.train_tokenizer(images, steps=60, batch=8, lr=2e-3)
    assert stats["mse_last"] < 0.5 * stats["mse_first"], stats
    after = family.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.vqmodel.") for k in changed), sorted(changed)[:5]
    assert any(".encoder." in k for k in changed) and "model.vqmodel.quantize.embedding.weight" in changed
    assert not family.model.model.vqmodel.training
    assert not any(p.requires_grad for p in family.model.model.vqmodel.parameters())
    assert family._drawn_codes == {}
    codes = family.image_token_ids(images)
    family.save(tmp_path / "m")
    reloaded = load_backbone("tiny-anole", tmp_path / "m")
    assert torch.equal(reloaded.image_token_ids(images), codes)
    assert set(reloaded.model.state_dict()) == set(before)


def test_anole_decodes_drawings_as_image_spans_of_exactly_its_codes():
    """`ImageSpanRule`: outside an image no code and no `<eoss>`; after `<racm3:break>` codes only,
    exactly `codes_per_image`, then `<eoss>` and nothing else. Each step both rows' logits favour
    one token (10) over the rest (−id: token 0 is the best one left when the favourite is refused)."""
    from mmreason.models.anole import ImageSpanRule

    start, end, text, eos = 1, 2, 3, 4
    rule = ImageSpanRule(2, start, end, torch.tensor([5, 6, 7]), codes_per_image=2)
    picks = []
    for favoured in [(5, start), (end, 5), (start, text), (eos, end), (text, 6), (text, 7), (text, start)]:
        logits = -torch.arange(8.0).repeat(2, 1)
        logits[[0, 1], list(favoured)] = 10.0
        token = rule.allow(logits).argmax(-1)
        picks.append(token.tolist())
        rule.step(token)
    assert [p[0] for p in picks] == [0, 0, start, 5, 5, end, text]  # code, <eoss> refused outside; eos, text inside; <eoss> forced
    assert [p[1] for p in picks] == [start, 5, 5, end, 0, 0, start]  # text refused inside; codes refused once closed


def spans(reply: list[int], start: int, end: int, codes: set[int]) -> tuple[list[int], int]:
    """(codes in each image span of `reply`, codes outside any span)."""
    lengths, outside, inside = [], 0, None
    for t in reply:
        if t == start:
            inside = 0
        elif t == end and inside is not None:
            lengths.append(inside)
            inside = None
        elif t in codes:
            if inside is None:
                outside += 1
            else:
                inside += 1
    return lengths, outside


def test_decode_follows_the_familys_decoding_rule(tiny_dir, rows):
    """`coconut.decode` (the cached loop every evaluation uses) and the uncached reference both obey
    the family's rule: with `<racm3:break>` replaced by whatever the random model says first, the
    reply opens an image there, holds exactly its codes, closes it, and draws no code outside one."""
    from mmreason.latent.coconut import GenerationSettings, generate, generate_uncached
    from mmreason.models.anole import ImageSpanRule

    family = load_backbone("tiny-anole", tiny_dir("tiny-anole"))
    batch = family.collate([family.encode(rows[0], with_target=False)], pad_side="left")
    first = generate(family, batch, 0, GenerationSettings(max_new_tokens=1))[0][0]
    family.decoding_rule = lambda b: ImageSpanRule(b, first, family.image_end_id, family.code_token_ids, 5)
    codes = set(family.code_token_ids.tolist())
    cached = generate(family, batch, 0, GenerationSettings(max_new_tokens=20))[0]
    lengths, outside = spans(cached, first, family.image_end_id, codes)
    assert cached[0] == first and lengths and all(n == 5 for n in lengths) and outside == 0, cached
    assert generate_uncached(family, batch, 0, 20) == cached


def test_anole_learns_image_tokens_in_labels(tiny_dir, rows):
    """MVoT's visual thoughts: step-image codes in the labels give a normal loss (Chameleon's stock
    forward masks image logits to -inf-ish, which would make it ~1e38)."""
    family = load_backbone("tiny-anole", tiny_dir("tiny-anole"))
    row = rows[0]
    prompt = family.prompt_ids(row["prompt"])
    thought = [family.image_start_id, *family.image_token_ids(row["step_images"][:1])[0].tolist(),
               family.image_end_id]
    ids = torch.tensor([prompt + thought])
    labels = torch.tensor([[IGNORE] * len(prompt) + thought])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             **family.image_inputs([Image.open(io.BytesIO(row["images"][0]))])}
    out = forward(family, batch, labels=labels)
    assert torch.isfinite(out.loss) and out.loss < 20
    discrepancy = family.visual_token_discrepancy(out.logits, labels)
    assert torch.isfinite(discrepancy) and discrepancy > 0
    (out.loss + discrepancy).backward()
    assert family.model.lm_head.weight.grad.abs().sum() > 0

    family.model.suppress_image_tokens = True
    with torch.no_grad():
        assert forward(family, batch, labels=labels).loss > 1e30


def test_a_tokenizer_without_coconut_tokens_gets_them_on_load(tmp_path, monkeypatch, rows):
    """Real checkpoints' tokenizers have no `<|latent|>` & co.: loading adds them as special tokens,
    grows the embeddings, starts the new rows as copies of the eos row (no `<<` token here), and a
    CoCoNuT forward then runs; the export keeps them."""
    from mmreason.latent.coconut import latent_forward
    from mmreason.models import ensure_latent_tokens, tiny_corpus
    from mmreason.models import tokenizer as tok_module
    from mmreason.models.internvl import InternVLFamily

    latents = (tok_module.START_LATENT, tok_module.LATENT, tok_module.END_LATENT)
    monkeypatch.setattr(tok_module, "SPECIAL_TOKENS", [t for t in tok_module.SPECIAL_TOKENS if t not in latents])
    spec = get_spec("tiny-internvl")
    tokenizer = tok_module.build_word_tokenizer(tiny_corpus(), extra_special=InternVLFamily.extra_tokens,
                                                named=spec.named_tokens)
    assert not set(latents) & set(tokenizer.get_vocab())
    config = spec.tiny_config(tokenizer)
    model = spec.family.model_class(config)
    before = model.get_input_embeddings().weight.shape[0]
    model.save_pretrained(tmp_path / "m")
    spec.tiny_processor(tokenizer, config).save_pretrained(tmp_path / "m")

    family = load_backbone("tiny-internvl", tmp_path / "m")
    ids = family.tokenizer.convert_tokens_to_ids(list(latents))
    assert sorted(ids) == list(range(before, before + 3))
    assert [family.start_latent_id, family.latent_id, family.end_latent_id] == ids
    table = family.model.get_input_embeddings().weight
    assert table.shape[0] == before + 3
    eos = family.tokenizer.eos_token_id
    assert all(torch.equal(table[i], table[eos]) for i in ids)
    batch = family.collate([family.encode(rows[0], "latent", n_latent_steps=1)], align_latents=True)
    loss, _ = latent_forward(family, batch)
    assert torch.isfinite(loss)
    assert ensure_latent_tokens(family.model, family.tokenizer) == []  # idempotent
    family.save(tmp_path / "export")
    again = load_backbone("tiny-internvl", tmp_path / "export")
    assert again.tokenizer.convert_tokens_to_ids(list(latents)) == ids


def test_visual_thoughts_interleave_each_steps_drawn_state_in_the_targets(tiny_dir, rows):
    """MVoT layout: step text, then the state it reaches as `<racm3:break>` codes `<eoss>` (all in the
    labels); a step image that is the prompt image again is not drawn; latents drop their steps'
    images too; a family that cannot write images says so."""
    family = load_backbone("tiny-anole", tiny_dir("tiny-anole"))
    row = rows[0]
    steps, pictures = row["steps"], row["step_images"]
    assert len(pictures) == len(steps) and pictures[0] == row["images"][0]  # the transcription looks at the prompt
    plain = family.encode(row)
    drawn = family.encode(row, visual_thoughts=True)
    assert drawn.input_ids[: drawn.prompt_len] == plain.input_ids[: plain.prompt_len]
    target = drawn.input_ids[drawn.prompt_len:]
    assert drawn.labels[drawn.prompt_len:] == target and set(drawn.labels[: drawn.prompt_len]) == {IGNORE}
    runs = family.drawn_images(pictures[1:])
    assert len(target) == len(plain.input_ids) - plain.prompt_len + sum(len(r) for r in runs)
    starts = [i for i, t in enumerate(target) if t == family.image_start_id]
    assert len(starts) == len(steps) - 1  # every step but the transcription draws its state
    for start, run in zip(starts, runs):
        assert target[start:start + len(run)] == run and len(run) == family.codes_per_image + 2
    # the image comes right after its step's text
    text_of = family.tokenizer.decode(target[: starts[0]]).replace(" ", "").replace("\n", "")
    assert text_of == (steps[0] + steps[1]).replace(" ", "")
    latent = family.encode(row, "latent", n_latent_steps=2, visual_thoughts=True)
    assert latent.input_ids.count(family.image_start_id) - plain.input_ids.count(family.image_start_id) \
        == len(steps) - 2
    vanilla = family.encode(row, "vanilla", visual_thoughts=True)
    assert vanilla.input_ids == family.encode(row, "vanilla").input_ids
    internvl = load_backbone("tiny-internvl", tiny_dir("tiny-internvl"))
    with pytest.raises(ValueError, match="internvl family reads images but cannot write them"):
        internvl.encode(row, visual_thoughts=True)


def test_a_reply_that_goes_on_after_its_answer_is_trained_through_to_eos(tiny_dir):
    """A row whose meta holds `after_answer` (a re-check behind the answer) is trained as steps,
    answer, that text, eos — in cot, latent and visual-thought targets, not in vanilla ones — and
    the reply still reads as its answer."""
    opts = RenderOptions(image_size=64, step_images=True, recheck=1.0, recheck_after_answer=True)
    row = generate_example(TASKS["maze"], 3, "train", 3, 0, FRACTIONS, opts)
    plain_row = {**row, "meta": "{}"}
    tail = "Check: " + " ".join(row["steps"])
    for name in ("tiny-internvl", "tiny-anole"):
        family = load_backbone(name, tiny_dir(name))
        tok = family.tokenizer
        for target, kwargs in (("cot", {}), ("latent", {"n_latent_steps": 1}), ("vanilla", {})):
            visual = {"visual_thoughts": True} if name == "tiny-anole" and target != "vanilla" else {}
            enc, plain = family.encode(row, target, **kwargs, **visual), family.encode(plain_row, target, **kwargs, **visual)
            extra = tok(tail)["input_ids"] if target != "vanilla" else []
            extra = [i for i in extra if i != tok.bos_token_id]
            assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
            if target == "vanilla":
                assert enc.input_ids == plain.input_ids
                continue
            # the plain reply up to its answer, then "\n" + the re-check, all labelled
            assert enc.input_ids[: len(plain.input_ids) - 1] == plain.input_ids[:-1]
            added = enc.input_ids[len(plain.input_ids) - 1:-1]
            assert enc.labels[len(plain.input_ids) - 1:] == enc.input_ids[len(plain.input_ids) - 1:]
            text = tok.decode(added, skip_special_tokens=True)
            assert text.split() == tail.split() and added[-len(extra):] == extra
            assert parse_answer(tok.decode(enc.input_ids[enc.prompt_len:], skip_special_tokens=True)) == row["answer"]


def test_visual_token_discrepancy_is_expected_codebook_distance():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # mean sq. distance = (i-j)²/2
    code_ids = torch.tensor([10, 11, 12, 13])
    labels = torch.tensor([[IGNORE, 10, 5]])  # position 0 predicts code 0; position 1 predicts a text token

    def loss_with_mass_on(token: int) -> torch.Tensor:
        logits = torch.zeros(1, 3, 16)
        logits[0, 0, token] = 60.0
        logits[0, 1, 3] = 60.0  # a text position: not part of the loss, whatever it predicts
        return visual_token_discrepancy(logits, labels, codebook, code_ids)

    losses = [float(loss_with_mass_on(10 + j)) for j in range(4)]
    assert losses[0] < 1e-6
    assert losses == sorted(losses) and len(set(losses)) == 4
    assert losses == pytest.approx([j * j / 2 for j in range(4)], abs=1e-5)
    # only image-token logits enter the softmax: mass on a text token leaves the uniform average
    assert float(loss_with_mass_on(3)) == pytest.approx(sum(j * j / 2 for j in range(4)) / 4, abs=1e-5)
    # uniform logits: the mean distance; gradient reaches the logits
    logits = torch.zeros(1, 3, 16, requires_grad=True)
    loss = visual_token_discrepancy(logits, labels, codebook, code_ids)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(3.5 / 2, abs=1e-6) and logits.grad[0, 0, 13] > 0
    # no image labels: zero, still differentiable
    zero = visual_token_discrepancy(logits, torch.tensor([[IGNORE, 5, 6]]), codebook, code_ids)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


# --- Phi-4-MM: the vision encoder sees every patch ------------------------------------------------


def test_phi4mm_vision_encoder_is_bidirectional(tiny_dir):
    family = load_backbone("tiny-phi4mm", tiny_dir("tiny-phi4mm"))
    family.model.eval()
    assert family.tokens_per_image == 41 and len(family.image_run()) == 41
    assert family.model.config.vision_config._attn_implementation == "sdpa"
    image_embed = family.model.model.embed_tokens_extend.image_embed
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    changed = pixels.clone()
    changed[..., 56:, 56:] = -changed[..., 56:, 56:]  # the last 8×8 patch only

    def first_feature_moves() -> bool:
        with torch.no_grad():
            a, b = image_embed.get_img_features(pixels), image_embed.get_img_features(changed)
        return bool((a[0, 0] - b[0, 0]).abs().max() > 1e-5)

    assert first_feature_moves()  # the first pooled feature sees the last patch
    try:  # the transformers default it replaces: causal, so the first patch is blind to the last
        for module in image_embed.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = True
        assert not first_feature_moves()
    finally:
        assert make_vision_bidirectional(family.model) == 2
    assert first_feature_moves()


def test_tiny_tokenizer_knows_every_word_of_generated_thoughts_recheck_included(tiny_dir):
    """The tiny vocabulary is read off generated text: rows it never saw (other seeds and indices),
    re-checks included (`recheck`, `restate` data), encode with no unknown token."""
    tok = AutoTokenizer.from_pretrained(tiny_dir("tiny-internvl"))
    opts = RenderOptions(image_size=64, step_images=False, recheck=1.0, restate=1.0)
    for task in TASKS.values():
        for size in (task.sizes.start, task.sizes.stop - 1):
            for index in range(200, 210):
                row = generate_example(task, size, "train", index, 7, FRACTIONS, opts)
                assert row["steps"][-1].startswith("Check: ") and " Check: " in row["steps"][0]
                text = "\n".join([row["prompt"], *row["steps"], *row["choices"]])
                ids = tok(text)["input_ids"]
                assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
