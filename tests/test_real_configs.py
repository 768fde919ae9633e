"""The A100 training configs (`configs/train/*-a100.yaml`) and `configs/deepspeed/zero3-offload.json`.

No GPU and no network here: each config loads as a `TrainConfig`, asks for GPUs in bf16, names a
DeepSpeed file of the ZeRO stage it claims that DeepSpeed's own config parser accepts with the
stage's batch geometry, states its global batch (batch × grad_accum × workers) in its header, and
the later stages start from the earlier stages' exports. The offload file is run for real: a ZeRO-3
engine with both offloads and the loop's torch AdamW takes steps on the CPU and saves 16-bit weights.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmreason.config import load_config
from mmreason.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "configs" / "train"

# what each file claims: stage, backbone, ZeRO stage, workers, rows per micro-batch, accumulation,
# global batch (as its header states it), activation checkpointing
EXPECTED = {
    "internvl3-1b-cot-a100.yaml": dict(stage="cot", backbone="internvl3-1b", zero=2, workers=8, batch=4,
                                       accum=4, global_batch=128, checkpointing=False),
    "internvl3-1b-coconut-a100.yaml": dict(stage="coconut", backbone="internvl3-1b", zero=2, workers=8, batch=4,
                                           accum=4, global_batch=128, checkpointing=False),
    "anole-7b-mvot-cot-a100.yaml": dict(stage="cot", backbone="anole-7b", zero=3, workers=8, batch=1,
                                        accum=32, global_batch=256, checkpointing=True),
    "anole-7b-dare-a100.yaml": dict(stage="dare", backbone="anole-7b", zero=3, workers=4, batch=2,
                                    accum=32, global_batch=256, checkpointing=True),
    "phi4mm-cinepile-a100.yaml": dict(stage="cot", backbone="phi4-mm", zero=2, workers=8, batch=4,
                                      accum=1, global_batch=32, checkpointing=True),
}


def load(name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TRAIN / name, overrides)


def header(name: str) -> str:
    """The file's leading comment block, joined into one line of text."""
    lines = []
    for line in (TRAIN / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def test_every_a100_config_is_listed_here():
    assert sorted(p.name for p in TRAIN.glob("*-a100.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a100_config_asks_for_gpus_in_bf16_with_what_its_header_states(name):
    want = EXPECTED[name]
    cfg = load(name)
    assert cfg.stage == want["stage"] and cfg.model.backbone == want["backbone"]
    assert cfg.use_gpu and cfg.gpus_per_worker == 1 and cfg.precision == "bf16"
    assert cfg.workers == want["workers"] and cfg.cpus_per_worker * cfg.workers <= 96 - 8  # p4d: 96 vCPUs
    assert (cfg.optim.batch_size, cfg.grad_accum) == (want["batch"], want["accum"])
    assert cfg.activation_checkpointing is want["checkpointing"]
    assert cfg.optim.batch_size * cfg.grad_accum * cfg.workers == want["global_batch"]
    rows = "row" if want["batch"] == 1 else "rows"
    micro = "micro-batch" if want["accum"] == 1 else "micro-batches"
    text = header(name)
    assert (f"Global batch {want['global_batch']} = {want['batch']} {rows} × {want['accum']} {micro} × "
            f"{want['workers']} workers") in text
    # the header's command submits this very file, and says where the user's bucket goes
    assert f"python -m jobs.train configs/train/{name}" in text and "ray job submit" in text
    assert "storage=" in text and "data.path=" in text and "--check" in text
    assert cfg.storage.startswith("s3://") and cfg.data.path.startswith("s3://")
    assert cfg.init_from is not None or cfg.model.checkpoint  # a real backbone needs one of them


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a100_config_names_a_deepspeed_file_of_the_zero_stage_it_claims(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    from mmreason.train.loop import deepspeed_config

    cfg = load(name)
    path = REPO / cfg.deepspeed
    assert path.is_file(), cfg.deepspeed
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == EXPECTED[name]["zero"]
    # the loop's own merge (it refuses files that set precision or batch sizes), then DeepSpeed's
    # parser (pydantic: an unknown or misspelt ZeRO key is an error); world size 1 off a cluster
    ds = DeepSpeedConfig(deepspeed_config(cfg, path, world=1))
    assert ds.zero_config.stage == EXPECTED[name]["zero"]
    assert ds.train_micro_batch_size_per_gpu == cfg.optim.batch_size
    assert ds.gradient_accumulation_steps == cfg.grad_accum
    assert ds.bfloat16_config.enabled
    if ds.zero_config.stage == 3:  # the export gathers whole 16-bit weights from the shards
        assert ds.zero_config.gather_16bit_weights_on_model_save


def test_later_stages_start_from_the_earlier_stages_exports():
    for earlier, later in [("internvl3-1b-cot-a100.yaml", "internvl3-1b-coconut-a100.yaml"),
                           ("anole-7b-mvot-cot-a100.yaml", "anole-7b-dare-a100.yaml")]:
        first, second = load(earlier), load(later)
        assert second.init_from == f"{first.storage}/{first.run_name}/export"
        assert second.model.backbone == first.model.backbone
        assert (second.data.path, second.data.tasks, second.data.sizes) == (
            first.data.path, first.data.tasks, first.data.sizes)


def test_anole_configs_are_mvot_and_dare_as_the_seeds_ran_them():
    mvot = load("anole-7b-mvot-cot-a100.yaml")
    assert mvot.visual_thoughts.enabled and mvot.visual_thoughts.discrepancy_weight > 0
    assert mvot.eval.epoch_examples == 0  # no drawn-reply evaluation between ZeRO-3 epochs
    dare = load("anole-7b-dare-a100.yaml")
    assert (dare.dare.rho_text, dare.dare.rho_vis) == (0.7, 0.4)  # seed 002's targets
    assert dare.dare.router_fit == "none" and dare.dare.backbone == "full"
    assert dare.deepspeed == "configs/deepspeed/zero3-offload.json"


def test_zero3_offload_json_offloads_optimizer_and_parameters():
    ds = json.loads((REPO / "configs/deepspeed/zero3-offload.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    for section in ("offload_optimizer", "offload_param"):
        assert zero[section] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed refuses a torch AdamW with offload
    assert not {"bf16", "fp16", "train_batch_size"} & set(ds)  # these come from the stage config


def test_zero3_offload_engine_steps_with_torch_adamw_and_saves_16bit_weights(tmp_path):
    """A fresh process (its own torch.distributed group): the anole dare config's DeepSpeed config,
    merged as the loop merges it, drives a tiny model through deepspeed.initialize and two steps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import os, torch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from mmreason.config import load_config
        from mmreason.train.config import TrainConfig
        from mmreason.train.loop import deepspeed_config, training_deepspeed
        cfg = load_config(TrainConfig, "configs/train/anole-7b-dare-a100.yaml", ["grad_accum=1"])
        ds = deepspeed_config(cfg, cfg.deepspeed, world=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = training_deepspeed().initialize(model=model, optimizer=opt, config=ds)
        assert engine.zero_optimization_stage() == 3 and engine.zero_cpu_offload()
        x = torch.randn(cfg.optim.batch_size, 16, dtype=torch.bfloat16)
        y = torch.randint(0, 4, (cfg.optim.batch_size,))
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        engine.save_16bit_model({str(tmp_path)!r})
        print("OK", losses)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    state = torch.load(tmp_path / "pytorch_model.bin")
    assert state["0.weight"].shape == (32, 16) and state["0.weight"].dtype.is_floating_point
