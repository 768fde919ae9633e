"""Continual backprop on tiny backbones (plain torch): which units it tracks, the network's output
unchanged at the moment of replacement (outgoing weights zero), the expected number of replacements
over time (maturity, accumulated fractions, apply_freq), optimizer state reset, state round trip.
The DeepSpeed ZeRO-2 path is tested through Ray Train in test_rl_stage.py."""

from __future__ import annotations

import pytest
import torch

from mmreason.config import ConfigError, load_config
from mmreason.models import build_tiny, load_backbone
from mmreason.tasks import RenderOptions, generate_example, get_task
from mmreason.train.config import TrainConfig
from mmreason.train.continual_backprop import ContinualBackprop, ContinualBackpropConfig, find_mlp_units

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(name, root / name) for name in ("tiny-internvl", "tiny-phi4mm", "tiny-anole")}


@pytest.fixture(scope="module")
def batch_rows():
    return [generate_example(get_task("maze"), 3, "train", i, 0, FRACTIONS, RenderOptions(64, False)) for i in range(2)]


def _forward(family, rows):
    batch = family.collate([family.encode(r) for r in rows])
    embeds = family.embed(batch)
    return family.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name, layout", [
    ("tiny-internvl", ("gate_proj", "up_proj")),      # Qwen2 gated MLP
    ("tiny-phi4mm", ("gate_up_proj", "gate_up_proj")),  # Phi's fused gate/up: rows i and I + i
    ("tiny-anole", ("gate_proj", "up_proj")),          # Chameleon (its VQ-VAE is frozen: left out)
])
def test_it_tracks_the_language_model_mlps_of_every_family(paths, name, layout):
    family = load_backbone(name, paths[name])
    mlps = find_mlp_units(family.model)
    assert len(mlps) == 2 and all(m.size == 256 for m in mlps)  # 2 text layers, intermediate 256
    assert tuple(n for n, _ in [(type(l).__name__, o) for l, o in mlps[0].incoming]) == ("Linear", "Linear")
    names = [n for n, mod in family.model.named_modules() for layer, _ in mlps[0].incoming if mod is layer]
    assert tuple(n.rsplit(".", 1)[1] for n in names) == layout
    assert [o for _, o in mlps[0].incoming] == [0, 256 if name == "tiny-phi4mm" else 0]
    vision = [m.name for m in find_mlp_units(family.model, include_vision=True) if m.name not in {x.name for x in mlps}]
    assert (len(vision) >= 2) is (name != "tiny-anole")  # the vision encoder's layers; a VQ-VAE has none
    assert not any("audio" in n for n in vision)


def test_output_is_unchanged_at_the_moment_of_replacement(paths, batch_rows):
    torch.manual_seed(0)
    family = load_backbone("tiny-internvl", paths["tiny-internvl"])
    family.model.train()
    dead = [3, 7, 11]
    for mlp in find_mlp_units(family.model):  # dead units: zero outgoing weights, utility exactly 0
        mlp.outgoing.weight.data[:, dead] = 0
    cbp = ContinualBackprop(family.model, ContinualBackpropConfig(enabled=True, maturity_threshold=0,
                                                                   replacement_rate=3 / 256), seed=1)
    incoming = [layer.weight.detach().clone() for m in cbp.mlps for layer, _ in m.incoming]
    with torch.enable_grad():
        before = _forward(family, batch_rows).detach()  # a training forward feeds the utilities
    assert cbp.after_step() == 3 * len(cbp.mlps)
    after = _forward(family, batch_rows).detach()
    assert torch.equal(before, after)
    for mlp in cbp.mlps:
        assert mlp.age[dead].tolist() == [0, 0, 0] and mlp.utility[dead].tolist() == [0.0, 0.0, 0.0]
        assert bool((mlp.outgoing.weight[:, dead] == 0).all())
    new = [layer.weight for m in cbp.mlps for layer, _ in m.incoming]
    for old, cur in zip(incoming, new):
        changed = (old != cur).any(1).nonzero().flatten().tolist()
        assert changed == dead  # exactly the replaced units' rows, drawn afresh
        assert 0.005 < float(cur[dead].detach().std()) < 0.05  # N(0, initializer_range = 0.02)


def test_replacements_over_time_follow_maturity_accumulated_fractions_and_apply_freq(paths, batch_rows):
    """maturity 2, rate 0.01, every 2nd step, 256 units per MLP, 10 steps:
    step 2: ages 2, none mature · step 4: 256 eligible → 2.56 → 2 (0.56 kept)
    step 6: 254 (the 2 are age 2) → 3.10 → 3 · step 8: 253 → 2.63 → 2 · step 10: 254 → 3.17 → 3 → 10."""
    family = load_backbone("tiny-internvl", paths["tiny-internvl"])
    family.model.train()
    cbp = ContinualBackprop(family.model, ContinualBackpropConfig(enabled=True, maturity_threshold=2,
                                                                   replacement_rate=0.01, apply_freq=2))
    per_step = []
    for _ in range(10):
        with torch.enable_grad():
            _forward(family, batch_rows[:1])
        per_step.append(cbp.after_step())
    n = len(cbp.mlps)
    assert per_step == [0, 0, 0, 2 * n, 0, 3 * n, 0, 2 * n, 0, 3 * n]
    assert cbp.replaced == 10 * n
    assert all(m.accumulated == pytest.approx(0.17) for m in cbp.mlps)
    # no training forward (generation, evaluation): nothing ages, nothing is replaced
    family.model.eval()
    ages = [m.age.clone() for m in cbp.mlps]
    _forward(family, batch_rows[:1])
    cbp.after_step()
    assert all(torch.equal(a, m.age) for a, m in zip(ages, cbp.mlps))


def test_replacement_resets_the_optimizer_state_of_those_units_only(paths, batch_rows):
    torch.manual_seed(0)
    family = load_backbone("tiny-phi4mm", paths["tiny-phi4mm"])
    family.model.train()
    cbp = ContinualBackprop(family.model, ContinualBackpropConfig(enabled=True, maturity_threshold=1,
                                                                   replacement_rate=0.02, apply_freq=2))
    optimizer = torch.optim.AdamW(family.model.parameters(), lr=1e-3)
    cbp.bind(optimizer)
    replaced = 0
    for _ in range(2):
        batch = family.collate([family.encode(r) for r in batch_rows])
        from mmreason.latent.coconut import latent_forward
        loss, _ = latent_forward(family, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ages = [m.age.clone() for m in cbp.mlps]
        replaced = cbp.after_step()
    assert replaced == 5 * len(cbp.mlps)  # step 2: 256 eligible × 0.02 = 5.12
    for mlp, age_before in zip(cbp.mlps, ages):
        units = ((age_before == 1) & (mlp.age == 0)).nonzero().flatten()
        assert len(units) == 5
        for layer, offset in mlp.incoming:
            for key in ("exp_avg", "exp_avg_sq"):
                state = optimizer.state[layer.weight][key]
                assert bool((state[units + offset] == 0).all())
                assert float(state.abs().sum()) > 0  # the rest kept
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[mlp.outgoing.weight][key]
            assert bool((state[:, units] == 0).all()) and float(state.abs().sum()) > 0


def test_state_round_trips_and_is_checked_against_the_model(paths, batch_rows):
    family = load_backbone("tiny-internvl", paths["tiny-internvl"])
    family.model.train()
    cbp = ContinualBackprop(family.model, ContinualBackpropConfig(enabled=True, maturity_threshold=0,
                                                                   replacement_rate=0.01))
    with torch.enable_grad():
        _forward(family, batch_rows[:1])
    cbp.after_step()
    state = cbp.state_dict()
    fresh = ContinualBackprop(load_backbone("tiny-internvl", paths["tiny-internvl"]).model,
                              ContinualBackpropConfig(enabled=True))
    fresh.load_state_dict(state)
    assert fresh.steps == 1 and fresh.replaced == cbp.replaced
    assert all(torch.equal(a.utility, b.utility) and a.accumulated == b.accumulated for a, b in zip(cbp.mlps, fresh.mlps))
    other = ContinualBackprop(load_backbone("tiny-phi4mm", paths["tiny-phi4mm"]).model, ContinualBackpropConfig())
    with pytest.raises(ValueError, match="continual backprop state is for MLPs"):
        other.load_state_dict(state)


@pytest.mark.parametrize("override, needle", [
    ("continual_backprop.replacement_rate=2", "replacement_rate must lie in \\[0, 1\\]"),
    ("continual_backprop.decay_rate=1.0", "decay_rate must lie in \\[0, 1\\)"),
    ("continual_backprop.apply_freq=0", "apply_freq must be >= 1"),
    ("continual_backprop.maturity_threshold=-1", "maturity_threshold must be >= 0"),
])
def test_bad_settings_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainConfig, None, [override])
