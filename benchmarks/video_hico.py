"""HiCo as a KV press on video QA: accuracy and KV cache against no press, on the CinePile test data
the video QA tests use — synthetic clips (`write_synthetic_clip`) served on loopback
(`tests.media.ClipServer`), CinePile-format questions (`tests.media.cinepile_rows`), written by the
real CinePile data job — and a tiny-phi4mm (`build_tiny`, random weights: no video model is trained
here, so accuracy is near chance, 1 in 5, and says nothing about HiCo; what the numbers show is the
KV cache each setting keeps, the prefill time, and how far it moves the model's next-token
distribution from no press's: the mean KL divergence, over the questions, of the first answer token
the press can change — the second; it compresses after the prompt's forward).

    python benchmarks/video_hico.py [--clips 4] [--questions 5] [--frames 8] [--out benchmarks/results/video_hico.json]

Each setting answers every question through `jobs.video_qa.answer` (what `mmreason infer cinepile`
runs in its Ray task, here in this process) with `press=hico` and its settings; the KV columns are
`jobs.evaluate`'s (`mmreason.eval.press_eval.kv_columns`). HiCo keeping everything must answer
exactly as no press (checked). `video.use_hico` — HiCo's merge inside the model, before the
language model — is measured alongside: its prompt is shorter, so its own KV fraction is 1; the
bytes against no press's (`kv_bytes_prefill_vs_none`) compare it with the press.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.video_qa import VideoQAConfig, answer  # noqa: E402
from mmreason.config import load_config  # noqa: E402
from mmreason.data.cinepile import CinepileConfig  # noqa: E402
from mmreason.data.video import write_synthetic_clip  # noqa: E402
from mmreason.eval.video_qa import select_questions  # noqa: E402
from mmreason.models import build_tiny  # noqa: E402
from mmreason.models.base import VideoInput  # noqa: E402
from mmreason.data.cinepile import video_rows  # noqa: E402
from mmreason.kv import make_press  # noqa: E402
from mmreason.latent.coconut import GenerationSettings, generate  # noqa: E402
from mmreason.models import load_backbone  # noqa: E402
from pipelines import cinepile, init_ray  # noqa: E402
from tests.media import ClipServer, cinepile_rows, write_json_rows  # noqa: E402

SETTINGS = [  # (label, press, video.use_hico)
    ("none", {"name": "none"}, False),
    ("hico keeps everything", {"name": "hico", "tokens_per_frame": None, "clip_frames": 1}, False),
    ("hico 16/frame", {"name": "hico", "tokens_per_frame": 16, "clip_frames": 1}, False),
    ("hico 4/frame, clips of 2", {"name": "hico", "tokens_per_frame": 4, "clip_frames": 2}, False),
    ("hico 4/frame, clips of 2, drop 1/2 from layer 1",
     {"name": "hico", "tokens_per_frame": 4, "clip_frames": 2, "drop_from_layer": 1, "drop_keep": 0.5}, False),
    ("video.use_hico 4/frame, clips of 2 (in the model)", {"name": "none"}, True),
]
KEPT = ("accuracy", "n", "tokens_per_answer", "kv_bytes_prefill", "kv_bytes_peak", "kv_bytes_full_prefill",
        "kv_fraction_prefill", "kv_fraction_peak", "retained_text_prefill", "retained_vision_prefill",
        "prefill_ms_per_example", "decode_tokens_per_s", "press_prefill_seconds")


def write_dataset(root: Path, clips: int, questions: int, frames: int) -> Path:
    """The CinePile job's test split of `clips` synthetic clips × `questions` questions (as the
    tests' `cinepile_data` fixture writes it, larger)."""
    files = {f"c{i}.mp4": write_synthetic_clip(root / f"c{i}.mp4", 2, fps=8, size=(96, 64), scenes=2, gop_s=1.0,
                                                seed=i).read_bytes() for i in range(clips)}
    out = root / "test"
    with ClipServer(files) as server:
        source = write_json_rows(root / "test.json", cinepile_rows({server.url(n): questions for n in files}))
        cfg = load_config(CinepileConfig, None, [
            f"source={source}", "split=test", f"output_dir={out}", f"download.allowed_hosts=[{server.host}]",
            "download.sleep_s=0", "download.retries=0", f"frames.num_frames={frames}", "frames.max_side=64"])
        written = cinepile.run(cfg, log=lambda *_: None)["total_rows"]
    assert written == clips * questions, f"the data job wrote {written} of {clips * questions} rows"
    return out


def second_token_logprobs(cfg: VideoQAConfig, rows: list[dict]) -> Iterator[torch.Tensor]:
    """(questions, vocab) log-probabilities of each answer's second token (greedy, one question at
    a time) under `cfg`'s press: the first token whose forward reads the compressed cache."""
    family = load_backbone(cfg.backbone, cfg.model_path)
    family.video = cfg.video
    press = make_press(cfg.press["name"], {k: v for k, v in cfg.press.items() if k != "name"})
    seen: list[torch.Tensor] = []
    hook = family.model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(out.logits[:, -1].float().log_softmax(-1)), with_kwargs=True)
    try:
        for row in video_rows(rows, cfg.dataset_path, cfg.video.num_frames):
            batch = family.collate([family.encode(row, "vanilla", with_target=False)], pad_side="left")
            seen.clear()
            with torch.no_grad(), (press(family) if press is not None else nullcontext()):
                generate(family, batch, 0, GenerationSettings(max_new_tokens=2))
            yield seen[1][0]
    finally:
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--questions", type=int, default=5, help="questions per clip")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (stored and given to the model)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/video_hico.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_ray(num_cpus=2)  # the CinePile data job runs on Ray
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp), args.clips, args.questions, args.frames)
        model = build_tiny("tiny-phi4mm", Path(tmp) / "phi")
        base = load_config(VideoQAConfig, REPO / "configs/infer/cinepile.yaml", [
            f"model_path={model}", f"dataset_path={data}", "max_videos=null", "threads=1",
            f"generation.max_new_tokens={args.max_new_tokens}"])
        rows = select_questions(data, "test")
        results, outputs, logprobs = [], {}, {}
        for label, press, use_hico in SETTINGS:
            video = VideoInput(num_frames=args.frames, use_hico=use_hico, tokens_per_frame=4, clip_frames=2)
            cfg = replace(base, press=press, video=video)
            out = answer(cfg, rows)
            outputs[label] = [s["output"] for s in out["samples"]]
            same = sum(a == b for a, b in zip(outputs[label], outputs["none"])) / len(rows)
            logprobs[label] = torch.stack(list(second_token_logprobs(cfg, rows)))
            p_none = logprobs["none"].exp()
            kl = float((p_none * (logprobs["none"] - logprobs[label])).sum(-1).mean())
            top1 = float((logprobs[label].argmax(-1) == logprobs["none"].argmax(-1)).float().mean())
            results.append({"setting": label, "press": press, "video_use_hico": use_hico,
                            **{k: out.get(k) for k in KEPT}, "same_output_as_none": same,
                            "distinct_outputs": len(set(outputs[label])),
                            "second_token_kl_from_none": kl, "second_token_top1_as_none": top1})
            print(f"{label:<52} acc {out['accuracy']:.3f}  kv prefill {out['kv_fraction_prefill']:.3f}  "
                  f"peak {out['kv_fraction_peak']:.3f}  vision kept {out.get('retained_vision_prefill', 1.0):.3f}  "
                  f"same as none {same:.2f}  KL {kl:.2e}", flush=True)
    none = results[0]
    for r in results:
        r["kv_bytes_prefill_vs_none"] = r["kv_bytes_prefill"] / none["kv_bytes_prefill"]
        r["kv_bytes_peak_vs_none"] = r["kv_bytes_peak"] / none["kv_bytes_peak"]
    assert results[1]["same_output_as_none"] == 1.0, "HiCo keeping everything must answer as no press"
    assert results[1]["second_token_kl_from_none"] < 1e-6, "HiCo keeping everything must not move the logits"
    report = {
        "what": "HiCo KV press on CinePile-format video QA (benchmarks/video_hico.py)",
        "model": "tiny-phi4mm, random weights (build_tiny): accuracy is near chance (5 options), not a HiCo result",
        "data": {"clips": args.clips, "questions_per_clip": args.questions, "questions": len(rows),
                 "frames_per_clip": args.frames, "source": "write_synthetic_clip + tests.media.cinepile_rows, "
                                                           "written by pipelines.cinepile"},
        "mode": base.mode, "scoring": base.scoring, "max_new_tokens": args.max_new_tokens,
        "machine": {"cpus": os.cpu_count(), "torch_threads": 1, "platform": platform.platform()},
        "seconds": time.perf_counter() - t0, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
