from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmreason.config import ConfigError, config_hash, load_config
from mmreason.data.gridworld import GridworldConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: float = 1e-3
    sizes: list[int] = field(default_factory=lambda: [3])
    name: str | None = None


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    named: dict[str, Inner] = field(default_factory=dict)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config(Outer) == Outer()


def test_base_inheritance_merges_deeply_and_later_keys_win(tmp_path):
    write(tmp_path / "a.yaml", "steps: 1\ninner: {lr: 0.5, sizes: [4, 5]}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nsteps: 2\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "c.yaml", "base: ../b.yaml\ninner: {name: x}\n")
    cfg = load_config(Outer, child)
    assert cfg.steps == 2 and cfg.inner == Inner(lr=0.5, sizes=[4, 5], name="x")


def test_overrides_apply_last_and_parse_yaml_values(tmp_path):
    path = write(tmp_path / "c.yaml", "steps: 1\n")
    cfg = load_config(Outer, path, ["steps=7", "inner.sizes=[6,7]", "inner.lr=1e-4", "flag=true",
                                    "named.maze.lr=2"])
    assert (cfg.steps, cfg.inner.sizes, cfg.inner.lr, cfg.flag) == (7, [6, 7], 1e-4, True)
    assert cfg.named == {"maze": Inner(lr=2.0)}


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "inner: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.lrr'.*c\.yaml|c\.yaml.*unknown config key 'inner\.lrr'"):
        load_config(Outer, path)


@pytest.mark.parametrize(
    "override, key",
    [("steps=ten", "steps"), ("flag=1", "flag"), ("inner.sizes=[3, x]", r"inner\.sizes\[1\]"), ("inner=3", "inner")],
)
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(Outer, None, [override])


def test_missing_file_and_inherited_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")
    child = write(tmp_path / "c.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone\.yaml.*inherited by .*c\.yaml"):
        load_config(Outer, child)


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, tmp_path / "a.yaml")


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Outer, None, ["steps"])


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(steps=11))


def test_shipped_gridworld_config_spells_out_the_defaults():
    assert load_config(GridworldConfig, REPO / "configs/data/gridworld.yaml") == GridworldConfig()


def test_mvot_config_inherits_and_overrides():
    cfg = load_config(GridworldConfig, REPO / "configs/data/gridworld-mvot.yaml")
    assert cfg.image_size == 256 and cfg.seed == 0 and cfg.examples == 5000


@pytest.mark.parametrize(
    "override, needle",
    [
        ("tasks.sudoku.sizes=[3]", r"tasks\.sudoku.*unknown grid-world task 'sudoku'"),
        ("tasks.maze.sizes=[7]", r"tasks\.maze\.sizes: grid size 7 out of range 3\.\.6"),
        ("examples=-1", r"examples must be >= 0, got -1"),
        ("tasks.maze.examples=-3", r"tasks\.maze\.examples must be >= 0"),
        ("splits.val=-0.1", r"splits\.val must be >= 0"),
        ("image_size=8", r"image_size must be >= 16"),
        ("recheck=1.5", r"recheck must be in \[0, 1\].*got 1\.5"),
        ("restate=-0.1", r"restate must be in \[0, 1\].*got -0\.1"),
        ("recheck_after_answer=true", r"recheck_after_answer places the re-check.*recheck=0"),
    ],
)
def test_gridworld_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(GridworldConfig, None, [override])


def test_a_dict_field_is_replaced_by_the_layer_that_sets_it_and_overrides_tweak_one_key(tmp_path):
    write(tmp_path / "a.yaml", "named: {x: {lr: 1}, y: {lr: 2}}\n")
    child = write(tmp_path / "b.yaml", "base: a.yaml\nnamed: {z: {lr: 3}}\n")
    assert load_config(Outer, child).named == {"z": Inner(lr=3.0)}
    assert load_config(Outer, tmp_path / "a.yaml", ["named.y.name=q"]).named == {
        "x": Inner(lr=1.0), "y": Inner(lr=2.0, name="q")}


def test_override_into_a_default_dict_entry_keeps_its_other_keys():
    cfg = load_config(GridworldConfig, None, ["tasks.maze.examples=5"])
    assert cfg.tasks["maze"].examples == 5 and cfg.tasks["maze"].sizes == [3, 4, 5, 6]
    assert set(cfg.tasks) == {"maze", "frozenlake", "minibehavior"}


@pytest.mark.parametrize("path", sorted((REPO / "configs/train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_load_under_their_own_run_name(path):
    from mmreason.train.config import TrainConfig

    assert load_config(TrainConfig, path).run_name == path.stem


def test_quickstart_config_spells_out_the_default_and_the_benchmark_reaches_coconuts_last_stage():
    from jobs.quickstart import QuickstartConfig

    assert load_config(QuickstartConfig, REPO / "configs/quickstart.yaml") == QuickstartConfig()
    bench = load_config(QuickstartConfig, REPO / "configs/bench/maze-cpu.yaml")
    sched = bench.coconut.coconut
    # the benchmark's coconut run ends at the last stage (every step but the kept one latent)
    assert sched.stage(bench.coconut.optim.epochs - 1) == sched.max_latent_stage + 1
    assert sched.keep_last_steps == 1
