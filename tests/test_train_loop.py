"""The shared stage loop without Ray (`mmreason.train.loop.run_loop` with a `LocalWorker`, DeepSpeed
single-process): gradient accumulation, precision, ZeRO-3 through evaluation and export, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmreason.config import ConfigError, load_config
from mmreason.models import build_tiny, load_backbone
from mmreason.tasks import TASKS, RenderOptions, generate_example
from mmreason.train.config import TrainConfig
from mmreason.train.loop import (LocalWorker, deepspeed_config, register_unhooked_weights, run_loop,
                                 single_process_env)

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def maze_rows(split: str, n: int, size: int = 3) -> list[dict]:
    opts = RenderOptions(image_size=64, step_images=False)
    return [generate_example(TASKS["maze"], size, split, i, 7, FRACTIONS, opts) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny("tiny-internvl", tmp_path_factory.mktemp("tiny") / "m", seed=0)


def run(tiny: Path, root: Path, rows: list[dict], *overrides: str, steps: int = 1, eval_rows=None,
        ds: str = "configs/deepspeed/zero2.json") -> tuple[dict, LocalWorker, TrainConfig]:
    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        "run_name=t", "eval.epoch_examples=0", "optim.warmup_steps=1", "optim.epochs=1", "eval.batch_size=8",
        "eval.modes={cot: {max_new_tokens: 48}}", *overrides])
    single_process_env(torch.device("cpu"))
    worker = LocalWorker(rows, cfg.optim.batch_size, torch.device("cpu"), root / "ckpt", shuffle=False)
    out = run_loop(cfg, str(tiny), worker, REPO / ds, steps, str(root / "run"), eval_rows=eval_rows)
    return out, worker, cfg


def params(export: Path, backbone: str = "tiny-internvl") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_backbone(backbone, export).model.state_dict().items()}


def test_grad_accum_4_of_micro_batch_4_makes_the_first_update_of_batch_16(tiny, tmp_path):
    """The language-model loss is divided by the window's tokens, so 4 × 4 rows give batch 16's
    gradient. AdamW's first update is lr·g/(|g|+ε): elements whose gradient differs in sign or is
    near 0 move differently, so the bound is on the update, 5 % of lr (float summation order
    only flips signs of gradients ~1e-7 of the largest). Dropping three of the micro-batches (the
    control) moves them by up to 2·lr."""
    rows = maze_rows("train", 16)
    lr = 1e-3
    big, _, _ = run(tiny, tmp_path / "big", rows, "optim.batch_size=16", "grad_accum=1", f"optim.lr={lr}")
    acc, _, _ = run(tiny, tmp_path / "acc", rows, "optim.batch_size=4", "grad_accum=4", f"optim.lr={lr}")
    one, _, _ = run(tiny, tmp_path / "one", rows[:4], "optim.batch_size=4", "grad_accum=1", f"optim.lr={lr}")
    assert big["global_batch"] == 16 and acc["global_batch"] == 16
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-5)  # the token-weighted window loss
    start, a, b, c = (params(p) for p in (tiny, tmp_path / "big/run/export", tmp_path / "acc/run/export",
                                           tmp_path / "one/run/export"))
    moved = max(float((a[k] - start[k]).abs().max()) for k in start)
    assert moved == pytest.approx(lr, rel=0.05)  # the update happened (warm-up 1: full lr)
    diff = max(float(((a[k] - start[k]) - (b[k] - start[k])).abs().max()) for k in start)
    control = max(float(((a[k] - start[k]) - (c[k] - start[k])).abs().max()) for k in start)
    assert diff < 0.05 * lr
    assert control > 0.5 * lr


def test_the_deepspeed_config_takes_precision_and_batch_geometry_from_the_stage(tmp_path):
    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml",
                      ["precision=bf16", "grad_accum=3", "optim.batch_size=5"])
    ds = deepspeed_config(cfg, REPO / "configs/deepspeed/zero2.json", world=4)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (5, 3, 60)
    fp16 = deepspeed_config(load_config(TrainConfig, None, ["precision=fp16"]), REPO / "configs/deepspeed/zero2.json", 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    clash = tmp_path / "ds.json"
    clash.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}}')
    with pytest.raises(ConfigError, match="ds.json sets bf16; these come from the stage config"):
        deepspeed_config(cfg, clash, world=1)
    with pytest.raises(ConfigError, match="config key 'precision' must be one of \\['fp32', 'bf16', 'fp16'\\], got 'fp8'"):
        load_config(TrainConfig, None, ["precision=fp8"])
    with pytest.raises(ConfigError, match="activation_checkpointing: the coconut stage"):
        load_config(TrainConfig, None, ["stage=coconut", "activation_checkpointing=true"])


def test_bf16_stage_follows_the_fp32_loss_and_exports_bf16_weights(tiny, tmp_path):
    """Same rows, seed and steps in both precisions (DeepSpeed's bf16 mode: bf16 weights and
    activations, fp32 master weights; here with activation checkpointing too). bf16 keeps 8 bits
    of mantissa, so epoch losses agree to a few per cent while training moves them by far more."""
    from safetensors import safe_open

    rows = maze_rows("train", 16)
    common = ("optim.batch_size=8", "optim.epochs=3", "optim.lr=0.003")
    _, w32, _ = run(tiny, tmp_path / "fp32", rows, *common, steps=2)
    _, w16, _ = run(tiny, tmp_path / "bf16", rows, *common, "precision=bf16", "activation_checkpointing=true", steps=2)
    fp32, bf16 = [r["loss"] for r in w32.reported], [r["loss"] for r in w16.reported]
    assert fp32[-1] < 0.8 * fp32[0]  # it trains
    assert bf16 == pytest.approx(fp32, rel=0.03)
    with safe_open(str(tmp_path / "bf16/run/export/model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the weights it trained


@pytest.mark.parametrize("ds", ["zero3.json", "zero3-offload.json"])
def test_zero3_stage_loop_trains_evaluates_exports_and_resumes(tiny, tmp_path, ds):
    """Partitioned weights through the whole loop: per-epoch evaluation (of a gathered copy), the
    best and final exports (16-bit gathering; fp32 here), a checkpoint and a resume. The export
    must hold the weights a ZeRO-2 run of the same steps ends with, up to 2 % of the learning rate
    (AdamW's steps on gradients near 0 carry the partitions' other summation order)."""
    rows, held_out = maze_rows("train", 16), maze_rows("test", 4)
    common = ("optim.batch_size=8", "eval.epoch_examples=4")
    out, worker, _ = run(tiny, tmp_path / "z3", rows, *common, steps=2, eval_rows=held_out,
                         ds=f"configs/deepspeed/{ds}")
    assert 0.0 <= out["eval_accuracy"] <= 1.0 and out["best_eval_accuracy"] == out["eval_accuracy"]
    assert (tmp_path / "z3/run/best/model.safetensors").is_file()
    run(tiny, tmp_path / "z2", rows, *common, steps=2, eval_rows=held_out)
    start, z3, z2 = (params(p) for p in (tiny, tmp_path / "z3/run/export", tmp_path / "z2/run/export"))
    assert max(float((z3[k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained
    assert max(float((z3[k] - z2[k]).abs().max()) for k in start) < 0.02 * 2e-3  # cot-maze.yaml's lr

    again, resumed, _ = run(tiny, tmp_path / "z3", rows, *common, "optim.epochs=2", steps=2, eval_rows=held_out,
                            ds=f"configs/deepspeed/{ds}")
    assert [r["epoch"] for r in resumed.reported] == [1]  # epoch 0 came from the checkpoint
    assert again["best_eval_accuracy"] >= out["eval_accuracy"]


def test_phi4mm_trains_under_zero3_as_under_zero2(tmp_path):
    """Phi-4-MM's vision pooling head is torch's `nn.MultiheadAttention`, which reads its
    `out_proj` weight inside its own forward without calling `out_proj`: under ZeRO-3 that weight
    stayed partitioned ("mat2 must be a matrix, got 1-D tensor") until the loop registered it with
    the attention module (`register_unhooked_weights`). Same steps under ZeRO-2 and ZeRO-3, with
    per-epoch evaluation: the exports agree element by element, bar a few elements whose gradient is
    ~0 in exact arithmetic (key biases: softmax ignores a shift shared by a query's logits), where
    AdamW's normalised step turns summation-order noise into steps of up to lr (measured: 87 of
    632 416 elements differ by more than 2 % of lr, the largest 0.27·lr, all in the vision tower)."""
    tiny = build_tiny("tiny-phi4mm", tmp_path / "m", seed=0)
    assert register_unhooked_weights(load_backbone("tiny-phi4mm", tiny).model) == 2  # weight and bias
    rows, held_out = maze_rows("train", 8), maze_rows("test", 2)
    common = ("model.backbone=tiny-phi4mm", "optim.batch_size=4", "eval.epoch_examples=2",
              "eval.modes={cot: {max_new_tokens: 8}}")
    out, _, _ = run(tiny, tmp_path / "z3", rows, *common, steps=2, eval_rows=held_out,
                    ds="configs/deepspeed/zero3.json")
    assert 0.0 <= out["eval_accuracy"] <= 1.0
    run(tiny, tmp_path / "z2", rows, *common, steps=2, eval_rows=held_out)
    start, z3, z2 = (params(p, "tiny-phi4mm") for p in (tiny, tmp_path / "z3/run/export", tmp_path / "z2/run/export"))
    moved = torch.cat([(z3[k] - start[k]).abs().flatten() for k in start])
    apart = torch.cat([(z3[k] - z2[k]).abs().flatten() for k in start])
    lr = 2e-3  # cot-maze.yaml's
    assert float((moved > 0.5 * lr).float().mean()) > 0.5  # it trained: most weights took ~2 steps of lr
    assert float((apart > 0.02 * lr).float().mean()) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_cuda_bf16_stage_trains_like_cpu_fp32(tiny, tmp_path, ds):
    """The loop on a GPU as a Ray worker runs it: model, batches and per-epoch evaluation on cuda in
    bf16 (ZeRO-2 and ZeRO-3), epoch losses within 3 % of the same seed on the CPU in fp32."""
    rows, held_out = maze_rows("train", 32), maze_rows("test", 8)
    common = ("optim.batch_size=8", "optim.epochs=2", "eval.epoch_examples=8")
    _, cpu, _ = run(tiny, tmp_path / "cpu", rows, *common, steps=4, eval_rows=held_out, ds=f"configs/deepspeed/{ds}")
    cfg = load_config(TrainConfig, REPO / "configs/train/cot-maze.yaml", [
        "run_name=t", "optim.warmup_steps=1", "eval.batch_size=8", "eval.modes={cot: {max_new_tokens: 48}}",
        "precision=bf16", "use_gpu=true", *common])
    device = torch.device("cuda", 0)
    single_process_env(device)
    gpu = LocalWorker(rows, cfg.optim.batch_size, device, tmp_path / "gpu" / "ckpt", shuffle=False)
    out = run_loop(cfg, str(tiny), gpu, REPO / "configs/deepspeed" / ds, 4, str(tmp_path / "gpu" / "run"),
                   eval_rows=held_out)
    assert [r["loss"] for r in gpu.reported] == pytest.approx([r["loss"] for r in cpu.reported], rel=0.03)
    assert "eval_accuracy" in out and (tmp_path / "gpu/run/export/model.safetensors").is_file()


def test_a_checkpoint_metric_the_stage_does_not_report_is_named_after_the_first_epoch(tiny, tmp_path):
    """Ray Train would rank such checkpoints last (it scores a missing metric -inf), keeping the
    wrong ones; the loop stops instead, naming the setting and what the stage does report."""
    rows = maze_rows("train", 8)
    with pytest.raises(ConfigError, match="checkpoint_metric: 'val_loss' is not reported every epoch by the cot stage "
                                          "\\(it reports: .*epoch, global_batch, loss, lr"):
        run(tiny, tmp_path, rows, "optim.batch_size=8", "checkpoint_metric=val_loss", "checkpoint_mode=min")
    assert not (tmp_path / "ckpt" / "latest").exists()  # stopped before the checkpoint was reported
    out, worker, cfg = run(tiny, tmp_path, rows, "optim.batch_size=8", "checkpoint_metric=loss", "checkpoint_mode=min")
    assert cfg.checkpoint_score == ("loss", "min") and worker.reported[0]["loss"] == out["loss"]
