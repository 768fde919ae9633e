"""Video QA inference on CinePile-format shards (seed 004's `inference_phi4_on_cinepile.py`):
answer the questions with a trained model and write a results JSON.

    python -m jobs.video_qa [CONFIG.yaml] [key=value ...] [--check]
    mmreason infer cinepile configs/infer/cinepile.yaml model_path=runs/train/cinepile-phi4mm/export \\
        dataset_path=runs/data/cinepile-test hard_split=true video.num_frames=8 video.use_hico=true
    mmreason infer cinepile configs/infer/cinepile.yaml video.use_hico=false press=hico press.tokens_per_frame=4

The JSON (`output_file`) holds the accuracy (CinePile's official scoring of the whole reply, or
ours with `scoring=lenient`; `scoring` says which), accuracy by question category and hard split,
tokens per answer, the config, and per question: id, question, right letter and option, predicted
letter, full output, correct. `mode: coconut` with `n_latent_steps` puts latent thoughts after the
frames. `press=NAME` with `press.key=value` answers under a KV-cache press, as `jobs.evaluate`
takes them (`press=hico`: HiCo on the cached frames, `mmreason.kv.hico`; `video.use_hico` is HiCo's
frame merge inside the model, before the language model); the JSON then holds the KV columns
`jobs.evaluate` reports too — KV bytes after the prompt and at the peak, their fractions of the
uncompressed cache, retained fraction per modality (`kv_columns`; with no press the fractions are 1).
Logged to MLflow as a run (params: the config, `scoring` included) with the JSON as an artifact.

The questions are picked and every setting checked here (`use_gpu` against the cluster's GPUs
too); the model is loaded in `precision` and answers in a Ray task that asks for `threads` CPUs
(1 by default) and, with `use_gpu`, one GPU — not in this driver, which on a cluster sits on a
head node with no CPUs for Ray work. The JSON is written and logged here. `--check` runs every
check, prints the resolved config, the checkpoint, the questions, the device and precision and the
task's resources, and loads no model, starts no task and writes nothing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from mmreason import console
from mmreason.cli_args import job_main, parse_job_args, print_check
from mmreason.config import ConfigError, from_dict
from mmreason.hardware import torch_dtype
from mmreason.latent.coconut import GenerationSettings
from mmreason.models.base import VideoInput


@dataclass
class VideoQAConfig:
    model_path: str = "runs/train/cinepile-phi4mm/export"
    """A trained checkpoint (an export of jobs.train) or a real backbone's checkpoint / hub id."""
    backbone: str = "tiny-phi4mm"
    dataset_path: str = "runs/data/cinepile"
    """A CinePile dataset directory written by `mmreason data cinepile`."""
    split: Literal["train", "test"] = "test"
    output_file: str = "runs/cinepile_results.json"
    mode: Literal["vanilla", "cot", "coconut"] = "cot"
    scoring: Literal["official", "lenient"] = "official"
    """official: CinePile's evaluation code on the whole reply; lenient: ours, which also reads the
    `The answer is X.` our models end with (`mmreason.eval.cinepile`)."""
    n_latent_steps: int = 0
    """coconut mode: latent steps after the frames (× c_thought latents)."""
    c_thought: int = 1
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=64))
    video: VideoInput = field(default_factory=VideoInput)
    """num_frames, use_hico (as the model was trained)."""
    hard_split: bool | None = None
    """Only hard (true) or not-hard (false) questions; null = both."""
    visual_reliance: bool | None = None
    """Only questions that do (true) or do not (false) rely on the visuals; null = both."""
    max_videos: int | None = None
    """At most this many clips (their questions), in shard order."""
    batch_size: int = 8
    seed: int = 0
    threads: int | None = None
    """torch threads, and the CPUs the answering task asks Ray for (None: 1 CPU, hence 1 thread)."""
    use_gpu: bool = False
    """Answer on a GPU: the task asks Ray for one (refused where the cluster has none)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype the model is loaded in and generates in."""
    press: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    """KV-cache press while answering: `name` (none, hico, tova, cosre, kvpress:<method>, … as in
    jobs.evaluate) and its settings (`press=hico press.tokens_per_frame=4`)."""
    experiment: str = "mmreason"

    def __post_init__(self) -> None:
        torch_dtype(self.precision)
        if not isinstance(self.press.get("name"), str):
            raise ConfigError(f"press: needs a name (press=NAME), got {self.press!r}")
        if self.mode == "coconut" and self.n_latent_steps < 1:
            raise ConfigError("n_latent_steps must be >= 1 in coconut mode")
        if self.max_videos is not None and self.max_videos < 1:
            raise ConfigError(f"max_videos must be >= 1 or null, got {self.max_videos}")


METRICS = ("accuracy", "tokens_per_answer", "prefill_ms_per_example", "decode_tokens_per_s")
"""Logged to MLflow, with every `kv_*` and `retained_*` column."""


def task_resources(cfg: VideoQAConfig) -> dict[str, float]:
    """What the answering task asks Ray for."""
    return {"CPU": cfg.threads or 1, "GPU": 1 if cfg.use_gpu else 0}


def prepare(cfg: VideoQAConfig) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Every check before the model loads — the press, the backbone, HiCo, the checkpoint, the dataset and its
    questions, then `use_gpu` against the cluster's GPUs (starts or joins Ray). Returns the paths as
    the task must see them and the picked questions."""
    from mmreason.eval.press_eval import build_press
    from mmreason.eval.video_qa import select_questions
    from mmreason.hardware import require_gpus
    from mmreason.models import CheckpointError, check_checkpoint, get_spec
    from pipelines import cluster_gpus

    build_press(cfg)  # the press and its settings (a DARE router file too)
    try:
        spec = get_spec(cfg.backbone)
    except ValueError as exc:
        raise ConfigError(f"backbone: {exc}") from None
    if cfg.video.use_hico and spec.family.name != "phi4mm":
        raise ConfigError(f"video.use_hico: HiCo frame merging is implemented for the phi4mm family, not {cfg.backbone}")
    if spec.tiny or Path(cfg.model_path).exists():  # else a real backbone's hub id
        try:
            check_checkpoint(cfg.backbone, cfg.model_path)
        except CheckpointError as exc:
            raise ConfigError(f"model_path: {exc}") from None
    if not (Path(cfg.dataset_path) / "manifest.json").is_file():
        raise FileNotFoundError(f"dataset_path {cfg.dataset_path} has no manifest.json (write it with mmreason data cinepile)")
    rows = select_questions(cfg.dataset_path, cfg.split, cfg.hard_split, cfg.visual_reliance, cfg.max_videos)
    if not rows:
        raise ConfigError(f"no {cfg.split} questions in {cfg.dataset_path} pass hard_split={cfg.hard_split}, "
                          f"visual_reliance={cfg.visual_reliance}")
    # the task may run in another directory (or on another node): paths as this process sees them
    local = {"dataset_path": str(Path(cfg.dataset_path).resolve())}
    if Path(cfg.model_path).exists():
        local["model_path"] = str(Path(cfg.model_path).resolve())
    now, scalable = cluster_gpus()  # starts or joins Ray
    require_gpus(cfg.use_gpu, task_resources(cfg)["GPU"], now, scalable=scalable)
    return local, rows


def check(cfg: VideoQAConfig) -> dict[str, Any]:
    """`--check`: `prepare`, and what the run would answer, where, and write."""
    import ray

    from mmreason.tracking import family_experiment, tracking_uri

    local, rows = prepare(cfg)
    clips = {json.loads(row["meta"]).get("clip_id") for row in rows}
    return {"config": asdict(cfg), "checkpoint": local.get("model_path", cfg.model_path),
            "dataset": local["dataset_path"], "rows": len(rows), "clips": len(clips), "press": cfg.press,
            "device": "cuda" if cfg.use_gpu else "cpu", "precision": cfg.precision, "task": task_resources(cfg),
            "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
            "writes": {"results": str(Path(cfg.output_file).resolve()),
                       "mlflow": {"tracking_uri": tracking_uri(),
                                  "experiment": family_experiment(cfg.experiment, "video-qa")}}}


def run(cfg: VideoQAConfig) -> dict:
    """Check, pick the questions, answer them in a Ray task where the hardware is, write and log
    the JSON here; returns the results."""
    import mlflow
    import ray

    from mmreason.data.shards import write_json_atomic
    from mmreason.tracking import stage_run

    local, rows = prepare(cfg)
    res = task_resources(cfg)
    task = ray.remote(num_cpus=res["CPU"], num_gpus=res["GPU"])(_answer_task)
    results = ray.get(task.remote({**asdict(cfg), **local}, rows))
    results = {"accuracy": results.pop("accuracy"), "n": results.pop("n"), "press": cfg.press, **results,
               "config": asdict(cfg)}
    out = Path(cfg.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    with stage_run(cfg.experiment, f"video-qa-{Path(cfg.model_path).parent.name}", asdict(cfg),
                   tags={"stage": "video-qa"}):
        mlflow.log_metrics({k: float(v) for k, v in results.items() if k in METRICS or k.startswith(("kv_", "retained_"))})
        mlflow.log_artifact(str(out))
    return results


def answer(cfg: VideoQAConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Load the model in `precision` on `local_device(use_gpu)`, join the questions' frames and
    answer them under the press (`mmreason.eval.video_qa.answer_questions`)."""
    import torch

    from mmreason.data.cinepile import video_rows
    from mmreason.eval.press_eval import build_press
    from mmreason.eval.video_qa import answer_questions
    from mmreason.hardware import local_device
    from mmreason.models import load_backbone

    press = build_press(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    family = load_backbone(cfg.backbone, cfg.model_path, dtype=torch_dtype(cfg.precision))
    family.model.to(local_device(cfg.use_gpu))
    family.video = cfg.video
    rows = video_rows(rows, cfg.dataset_path, cfg.video.num_frames)
    results = answer_questions(family, rows, cfg.mode, cfg.generation, cfg.n_latent_steps, cfg.c_thought,
                               cfg.batch_size, cfg.seed, cfg.scoring, press)
    return {**results, "device": str(family.model.device), "dtype": str(family.model.dtype)}


def _answer_task(cfg_dict: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return answer(from_dict(VideoQAConfig, cfg_dict), rows)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    from jobs.evaluate import load

    args = parse_job_args("python -m jobs.video_qa", __doc__, argv)
    cfg = load(args.config, args.overrides, VideoQAConfig)
    if args.check:
        print_check(check(cfg))
        return 0
    with console.session(Path(cfg.output_file).parent, "video_qa", args.verbose):
        with console.step(f"video QA: {cfg.mode}, press {cfg.press['name']}") as step:
            results = run(cfg)
            step.done(f"accuracy {results['accuracy']:.3f} on {results['n']} questions")
        _print_results(cfg, results)
    return 0


def _print_results(cfg: VideoQAConfig, results: dict[str, Any]) -> None:
    console.echo(f"accuracy {results['accuracy']:.3f} on {results['n']} questions ({cfg.mode}, {cfg.scoring} scoring); "
                 + ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in results["by_hard_split"].items()))
    console.echo(f"press {cfg.press['name']}: KV cache {results['kv_fraction_prefill']:.3f} of the uncompressed after "
                 f"the prompt, {results['kv_fraction_peak']:.3f} at the peak")
    console.echo(f"results: {cfg.output_file}")


if __name__ == "__main__":
    sys.exit(main())
