"""Video QA with the Phi-4-MM family: how a video's frames enter the model (num_frames, HiCo
merging, latent thoughts after the frames), and SFT on Ray Train + DeepSpeed then inference end to
end on CinePile shards the real data job built from generated clips."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmreason.config import ConfigError, load_config
from mmreason.data.cinepile import CinepileConfig, attach_frames, pick_frames
from mmreason.data.video import write_synthetic_clip
from mmreason.models import build_tiny, load_backbone
from mmreason.models.base import VideoInput
from mmreason.data.selection import held_out_rows
from mmreason.train.config import TrainConfig
from jobs import train, video_qa
from pipelines import cinepile
from tests.media import ClipServer, cinepile_rows, write_json_rows

REPO = Path(__file__).resolve().parents[1]


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 45), (shade, 255 - shade, 40)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    return build_tiny("tiny-phi4mm", tmp_path_factory.mktemp("phi"))


def video_row(n_frames: int) -> dict:
    clips = {"c1": {"images": [_jpeg(20 * i) for i in range(n_frames)]}}
    row = {"id": "q1", "task": "cinepile", "prompt": "Frames:\n<video>\nQuestion: what?\n- A) x", "images": [],
           "steps": [], "choices": ["x", "y", "z", "u", "v"], "answer": "B", "meta": json.dumps({"clip_id": "c1"})}
    return attach_frames(row, clips, num_frames=3, keep_video=True)


def test_frames_are_picked_evenly_and_the_video_placeholder_kept_for_the_family():
    assert pick_frames(list(range(8)), 3) == [1, 4, 6] and pick_frames(list(range(2)), 3) == [0, 1]
    row = video_row(8)
    assert row["prompt"].count("<video>") == 1 and len(row["images"]) == 3


def test_phi4mm_lays_out_frames_with_and_without_hico_and_latents_come_after_them(phi):
    family = load_backbone("tiny-phi4mm", phi)
    row = video_row(8)
    plain = family.encode(row)
    assert plain.input_ids.count(family.image_token_id) == 3 * family.tokens_per_image  # 3 frames × 41
    family.video = VideoInput(use_hico=True, tokens_per_frame=4, clip_frames=2)
    hico = family.encode(row, "latent", n_latent_steps=2)
    image_positions = [i for i, t in enumerate(hico.input_ids) if t == family.image_token_id]
    latent_positions = [i for i, t in enumerate(hico.input_ids) if t == family.latent_id]
    assert len(image_positions) == 2 * 4  # frames [0, 1] and [2] → 2 clips × a 2×2 grid
    assert len(latent_positions) == 2 and min(latent_positions) > max(image_positions)
    batch = family.collate([hico, family.encode(row, "latent", n_latent_steps=2)], align_latents=True)
    from mmreason.latent.coconut import latent_forward

    loss, logits = latent_forward(family, batch)
    assert torch.isfinite(loss) and logits.shape[1] == batch["input_ids"].shape[1]
    # a clip is its frames' pooled grids averaged: changing one frame of a clip changes that clip only
    embeds = family.embed(batch)
    other = dict(batch)
    other["frame_pixel_values"] = batch["frame_pixel_values"].clone()
    other["frame_pixel_values"][2] = 0  # frame 2 = the second clip of row 0
    changed = (family.embed(other) - embeds).abs().sum(-1)[0] > 0
    assert [i for i in range(changed.shape[0]) if changed[i]] == image_positions[4:]


def test_hico_on_a_family_without_it_is_refused(tmp_path):
    cfg = load_config(TrainConfig, REPO / "configs/train/cinepile-phi4mm.yaml",
                      ["model.backbone=tiny-internvl", f"storage={tmp_path}"])
    with pytest.raises(ConfigError, match="video.use_hico: HiCo frame merging is implemented for the phi4mm family"):
        train.resolve_model_path(cfg)


@pytest.fixture(scope="module")
def cinepile_data(tmp_path_factory, ray_session):
    """Train: 2 clips × 4 questions; test: 1 clip × 4 questions (questions 1 and 3 hard) — written by
    the CinePile job from generated clips served on loopback."""
    d = tmp_path_factory.mktemp("cinepile")
    files = {f"c{i}.mp4": write_synthetic_clip(d / f"c{i}.mp4", 2, fps=8, size=(96, 64), scenes=2, gop_s=1.0,
                                                seed=i).read_bytes() for i in range(3)}
    out = {}
    with ClipServer(files) as server:
        for split, names in (("train", ["c0.mp4", "c1.mp4"]), ("test", ["c2.mp4"])):
            source = write_json_rows(d / f"{split}.json", cinepile_rows({server.url(n): 4 for n in names}))
            cfg = load_config(CinepileConfig, None, [
                f"source={source}", f"split={split}", f"output_dir={d / split}", f"download.allowed_hosts=[{server.host}]",
                "download.sleep_s=0", "download.retries=0", "frames.num_frames=4", "frames.max_side=64"])
            assert cinepile.run(cfg, log=lambda *_: None)["total_rows"] == 4 * len(names)
            out[split] = d / split
    return out


@pytest.mark.integration
def test_video_qa_sft_then_inference_end_to_end(cinepile_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(TrainConfig, REPO / "configs/train/cinepile-phi4mm.yaml", [
        f"data.path={cinepile_data['train']}", f"data.eval_path={cinepile_data['test']}", f"storage={tmp_path / 'runs'}",
        "run_name=vqa", "video={num_frames: 3, use_hico: true, tokens_per_frame: 4, clip_frames: 2}",
        "optim={lr: 0.001, batch_size: 2, epochs: 1, warmup_steps: 1}", "eval.max_examples=4", "eval.epoch_examples=2",
        "eval.modes={vanilla: {max_new_tokens: 6}}"])
    out = train.run_stage(cfg)
    # CinePile has no val split: one of the two training clips (4 questions) is carved out for the
    # per-epoch evaluation and the other one trains
    assert out["train"]["train_rows"] == 4 and out["train"]["steps_per_epoch"] == 1 and out["train"]["loss"] > 0
    assert out["eval"]["vanilla"]["n"] == 4 and out["eval"]["vanilla"]["split"] == "test"  # from data.eval_path

    # the hard-split filter on both sides: the training rows (from the Ray Dataset) and the held-out rows
    hard = load_config(TrainConfig, REPO / "configs/train/cinepile-phi4mm.yaml", [
        f"data.path={cinepile_data['train']}", f"data.eval_path={cinepile_data['test']}", "data.hard_split=true"])
    _, n_hard = train.train_dataset(hard)
    held_out = held_out_rows(hard.data, None, hard.video.num_frames)
    assert n_hard == 2 and len(held_out) == 2  # questions 1 and 3 of the clip that trains / of the test clip
    assert all(json.loads(r["meta"])["hard_split"] is True and len(r["images"]) == 4 for r in held_out)

    results_file = tmp_path / "results.json"
    args = [f"model_path={out['export']}", f"dataset_path={cinepile_data['test']}", f"output_file={results_file}",
            "video={num_frames: 3, use_hico: true, tokens_per_frame: 4, clip_frames: 2}", "generation.max_new_tokens=6"]
    assert video_qa.main(args) == 0
    results = json.loads(results_file.read_text())
    assert results["n"] == 4 and results["mode"] == "cot"
    samples = results["samples"]
    assert {s["id"] for s in samples} == {f"cinepile-test-{i:07d}" for i in range(4)}
    assert results["accuracy"] == sum(s["correct"] for s in samples) / 4
    assert {"question", "answer", "answer_key", "prediction", "output", "correct", "question_category"} <= set(samples[0])
    assert samples[0]["question"] == "What happens in question 0?" and samples[0]["answer"] == "A"
    assert results["by_hard_split"]["hard"]["n"] == 2 and results["config"]["video"]["use_hico"] is True
    assert (results["device"], results["dtype"]) == ("cpu", "torch.float32")  # answered in the Ray task

    # CoCoNuT on video: two latent thoughts after the frames, only the hard questions; in bf16
    assert video_qa.main(args + ["mode=coconut", "n_latent_steps=2", "hard_split=true", "precision=bf16"]) == 0
    latent = json.loads(results_file.read_text())
    assert latent["n"] == 2 and latent["latents_per_answer"] == 2 and latent["dtype"] == "torch.bfloat16"
    assert all(s["hard_split"] is True for s in latent["samples"])
    assert video_qa.main(args + ["mode=coconut"]) == 2  # no latent steps: a config error, exit 2


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: use_gpu is not refused here")
def test_video_qa_with_use_gpu_on_a_cluster_without_gpus_is_refused_before_the_task_starts(
        cinepile_data, phi, tmp_path, monkeypatch, capsys):
    import ray

    def no_task(*a, **k):
        raise AssertionError("an answering task was started")

    monkeypatch.setattr(ray, "remote", no_task)
    out = tmp_path / "results.json"
    assert video_qa.main([f"model_path={phi}", f"dataset_path={cinepile_data['test']}",
                          f"output_file={out}", "use_gpu=true"]) == 2
    err = capsys.readouterr().err
    assert "use_gpu" in err and "0 GPU" in err and not out.exists()


@pytest.mark.integration
def test_video_qa_under_the_hico_press_reports_kv_and_keeping_everything_changes_nothing(cinepile_data, phi, tmp_path,
                                                                                      monkeypatch, capsys):
    """`press=hico` through jobs.video_qa (the Ray task, the JSON, MLflow) on the random tiny-phi4mm:
    merging 4 frames to 2 clips of a 2×2 grid leaves a fraction of the cache and of the vision
    entries; HiCo set to keep everything answers exactly as no press; a bad press fails the check."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "results.json"
    args = [f"model_path={phi}", f"dataset_path={cinepile_data['test']}", f"output_file={out}",
            "video={num_frames: 4, use_hico: false}", "generation.max_new_tokens=6", "mode=vanilla"]

    def answered(*extra: str) -> dict:
        assert video_qa.main([*args, *extra]) == 0
        return json.loads(out.read_text())

    plain = answered()
    assert plain["press"] == {"name": "none"} and plain["n"] == 4
    assert plain["kv_fraction_prefill"] == plain["kv_fraction_peak"] == 1.0 and plain["kv_bytes_peak"] > 0
    merged = answered("press=hico", "press.tokens_per_frame=4", "press.clip_frames=2")
    assert merged["press"] == {"name": "hico", "tokens_per_frame": 4, "clip_frames": 2}
    assert merged["n"] == 4 and merged["accuracy"] == sum(s["correct"] for s in merged["samples"]) / 4
    assert merged["kv_fraction_prefill"] < 1 and merged["kv_fraction_peak"] < 1
    assert merged["kv_bytes_prefill"] < plain["kv_bytes_prefill"]
    assert merged["retained_vision_prefill"] < 0.5 < merged["retained_text_prefill"] == 1.0
    assert "press hico: KV cache" in capsys.readouterr().out
    whole = answered("press=hico", "press.tokens_per_frame=null", "press.clip_frames=1")
    assert [s["output"] for s in whole["samples"]] == [s["output"] for s in plain["samples"]]
    assert whole["kv_fraction_peak"] == 1.0

    assert video_qa.main([*args, "press=hico", "press.clip_frames=0", "--check"]) == 2
    assert "clip_frames must be >= 1, got 0" in capsys.readouterr().err
    assert video_qa.main([*args, "press=dare", "--check"]) == 2
    assert "press.router_path: press 'dare' needs it" in capsys.readouterr().err
