"""KV accounting against a hand count of tensor bytes, and kvpress baselines on our backbones."""

from __future__ import annotations

import pytest
import torch

from mmreason.config import ConfigError
from mmreason.kv import KVMeter, TovaPress, make_press
from mmreason.kv.modality import TEXT, VISION
from mmreason.latent.coconut import GenerationSettings, generate
from tests.kv_helpers import FAMILIES, batch_of, one_thread, prefill, rows, tiny_family  # noqa: F401


def _steps(fam, batch, n):
    """Prefill, then `n` one-token decode forwards (positions continue per row)."""
    out = prefill(fam, batch)
    mask, cache = batch["attention_mask"], out.past_key_values
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    for _ in range(n):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        token = out.logits[:, -1].argmax(-1)[:, None]
        out = fam.model(inputs_embeds=fam.model.get_input_embeddings()(token), attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True)


def _hand(b, heads, length, dim, layers, itemsize=4):
    return [2 * b * heads * length * dim * itemsize] * layers


def test_kv_bytes_match_a_hand_count_without_and_with_a_press():
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, rows())
    text = fam.model.config.text_config
    b, width = batch["input_ids"].shape
    heads, dim, layers = text.num_key_value_heads, text.hidden_size // text.num_attention_heads, text.num_hidden_layers
    with torch.no_grad(), KVMeter(fam.model) as meter:
        _steps(fam, batch, 3)
    rec = meter.records[0]
    assert rec.prefill_bytes == _hand(b, heads, width, dim, layers)
    assert rec.peak_bytes == _hand(b, heads, width + 3, dim, layers)
    assert rec.full_final_bytes == rec.peak_bytes
    summary = meter.summary()
    assert summary["kv_bytes_prefill"] == sum(_hand(b, heads, width, dim, layers)) / b
    assert summary["kv_fraction_prefill"] == 1.0 and summary["decode_forwards"] == 3

    size = 20
    with torch.no_grad(), TovaPress(cache_size=size)(fam) as session, KVMeter(fam.model, session) as meter:
        _steps(fam, batch, 3)
    rec = meter.records[0]
    assert rec.prefill_bytes == _hand(b, heads, size, dim, layers)
    # inside a decode step the new entry is in before the press drops one: size + 1 at the peak
    assert rec.peak_bytes == _hand(b, heads, size + 1, dim, layers)
    assert rec.prefill_transient_bytes == _hand(b, heads, width, dim, layers)
    assert rec.full_final_bytes == _hand(b, heads, width + 3, dim, layers)
    summary = meter.summary()
    assert summary["kv_fraction_prefill"] == pytest.approx(size / width)
    # retained per modality = entries kept / valid tokens seen of it, over layers
    kept = {m: sum(int(((st.mod == m) & st.valid).sum()) / heads for st in session.states.values()) / layers
            for m in (TEXT, VISION)}
    assert summary["retained_text_final"] == pytest.approx(kept[TEXT] / float(session.seen_by_mod[:, TEXT].sum()))
    assert summary["retained_vision_final"] == pytest.approx(kept[VISION] / float(session.seen_by_mod[:, VISION].sum()))


METHODS = {"tova": {}, "snapkv": {"window_size": 8}, "streaming_llm": {"n_sink": 4}, "knorm": {},
           "expected_attention": {"n_future_positions": 32}}


@pytest.mark.parametrize("method", list(METHODS))
def test_kvpress_baselines_run_on_a_tiny_backbone_and_shrink_each_row_by_the_ratio(method):
    from mmreason.kv.kvpress_baselines import import_kvpress

    compute_n_kept = import_kvpress().utils.compute_n_kept  # `import kvpress` needs our shim (no `fire`)
    fam = tiny_family("tiny-internvl")
    batch = batch_of(fam, rows())
    lengths = batch["attention_mask"].sum(1)
    for ratio in (0.5, 0.75):
        press = make_press(f"kvpress:{method}", {"compression_ratio": ratio, **METHODS[method]})
        with press(fam) as session:
            with torch.no_grad():
                prefill(fam, batch)
            for st in session.states.values():
                kept = st.valid.sum(-1)  # (B, H): kvpress keeps per head
                want = torch.tensor([compute_n_kept(int(n), ratio) for n in lengths])
                assert bool((kept == want[:, None]).all())
        assert session.stats["generations"] == 1


@pytest.mark.parametrize("family_name", ["tiny-anole", "tiny-phi4mm"])
def test_kvpress_query_based_scorers_handle_q_norm_and_partial_rotary(family_name):
    fam = tiny_family(family_name)
    batch = batch_of(fam, rows())
    for method in ("expected_attention", "snapkv"):
        press = make_press(f"kvpress:{method}", {"compression_ratio": 0.5, **METHODS[method]})
        with press(fam) as session:
            out = generate(fam, batch, 0, GenerationSettings(max_new_tokens=3))
        assert len(out) == 3 and session.compressed


def test_kvpress_bad_input_names_the_setting():
    with pytest.raises(ConfigError, match="compression_ratio"):
        make_press("kvpress:knorm", {"compression_ratio": 1.5})
    with pytest.raises(ConfigError, match="press.window"):
        make_press("kvpress:snapkv", {"window": 3})
    with pytest.raises(ConfigError, match="unknown kvpress method 'h2o'"):
        make_press("kvpress:h2o", {})
    with pytest.raises(ConfigError, match="unknown press 'tovaa'"):
        make_press("tovaa", {})


def test_importing_kvpress_leaves_transformers_attention_functions_alone():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mmreason.kv.kvpress_baselines import import_kvpress

    before = {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS}
    import_kvpress()
    assert {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS} == before
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
