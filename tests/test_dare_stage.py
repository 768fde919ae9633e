"""The dare stage for real (Ray Train, 2 workers, DeepSpeed ZeRO-2) at toy scale: the routers learn
the per-modality keep targets with the backbone frozen, and the export decodes with a pruned cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmreason.config import ConfigError, load_config
from mmreason.kv.dare import DarePress
from mmreason.models import build_tiny, load_backbone
from mmreason.train.config import TrainConfig
from mmreason.train.stages.dare import ROUTER_FILE, keep_rates
from jobs import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_keep_rates_count_only_valid_tokens_per_modality():
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    modality = torch.tensor([[0, 0, 1, 1]])  # text, text, vision, vision
    valid = torch.tensor([[True, True, True, False]])
    assert keep_rates([(keep, modality, valid)]) == {"text": 0.5, "vision": 1.0}


def test_dare_targets_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"dare.rho_vis must be in \(0, 1\], got 1.5"):
        load_config(TrainConfig, REPO / "configs/train/dare-maze.yaml", ["dare.rho_vis=1.5"])
    with pytest.raises(ConfigError, match=r"'dare.backbone' must be one of \['frozen', 'full'\], got 'lora'"):
        load_config(TrainConfig, REPO / "configs/train/dare-maze.yaml", ["dare.backbone=lora"])
    with pytest.raises(ConfigError, match=r"'dare.masks' must be one of \['gumbel', 'topk', 'decode'\], got 'soft'"):
        load_config(TrainConfig, REPO / "configs/train/dare-maze.yaml", ["dare.masks=soft"])


def run_tiny_dare_stage(maze_data, tmp_path, monkeypatch, overrides: list[str]) -> tuple[Path, dict]:
    """configs/train/dare-maze.yaml on a fresh tiny-internvl (returns its dir and the stage's result)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    start = build_tiny("tiny-internvl", tmp_path / "start")
    cfg = load_config(TrainConfig, REPO / "configs/train/dare-maze.yaml", [
        f"data.path={maze_data}", f"storage={tmp_path / 'runs'}", f"init_from={start}", "run_name=d",
        "eval.batch_size=8", "eval.modes={cot: {max_new_tokens: 8}}", *overrides])
    return start, train.run_stage(cfg)


def test_dare_stage_learns_the_keep_targets_with_the_backbone_frozen(maze_data, tmp_path, monkeypatch):
    import mlflow

    start, out = run_tiny_dare_stage(maze_data, tmp_path, monkeypatch, [
        "dare={rho_text: 0.7, rho_vis: 0.4, layer: 1, backbone: frozen, masks: gumbel, window: 0, router_context: 1, "
        "router_fit: none}",
        "optim={lr: 0.03, batch_size: 8, epochs: 4, warmup_steps: 2}", "eval.max_examples=8", "eval.epoch_examples=20"])

    # the router's own keep decisions on held-out rows sit at the targets (top-k is not forcing them)
    assert abs(out["train"]["dare_keep_text"] - 0.7) <= 0.05, out["train"]
    assert abs(out["train"]["dare_keep_vision"] - 0.4) <= 0.05, out["train"]
    export = Path(out["export"])
    before, after = load_backbone("tiny-internvl", start), load_backbone("tiny-internvl", export)
    for (name, a), b in zip(before.model.state_dict().items(), after.model.state_dict().values()):
        assert torch.equal(a, b), f"frozen backbone changed: {name}"
    press = DarePress(rho_text=0.7, rho_vis=0.4, layer=1, router_path=str(export / ROUTER_FILE))
    assert press.router is not None and not press.router.training
    cot = out["eval"]["cot"]
    assert cot["n"] == 8 and cot["kv_fraction_prefill"] < 1.0  # the export decodes with a pruned cache
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.params["stage"] == "dare" and "dare_ratio_loss" in run.data.metrics
    assert "cot_kv_fraction_prefill" in run.data.metrics


def test_window_context_and_importance_settings_are_checked_when_the_config_loads():
    base = REPO / "configs/train/dare-maze.yaml"
    with pytest.raises(ConfigError, match=r"dare.window must be >= 0, got -1"):
        load_config(TrainConfig, base, ["dare.window=-1", "dare.masks=decode"])
    with pytest.raises(ConfigError, match=r"dare.window: only dare.masks=decode .*got masks='topk'"):
        load_config(TrainConfig, base, ["dare.window=8", "dare.masks=topk", "dare.router_fit=none"])
    with pytest.raises(ConfigError, match=r"dare.router_context must be >= 1, got 0"):
        load_config(TrainConfig, base, ["dare.router_context=0"])
    with pytest.raises(ConfigError, match=r"dare.importance_weight must be >= 0, got -0.5"):
        load_config(TrainConfig, base, ["dare.importance_weight=-0.5"])
    cfg = load_config(TrainConfig, base, ["dare.window=8", "dare.masks=decode", "dare.router_context=3",
                                         "dare.importance_weight=0.5", "dare.router_fit=none"])
    press = cfg.dare.press()
    assert (press.window, press.router_context, press.learn_importance, press.train_masks) == (8, 3, True, "decode")


def test_dare_stage_with_a_knockout_fitted_router_trains_only_what_sits_above_it(maze_data, tmp_path, monkeypatch):
    import mlflow

    start, out = run_tiny_dare_stage(maze_data, tmp_path, monkeypatch, [
        "dare={rho_text: 0.5, rho_vis: 0.5, layer: 1, backbone: full, masks: decode, window: 2, router_fit: knockout, "
        "fit_rows: 6, fit_epochs: 3}",
        "optim={lr: 0.01, batch_size: 8, epochs: 1, warmup_steps: 1}", "eval.max_examples=4", "eval.epoch_examples=8"])

    assert out["train"]["dare_fit_rows"] == 6.0 and out["train"]["dare_fit_loss"] > 0, out["train"]
    # decode masks keep exactly the targets (the recent window counts against them)
    assert abs(out["train"]["dare_keep_text"] - 0.5) <= 0.05 and abs(out["train"]["dare_keep_vision"] - 0.5) <= 0.05
    before, after = load_backbone("tiny-internvl", start), load_backbone("tiny-internvl", out["export"])
    changed = {name for (name, a), b in zip(before.model.state_dict().items(), after.model.state_dict().values())
               if not torch.equal(a, b)}
    # the router's input (embeddings, vision side, layer 0) is what it was fitted on; layer 1 trained
    above = [".layers.1." in name or name.endswith("language_model.norm.weight") for name in changed]
    assert changed and all(above), changed
    assert any(".layers.1.self_attn." in name for name in changed)
    press = DarePress(rho_text=0.5, rho_vis=0.5, layer=1, router_path=str(Path(out["export"]) / ROUTER_FILE))
    assert press.router is not None and press.router.context == 1
    run = mlflow.get_run(out["mlflow_run_id"])
    assert {"dare_fit_loss", "dare_fit_measure_s"} <= set(run.data.metrics)
