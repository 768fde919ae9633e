"""The rl stage for real: Ray Train (2 workers) + DeepSpeed ZeRO-2 + MLflow at toy scale, with
continual backprop on; continual backprop's writes under ZeRO-2 (and ZeRO-3) checked against
DeepSpeed's own view of the master weights and optimizer state; GRPO under ZeRO-3 with ranks that
sample replies of different lengths; bad rl input fails before workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmreason.config import ConfigError, load_config
from mmreason.models import load_backbone
from mmreason.train.config import TrainConfig
from jobs import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
LENGTH = "mmreason.train.rewards.length.threshold_length_penalty"


def rl_cfg(data: Path, storage: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs/train/rl-maze.yaml", [
        f"data.path={data}", f"storage={storage}", "run_name=rl", "init_from=null", "data.max_train_rows=16",
        "optim.batch_size=4", "optim.epochs=1", "optim.warmup_steps=1", "rl.group_size=2",
        "rl.sampling.max_new_tokens=8", "rl.kl_coef=0.05",
        f"rl.rewards=[{{fn: mmreason.train.rewards.correctness.multiple_choice_correct}}, "
        f"{{fn: {LENGTH}, kwargs: {{threshold: 4, factor: 0.05}}}}]",
        "eval.max_examples=4", "eval.epoch_examples=2", "eval.batch_size=4", "eval.modes={cot: {max_new_tokens: 8}}",
        *extra])


def test_rl_stage_runs_grpo_on_ray_train_and_deepspeed_and_logs_each_reward(maze_data, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = rl_cfg(maze_data, tmp_path / "runs", "continual_backprop={enabled: true, maturity_threshold: 0, "
                                               "replacement_rate: 0.01, apply_freq: 1}")
    out = train.run_stage(cfg)
    m = out["train"]
    assert m["steps_per_epoch"] == 16 // (2 * 4) == 2
    # every worker sampled 4 prompts × 2 replies per step; generation and update timed apart
    assert m["rl_samples"] == 8 and m["gen_seconds"] > 0 and m["update_seconds"] > 0
    assert m["rl_reward_total"] == pytest.approx(m["rl_reward_accuracy"] + m["rl_reward_length_penalty"])
    assert m["rl_reward_length_penalty"] < 0  # 8-token replies from a random model are over 4 tokens
    assert 0 <= m["rl_reward_accuracy"] <= 1 and "rl_kl" in m
    # continual backprop ran under ZeRO-2: 2 steps × 2 MLPs × ⌊0.01 × 256 + carry⌋ = 2 + 3 each... ≥ 4 units
    assert m["cbp_replaced"] == 2 * (2 + 3)
    export = Path(out["export"])
    assert load_backbone("tiny-internvl", export).model.config.model_type == "internvl"
    state = torch.load(export / "continual_backprop.pt")
    assert state["steps"] == 2 and state["replaced"] == 10  # carried to the next dataset of a sequence
    client = mlflow.MlflowClient()
    for key in ("rl_reward_accuracy", "rl_reward_length_penalty", "rl_reward_total", "rl_response_length",
                "rl_gen_seconds", "rl_update_seconds", "rl_kl"):
        history = client.get_metric_history(out["mlflow_run_id"], key)
        assert [h.step for h in history] == [0, 1], key  # one point per GRPO step
    assert set(out["eval"]) == {"cot"} and out["eval"]["cot"]["n"] == 4


@pytest.mark.parametrize("override, error, needle", [
    ("rl.group_size=1", ConfigError, "rl.group_size must be >= 2"),
    ("rl.rewards=[{fn: mmreason.train.rewards.nope.f}]", ConfigError, "cannot import module 'mmreason.train.rewards.nope'"),
    ("rl.rewards=[{fn: mmreason.train.stages.rl.aggregate}]", ConfigError, "has the signature aggregate"),
])
def test_bad_rl_input_fails_when_the_config_loads(maze_data, tmp_path, override, error, needle):
    with pytest.raises(error, match=needle):
        rl_cfg(maze_data, tmp_path / "runs", override)


def test_bad_reward_settings_fail_before_any_worker_starts(maze_data, tmp_path):
    cfg = rl_cfg(maze_data, tmp_path / "runs", f"rl.rewards=[{{fn: {LENGTH}, kwargs: {{threshold: 4, factor: 0.1, "
                                               f"kind: cubic}}}}]")
    with pytest.raises(ConfigError, match="kind must be one of"):
        train.run_stage(cfg)
    assert not list((tmp_path / "runs" / "rl").glob("checkpoint_*"))


def _cbp_under_zero(config: dict) -> dict:
    """A Ray Train worker, once per ZeRO stage: two DeepSpeed steps, a forced replacement, then
    DeepSpeed's own view of the fp32 master weights and AdamW moments (gathered from both ranks'
    partitions) against what continual backprop promises; one more step, and the ranks must agree."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mmreason.latent.coconut import latent_forward
    from mmreason.models import load_backbone
    from mmreason.train.continual_backprop import ContinualBackprop, ContinualBackpropConfig
    from mmreason.train.loop import training_deepspeed

    deepspeed = training_deepspeed()
    out = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        family = load_backbone("tiny-internvl", config["model"])
        family.model.train()
        cbp = ContinualBackprop(family.model, ContinualBackpropConfig(enabled=True, maturity_threshold=0,
                                                                      replacement_rate=4 / 256, apply_freq=3))
        ds = {"zero_optimization": {"stage": stage, "overlap_comm": False}, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}
        engine, *_ = deepspeed.initialize(model=family.model, config=ds,
                                          optimizer=torch.optim.AdamW(family.model.parameters(), lr=1e-3))
        cbp.bind(engine.optimizer)
        batch = family.collate([family.encode(r) for r in config["rows"][dist.get_rank() :: 2]])

        def step():
            loss, _ = latent_forward(family, batch)
            engine.backward(loss)
            engine.step()

        for _ in range(2):
            step()
            assert cbp.after_step() == 0
        ages = [m.age.clone() for m in cbp.mlps]
        step()
        checks = {"replaced": cbp.after_step(), "moments_zero": True, "moments_kept": True,
                  "master_equals_model": True, "outgoing_zero": True}
        for mlp, before in zip(cbp.mlps, ages):
            units = ((mlp.age == 0) & (before == 2)).nonzero().flatten()
            targets = [(layer.weight, (units + offset, slice(None))) for layer, offset in mlp.incoming]
            targets.append((mlp.outgoing.weight, (slice(None), units)))
            for param, index in targets:
                master = safe_get_full_fp32_param(param)
                with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
                    model = param.data.clone()
                checks["master_equals_model"] &= bool(torch.equal(master, model))
                for key in ("exp_avg", "exp_avg_sq"):
                    state = safe_get_full_optimizer_state(param, key)
                    checks["moments_zero"] &= bool((state[index] == 0).all())
                    checks["moments_kept"] &= float(state.abs().sum()) > 0
                if param is mlp.outgoing.weight:
                    checks["outgoing_zero"] &= bool((model[index] == 0).all())
        step()
        cbp.after_step()
        with deepspeed.zero.GatheredParameters(list(family.model.parameters()), enabled=stage == 3):
            total = torch.tensor([float(sum(p.double().sum() for p in family.model.parameters()))], dtype=torch.float64)
        both = [torch.zeros_like(total) for _ in range(2)]
        dist.all_gather(both, total)
        checks["ranks_agree"] = bool(both[0] == both[1])
        out[f"zero{stage}"] = checks
        cbp.remove()
        engine.destroy()
    return out


def _grpo_under_zero3(config: dict) -> dict:
    """A Ray Train worker: two GRPO steps under ZeRO-3 with every weight partitioned (persistence
    threshold 0; DeepSpeed's default keeps a tiny model's small weights whole, which hides the
    problem), rank 0 sampling up to 16 tokens per reply and rank 1 up to 3. Every forward under
    ZeRO-3 is a collective, so without `whole_weights_for_sampling` the ranks' decode loops take
    different numbers of steps and the group breaks (measured: rank 0 "Connection reset by peer",
    rank 1 no answer); with it both finish and agree on the weights."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from mmreason.latent.coconut import GenerationSettings
    from mmreason.models import load_backbone
    from mmreason.train.loop import training_deepspeed
    from mmreason.train.rewards import Rewards
    from mmreason.train.stages.rl import RLConfig, grpo_step

    rank = dist.get_rank()
    torch.manual_seed(0)
    family = load_backbone("tiny-internvl", config["model"])
    family.model.train()
    ds = {"zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}
    engine, *_ = training_deepspeed().initialize(model=family.model, config=ds,
                                                 optimizer=torch.optim.AdamW(family.model.parameters(), lr=1e-3))
    partitioned = sum(p.ds_tensor.numel() < p.ds_numel for p in family.model.parameters())
    rl = RLConfig(group_size=2, sampling=GenerationSettings(max_new_tokens=16 if rank == 0 else 3, do_sample=True))
    generator = torch.Generator().manual_seed(rank)
    lengths = [grpo_step(engine, family, config["rows"][rank::2], rl, Rewards(rl.rewards), generator)["response_length"]
               for _ in range(2)]
    total = torch.tensor([float(sum(safe_get_full_fp32_param(p).double().sum() for p in family.model.parameters()))],
                         dtype=torch.float64)
    both = [torch.zeros_like(total) for _ in range(2)]
    dist.all_gather(both, total)
    per_rank = [None, None]
    dist.all_gather_object(per_rank, lengths)
    engine.destroy()
    return {"partitioned": partitioned, "lengths": per_rank, "ranks_agree": bool(both[0] == both[1])}


def _under_zero(config: dict) -> dict:
    return {**_cbp_under_zero(config), "grpo_zero3": _grpo_under_zero3(config)}


def test_continual_backprop_under_zero2_and_zero3_and_grpo_under_zero3(tmp_path, ray_session):
    """One Ray Train run of 2 workers: `_cbp_under_zero` (ZeRO-2 and ZeRO-3), then `_grpo_under_zero3`
    (replies of different lengths on the two ranks)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmreason.models import build_tiny
    from mmreason.tasks import RenderOptions, generate_example, get_task

    model = build_tiny("tiny-internvl", tmp_path / "model")
    rows = [generate_example(get_task("maze"), 3, "train", i, 0, {"train": 1.0}, RenderOptions(64, False))
            for i in range(4)]
    trainer = TorchTrainer(_under_zero, train_loop_config={"model": str(model), "rows": rows},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name="cbp", storage_path=str(tmp_path / "ray")))
    checks = trainer.fit().return_value
    expected = {"replaced": 2 * 4, "moments_zero": True, "moments_kept": True, "master_equals_model": True,
                "outgoing_zero": True, "ranks_agree": True}
    grpo = checks.pop("grpo_zero3")
    assert checks == {"zero2": expected, "zero3": expected}
    assert grpo["partitioned"] > 0 and grpo["ranks_agree"]
    assert min(grpo["lengths"][0]) > 3 >= max(grpo["lengths"][1])  # mean reply lengths: the ranks decoded unevenly
