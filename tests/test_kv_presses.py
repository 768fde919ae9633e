"""Every press on every tiny family: a budget of "everything" changes nothing (greedy tokens and
logits, on the CoCoNuT generation path and HF `generate`); TOVA keeps exactly the top-scored
entries at every step; DARE's masks hit their targets; hooks are gone after the `with`."""

from __future__ import annotations

import pytest
import torch

from mmreason.kv import CosrePress, DarePress, HicoPress, TovaPress, make_press
from mmreason.kv.base import Press
from mmreason.kv.dare import (
    DareRouter,
    future_importance,
    gumbel_keep,
    ratio_loss,
    straight_through_topk,
    target_count,
    topk_keep,
)
from mmreason.kv.modality import TEXT, VISION
from mmreason.latent.coconut import GenerationSettings, generate
from tests.kv_helpers import FAMILIES, batch_of, forced, one_thread, prefill, rows, tiny_family  # noqa: F401

EVERYTHING = {
    "tova": lambda: TovaPress(cache_size=10**6),
    "dare": lambda: DarePress(rho_text=1.0, rho_vis=1.0),
    "cosre": lambda: CosrePress(block=4, keep_h=4, keep_w=4, base_delta=0.0),
    "hico": lambda: HicoPress(tokens_per_frame=10**6, drop_from_layer=0, drop_keep=1.0),
    "kvpress:knorm": lambda: make_press("kvpress:knorm", {"compression_ratio": 0.0}),
}


def hf_generate(fam, batch, n=5):
    kw = {k: v for k, v in batch.items() if k != "labels"}
    # a random Phi-4 may "write" an image token, which its HF forward then tries to embed as an image
    suppress = [fam.image_token_id] if fam.name == "phi4mm" else None
    out = fam.model.generate(**kw, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
                             suppress_tokens=suppress)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_a_budget_of_everything_gives_outputs_identical_to_no_press(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    settings = GenerationSettings(max_new_tokens=6)
    ref_tokens = generate(fam, batch, 0, settings)
    ref_seq, ref_logits = hf_generate(fam, batch)
    for name, make in EVERYTHING.items():
        # the full compress path (nothing dropped), and on one family the "keeps everything" shortcut
        variants = (forced(make()), make()) if family_name == FAMILIES[0] else (forced(make()),)
        for press in variants:
            with press(fam):
                tokens = generate(fam, batch, 0, settings)
                seq, logits = hf_generate(fam, batch)
            assert tokens == ref_tokens, name
            assert torch.equal(seq, ref_seq), name
            if name == "cosre" and not press.keeps_everything():
                # a real DCT round trip and re-rotation: equal to float precision, not bit for bit
                assert torch.allclose(logits, ref_logits, atol=1e-4), name
            else:
                assert torch.equal(logits, ref_logits), name


@pytest.mark.parametrize("family_name", FAMILIES)
def test_attention_over_the_press_state_matches_the_models_own_mask(family_name):
    """A press that rewrites the cache unchanged switches attention to the session's mask (valid ∧
    causal, left padding included): the answers must not move."""

    class Rewrite(Press):
        def compress(self, call):
            if call.prefill:
                call.replace(call.keys, call.values, call.state)

    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    settings = GenerationSettings(max_new_tokens=8)
    ref = generate(fam, batch, 0, settings)
    with Rewrite()(fam) as session:
        assert generate(fam, batch, 0, settings) == ref
        assert session.compressed
        # the modality of every prompt token came off the token ids
        n_image = (session.prompt_modality == VISION).sum(1)
        assert n_image.tolist() == [session.spec.tokens_per_image] * len(rows())  # one image per prompt


def test_hooks_and_attention_implementation_are_restored_after_the_with():
    fam = tiny_family("tiny-internvl")
    decoder = fam.model.get_decoder()
    impl = decoder.config._attn_implementation
    counts = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in fam.model.modules()]
    with TovaPress(cache_size=8)(fam):
        assert decoder.config._attn_implementation.startswith("mmreason_press_")
    assert decoder.config._attn_implementation == impl
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in fam.model.modules()] == counts
    assert not any(hasattr(m, "_mmreason_session") for m in fam.model.modules())


def _reference_attention(fam, batch):
    """Per layer (B, H_q, L) attention of the last prompt token, from the model itself (eager)."""
    config = fam.model.get_decoder().config
    embeds = fam.embed(batch)
    config._attn_implementation_internal = "eager"  # the decoder only (the vision tower stays as it is)
    try:
        mask = batch["attention_mask"]
        out = fam.model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    finally:
        config._attn_implementation_internal = "sdpa"
    return [a[:, :, -1] for a in out.attentions]


# (not tiny-phi4mm: after a forward with output_attentions=True its vision tower stops returning hidden
# states in transformers 5.23, which would break the later tests sharing the model)
@pytest.mark.parametrize("family_name", ["tiny-internvl", "tiny-anole"])
def test_tova_keeps_exactly_the_top_scored_positions_in_original_order(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    size = 24
    attention = _reference_attention(fam, batch)
    with torch.no_grad(), TovaPress(cache_size=size)(fam) as session:
        prefill(fam, batch)
        for layer, attn in enumerate(attention):
            st = session.states[layer]
            scores = attn.mean(1).masked_fill(~batch["attention_mask"].bool(), -1.0)
            expected = scores.topk(size, dim=-1).indices.sort(-1).values
            assert st.length == size
            for h in range(st.col.shape[1]):  # same entries in every head, in original order
                assert torch.equal(st.col[:, h], expected)
            assert bool(st.valid.all())


def test_tova_holds_its_budget_at_every_decode_step_and_sizes_dynamically():
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, rows())
    sizes = []
    press = TovaPress(cache_size=20)
    with press(fam) as session:
        hook = fam.model.register_forward_hook(lambda *a: sizes.append([s.length for s in session.states.values()]))
        generate(fam, batch, 0, GenerationSettings(max_new_tokens=6))
        hook.remove()
    assert len(sizes) >= 2 and all(s == [20, 20] for s in sizes)
    # dynamic: clamp(factor × length, min, max) of the valid tokens of each row
    press = TovaPress(factor=0.5, min_size=4, max_size=40)
    lengths = batch["attention_mask"].sum(1)
    with press(fam) as session, torch.no_grad():
        prefill(fam, batch)
        kept = session.states[0].valid[:, 0].sum(-1)
    assert kept.tolist() == torch.clamp(torch.round(lengths * 0.5).long(), 4, 40).tolist()


def test_tova_vision_budget_and_importance_mixing():
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, rows())
    with TovaPress(factor=0.6, vision_factor=0.25, entropy_weight=0.3, recency_weight=0.2)(fam) as session:
        with torch.no_grad():
            prefill(fam, batch)
        st = session.states[1]
        n_vis = session.seen_by_mod[:, VISION]
        kept_vis = ((st.mod[:, 0] == VISION) & st.valid[:, 0]).sum(-1)
        assert kept_vis.tolist() == torch.round(n_vis * 0.25).long().tolist()
        total = st.valid[:, 0].sum(-1)
        assert total.tolist() == torch.round(session.seen_by_mod.sum(1) * 0.6).long().tolist()


def test_dare_inference_masks_hit_the_targets_exactly():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    modality = (torch.rand(4, 50) < 0.4).to(torch.int8)
    valid = torch.rand(4, 50) < 0.9
    for rho_text, rho_vis in [(0.7, 0.4), (0.5, 0.25), (1.0, 0.1)]:
        keep = topk_keep(logits, modality, valid, rho_text, rho_vis)
        assert not bool((keep & ~valid).any())
        for m, rho in ((TEXT, rho_text), (VISION, rho_vis)):
            member = valid & (modality == m)
            assert (keep & member).sum(-1).tolist() == target_count(rho, member.sum(-1)).tolist()
            # the kept ones are the highest logits of their modality
            for b in range(4):
                kept = logits[b][keep[b] & member[b]]
                dropped = logits[b][~keep[b] & member[b]]
                if kept.numel() and dropped.numel():
                    assert kept.min() > dropped.max()
        st = straight_through_topk(logits.requires_grad_(), modality, valid, rho_text, rho_vis)
        assert torch.equal(st.detach(), keep.float())
        st.sum().backward()
        assert logits.grad is not None and bool((logits.grad != 0).any())
        logits.grad = None


def test_gumbel_masks_are_hard_zero_one_with_gradients_and_the_ratio_loss_pulls_to_targets():
    torch.manual_seed(0)
    logits = torch.randn(3, 40, requires_grad=True)
    keep = gumbel_keep(logits, tau=0.5)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    (keep * torch.arange(40.0)).sum().backward()
    assert logits.grad is not None and bool((logits.grad != 0).any())
    modality = torch.zeros(3, 40, dtype=torch.int8)
    modality[:, :10] = VISION
    valid = torch.ones(3, 40, dtype=torch.bool)
    hand = torch.zeros(3, 40)
    hand[:, :5] = 1.0  # vision rate 0.5
    hand[:, 10:25] = 1.0  # text rate 0.5
    assert ratio_loss(hand, modality, valid, 0.7, 0.4).item() == pytest.approx((0.5 - 0.7) ** 2 + (0.5 - 0.4) ** 2)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_dare_prunes_from_its_layer_to_the_per_modality_targets(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    press = DarePress(rho_text=0.5, rho_vis=0.25, layer=1)
    with press(fam) as session, torch.no_grad():
        prefill(fam, batch)
        seen = session.seen_by_mod
        first, second = session.states[0], session.states[1]
        assert bool(first.valid[:, 0].sum(-1).eq(batch["attention_mask"].sum(1)).all())  # layer 0 untouched
        for m, rho in ((TEXT, 0.5), (VISION, 0.25)):
            kept = ((second.mod[:, 0] == m) & second.valid[:, 0]).sum(-1)
            assert kept.tolist() == target_count(rho, seen[:, m]).tolist()


def test_dare_training_forward_masks_attention_and_trains_the_router():
    from mmreason.latent.coconut import latent_forward

    fam = tiny_family("tiny-internvl")
    batch = fam.collate([fam.encode(r, "cot") for r in rows()])
    router = DareRouter(fam.model.config.text_config.hidden_size)
    press = DarePress(rho_text=0.7, rho_vis=0.4, layer=1)
    press.router = router.train()
    with press(fam):
        loss, _ = latent_forward(fam, batch)
        reg = press.ratio_loss()
    (loss + reg).backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    fam.model.zero_grad()
    router.eval()


def test_dare_topk_training_masks_keep_what_inference_keeps_and_train_the_router():
    from mmreason.config import ConfigError
    from mmreason.latent.coconut import latent_forward

    fam = tiny_family("tiny-internvl")
    batch = fam.collate([fam.encode(r, "cot") for r in rows()])
    torch.manual_seed(0)
    router = DareRouter(fam.model.config.text_config.hidden_size)
    press = DarePress(rho_text=0.4, rho_vis=0.75, layer=1, train_masks="topk")
    press.router = router.train()
    with press(fam):
        loss, _ = latent_forward(fam, batch)
        (keep, modality, valid), = press.masks
        reg = press.ratio_loss()
    # exactly round(ρ·n) per row and modality — the top-k inference keeps — so no ratio loss to speak of
    hard = keep.detach().round()
    assert torch.allclose(keep.detach(), hard, atol=1e-6)
    for m, rho in ((TEXT, 0.4), (VISION, 0.75)):
        member = valid & (modality == m)
        assert (hard.bool() & member).sum(-1).tolist() == target_count(rho, member.sum(-1)).tolist()
    assert float(reg) < 1e-3  # only the rounding of ρ·n
    loss.backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    fam.model.zero_grad()
    router.eval()
    with pytest.raises(ConfigError, match="train_masks"):
        DarePress(train_masks="softmax")


def test_dare_from_a_config_needs_a_trained_router_and_loads_it(tmp_path):
    """A config (`make_press`) without `router_path` is refused naming it; a missing file too; a
    saved router is loaded in eval mode. `pending` (a router a stage is about to train) passes."""
    from mmreason.config import ConfigError
    from mmreason.kv.dare import save_router

    for settings in ({"rho_text": 0.5}, {"rho_text": 0.5, "router_path": None}, {"router_path": ""}):
        with pytest.raises(ConfigError, match="press.router_path: press 'dare' needs it .* untrained, random router"):
            make_press("dare", settings)
    with pytest.raises(ConfigError, match=f"router_path: no router file at {tmp_path / 'nope.pt'}"):
        make_press("dare", {"router_path": str(tmp_path / "nope.pt")})
    with pytest.raises(ConfigError, match="rho_text"):  # a bad value is named first, as for every press
        make_press("dare", {"rho_text": 1.5})
    router = DareRouter(8, width=4, context=2)
    save_router(router, tmp_path / "router.pt")
    press = make_press("dare", {"rho_text": 0.5, "router_path": str(tmp_path / "router.pt")})
    assert press.router.context == 2 and not press.router.training
    assert all(torch.equal(a, b) for a, b in zip(press.router.parameters(), router.parameters()))
    assert make_press("dare", {"rho_vis": 0.5}, pending={"router_path"}).router is None


@pytest.mark.parametrize("family_name", ["tiny-internvl", "tiny-anole"])
@pytest.mark.parametrize("make", [lambda: TovaPress(cache_size=20), lambda: TovaPress(factor=0.5, min_size=4),
                                  lambda: DarePress(rho_text=0.25, rho_vis=0.25, layer=0),
                                  lambda: DarePress(rho_text=0.25, rho_vis=0.25, layer=0, window=4, router_context=2)],
                         ids=["tova-fixed", "tova-dynamic", "dare", "dare-window-context"])
def test_the_decode_step_eviction_keeps_what_full_selection_keeps(family_name, make, monkeypatch):
    """`drop_lowest`/`evict` (one entry out per step, moved-last-into-slot) against the full
    top-budget selection at every step: the same tokens, and per layer the same cached entries."""
    from mmreason.kv.base import LayerCall

    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    settings = GenerationSettings(max_new_tokens=8)
    evicted = []

    def kept(session):
        return {layer: [sorted(st.col[b, 0][st.valid[b, 0]].tolist()) for b in range(st.col.shape[0])]
                for layer, st in session.states.items()}

    torch.manual_seed(0)
    press = make()  # one press for both runs: an untrained DARE router is drawn at random once
    real_evict = LayerCall.evict
    monkeypatch.setattr(LayerCall, "evict", lambda call, index: (evicted.append(index), real_evict(call, index))[1])
    with torch.no_grad(), press(fam) as session:
        tokens = generate(fam, batch, 0, settings)
        entries = kept(session)
        steps, layers = session.forward_index, len(session.states)
    monkeypatch.setattr(LayerCall, "drop_lowest", lambda call, scores, budgets: False)
    with torch.no_grad(), press(fam) as session:
        assert generate(fam, batch, 0, settings) == tokens
        assert kept(session) == entries
    if isinstance(press, TovaPress) and press.cache_size:  # every row over by one at every step
        assert steps >= 7 and len(evicted) == steps * layers
    elif isinstance(press, DarePress) and family_name == "tiny-internvl":  # at steps where no row's text budget grew
        # (a random tiny Anole writes image tokens at some steps: then two modalities are over)
        assert evicted


@pytest.mark.parametrize("window,context", [(0, 1), (6, 3)])
def test_dare_decode_training_masks_replay_what_inference_keeps(window, context):
    """`train_masks="decode"`: for a row teacher-forced on the tokens DARE itself generated, every
    query sees exactly the entries the inference press had cached at that step — with a recent
    window and a router that reads the tokens before each one too."""
    from mmreason.latent.coconut import latent_forward
    from mmreason.models.base import IGNORE
    from mmreason.train.stages.dare import set_batch

    fam = tiny_family("tiny-internvl")
    row = rows()[0]
    batch = batch_of(fam, [row])
    prompt = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    press = DarePress(rho_text=0.4, rho_vis=0.75, layer=0, train_masks="decode", window=window)
    press.router = DareRouter(fam.model.config.text_config.hidden_size, context=context).eval()
    cached = []  # the cache's columns after each forward (prompt, then one per decode step)
    with torch.no_grad(), press(fam) as session:
        hook = fam.model.register_forward_hook(lambda *a: cached.append(
            set(session.states[0].col[0, 0][session.states[0].valid[0, 0]].tolist())))
        tokens = generate(fam, batch, 0, GenerationSettings(max_new_tokens=24))[0]
        hook.remove()
    assert len(tokens) >= 12 and len(cached) >= len(tokens)

    ids = torch.cat([batch["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
    forced = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids),
                  labels=torch.cat([torch.full((1, prompt), IGNORE), torch.tensor([tokens[:-1]])], dim=1))
    press.router.train()
    set_batch(press, forced)
    assert press.prompt_lengths.tolist() == [prompt]
    with torch.no_grad(), press(fam) as session:
        latent_forward(fam, forced)
        visible = session.forward_scratch["dare_visible"][0].bool()
    press.router.eval()
    for step in range(len(tokens) - 1):  # the query fed after forward `step` sees what that forward left
        query = prompt + step
        assert set(visible[query].nonzero().flatten().tolist()) - {query} == cached[step], step
    # and the prompt's queries see every earlier prompt token
    assert bool(visible[:prompt, :prompt].equal(torch.ones(prompt, prompt).tril().bool()))
    if window:  # the latest `window` tokens stay, whatever the router thinks of them
        for step in range(len(tokens) - 1):
            assert set(range(prompt + step - window, prompt + step)) <= cached[step], step  # forward `step` saw prompt + step


def test_dare_router_context_reads_the_tokens_before_and_carries_them_across_calls():
    torch.manual_seed(0)
    router = DareRouter(16, width=8, context=3).eval()
    h = torch.randn(1, 7, 16)
    text = torch.zeros(1, 7, dtype=torch.int8)
    with torch.no_grad():
        whole = router(h, text)
        past, parts = None, []
        for lo, hi in ((0, 4), (4, 5), (5, 7)):  # a prompt, then decode steps
            parts.append(router(h[:, lo:hi], text[:, lo:hi], None, past))
            past = router.tail(h[:, lo:hi], None, past)
        assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-6)
        moved = h.clone()
        moved[:, 2] += 1.0  # token 2 is inside the window of tokens 2, 3, 4 only
        changed = (router(moved, text) - whole).abs()[0] > 1e-6
        assert changed.tolist() == [False, False, True, True, True, False, False]
        # left padding reads as zeros: a padded row scores its tokens as the unpadded row does
        padded = torch.cat([torch.randn(1, 2, 16), h], 1)
        valid = torch.tensor([[False, False] + [True] * 7])
        assert torch.allclose(router(padded, torch.zeros(1, 9, dtype=torch.int8), valid)[:, 2:], whole, atol=1e-6)
    assert DareRouter(16).tail(h) is None
    with pytest.raises(Exception, match="router_context must be >= 1"):
        DareRouter(16, context=0)


def test_future_importance_counts_only_queries_that_come_after_the_prompt_and_the_window():
    # one head, 5 tokens, prompt of 2: key j's importance is the largest attention a query q >= 2
    # with q - j >= window pays it
    probs = torch.tensor([[1.0, 0, 0, 0, 0],
                          [0.5, 0.5, 0, 0, 0],
                          [0.2, 0.7, 0.1, 0, 0],
                          [0.1, 0.1, 0.6, 0.2, 0],
                          [0.4, 0.1, 0.1, 0.3, 0.1]])[None, None]
    prompt = torch.tensor([2])
    assert future_importance(probs, prompt, 0).tolist() == [[0.4000000059604645, 0.699999988079071,
                                                             0.6000000238418579, 0.30000001192092896, 0.0]]
    assert future_importance(probs, prompt, 2).tolist()[0] == pytest.approx([0.4, 0.1, 0.1, 0.0, 0.0])
    # padding queries (the last, here) pay no attention that counts
    valid = torch.tensor([[True, True, True, True, False]])
    assert future_importance(probs, prompt, 0, valid).tolist()[0] == pytest.approx([0.2, 0.7, 0.6, 0.0, 0.0])
    # two heads are averaged before the max
    two = torch.cat([probs, torch.zeros_like(probs)], 1)
    assert future_importance(two, prompt, 0).tolist()[0] == pytest.approx([0.2, 0.35, 0.3, 0.15, 0.0])


def test_dare_importance_loss_fits_the_router_to_what_later_queries_attend():
    from mmreason.latent.coconut import latent_forward
    from mmreason.train.stages.dare import set_batch

    fam = tiny_family("tiny-internvl")
    batch = fam.collate([fam.encode(r, "cot") for r in rows()])
    torch.manual_seed(0)
    press = DarePress(rho_text=0.5, rho_vis=0.5, layer=0, train_masks="decode", window=4, learn_importance=True)
    press.router = DareRouter(fam.model.config.text_config.hidden_size, context=2).train()
    optim = torch.optim.SGD(press.router.parameters(), lr=0.05)
    fam.model.requires_grad_(False)
    losses = []
    try:
        with press(fam):
            for _ in range(15):
                set_batch(press, batch)
                latent_forward(fam, batch)
                (_, importance, valid), = press.importance
                loss = press.importance_loss()
                press.pop_masks()
                optim.zero_grad()
                loss.backward()
                optim.step()
                losses.append(float(loss))
    finally:
        fam.model.requires_grad_(True)
        press.router.eval()
    # nothing after a row's last `window` tokens can attend to them from outside the window
    last = valid.long().cumsum(1).argmax(1)
    for b in range(valid.shape[0]):
        assert importance[b, last[b] - 3 : last[b] + 1].eq(0).all()
    assert bool(importance[valid].gt(0).any()) and float(importance.max()) <= 1.0
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(RuntimeError, match="no importance recorded"):
        press.importance_loss()
