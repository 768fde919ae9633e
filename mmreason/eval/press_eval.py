"""Accuracy against memory: evaluate a checkpoint under a press (`python -m jobs.evaluate`).

One run = one (checkpoint, mode, press) point: the held-out rows of `data` go through
`mmreason.eval.runner.evaluate` (the batched cached generation every stage is evaluated with)
inside `with press(family)` and a `KVMeter`; the result row holds accuracy, tokens per answer, KV
bytes per example after the prompt and at the decoding peak (and what the full cache would hold),
retained fraction per modality, prefill latency, decode tokens/s and the press's own time. It is
written as JSON (with per-layer bytes and the predictions) and appended to a CSV under
`output_dir`, and logged to MLflow (`mmreason.tracking`).

Three steps, so the measuring can run where the hardware is: `prepare_press_eval` (every check,
no model), `measure_press` (load the model in `precision` on `local_device(use_gpu)`, evaluate;
plain data back — `jobs.evaluate` runs it in a Ray task, a sweep trial in its own process) and
`record_press_eval` (files and MLflow). `run_press_eval` is the three in this process.
"""

from __future__ import annotations

import csv
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from mmreason import storage
from mmreason.config import ConfigError
from mmreason.data.selection import DataConfig, held_out_rows
from mmreason.hardware import torch_dtype
from mmreason.latent.coconut import GenerationSettings
from mmreason.models import ModelConfig

CSV_COLUMNS = (
    "run_name", "backbone", "checkpoint", "split", "mode", "press", "press_settings", "n", "accuracy", "tokens_per_answer",
    "kv_bytes_prefill", "kv_bytes_peak", "kv_bytes_full_prefill", "kv_bytes_full_final", "kv_fraction_prefill",
    "kv_fraction_peak", "retained_text_prefill", "retained_vision_prefill", "retained_shared_prefill",
    "retained_text_final", "retained_vision_final", "prefill_ms_per_example", "decode_tokens_per_s",
    "press_seconds", "press_fraction_of_decode", "seconds",
)


@dataclass
class PressEvalConfig:
    run_name: str = "press-eval"
    output_dir: str = "runs/eval"
    """results.csv (one row per run) and RUN_NAME/{result.json, predictions.jsonl} go here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and the checkpoint to evaluate (required: a stage's `export` or `best`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Held-out rows: `data.path`, `tasks`, `sizes`, `eval_split`."""
    mode: Literal["vanilla", "cot", "coconut"] = "cot"
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=200))
    n_latent_steps: int = 0
    """coconut mode: latent steps (× c_thought latents)."""
    c_thought: int = 1
    max_examples: int | None = 100
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None
    """torch threads, and the CPUs `jobs.evaluate`'s evaluation task asks Ray for (None: 1 CPU, and
    Ray sets a 1-CPU task's OMP_NUM_THREADS, hence torch's threads, to 1)."""
    use_gpu: bool = False
    """Evaluate on a GPU: `jobs.evaluate`'s task asks Ray for one (refused where the cluster has none)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype the model is loaded in and generates in."""
    press: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    """`name` (none, tova, dare, cosre, hico, kvpress:<method>) and the press's settings."""
    experiment: str = "mmreason"

    def __post_init__(self) -> None:
        torch_dtype(self.precision)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1 or null, got {self.max_examples}")
        if not isinstance(self.press.get("name"), str):
            raise ConfigError(f"press: needs a name (press=NAME), got {self.press!r}")


def build_press(cfg: Any) -> Any:
    """The press a config's `press` field ({name, settings...}: jobs.evaluate's, jobs.video_qa's)
    names (None for "none"), checked before any model loads."""
    from mmreason.kv import make_press

    settings = {k: v for k, v in cfg.press.items() if k != "name"}
    return make_press(cfg.press["name"], settings)


def check_inputs(cfg: PressEvalConfig) -> str:
    """Everything a user can get wrong that does not need the model; returns the checkpoint path."""
    from mmreason.models import CheckpointError, check_checkpoint, get_spec

    try:
        spec = get_spec(cfg.model.backbone)
    except ValueError as exc:
        raise ConfigError(f"model.backbone: {exc}") from None
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: give the checkpoint to evaluate (a stage's export/ or best/ folder)")
    remote = "://" in cfg.model.checkpoint  # s3:// or gs:// (anything else is refused, naming the setting)
    if remote:
        cfg.model.checkpoint = storage.check_location(cfg.model.checkpoint, "model.checkpoint")
    if spec.tiny or remote or Path(cfg.model.checkpoint).exists():
        try:
            check_checkpoint(cfg.model.backbone, cfg.model.checkpoint)
        except CheckpointError as exc:
            raise ConfigError(f"model.checkpoint: {exc}") from None
        return cfg.model.checkpoint if remote else str(Path(cfg.model.checkpoint).resolve())
    return cfg.model.checkpoint


def held_out(cfg: PressEvalConfig) -> list[dict[str, Any]]:
    if not storage.exists(storage.join(cfg.data.path, "manifest.json")):
        raise FileNotFoundError(f"data.path {cfg.data.path} is not a dataset (no manifest.json)")
    rows = held_out_rows(cfg.data, cfg.max_examples)  # the training stages' own reader of held-out rows
    if not rows:
        raise ConfigError(f"data: no {cfg.data.evaluated_split} rows for tasks {cfg.data.tasks} and sizes {cfg.data.sizes} "
                          f"in {cfg.data.path}")
    return rows


def prepare_press_eval(cfg: PressEvalConfig) -> str:
    """Every check that needs no model — the press, the backbone and checkpoint, the held-out rows —
    with the data paths made absolute for a process elsewhere; returns the checkpoint to load."""
    build_press(cfg)
    cfg.output_dir = storage.check_location(cfg.output_dir, "output_dir")
    cfg.data.path = storage.check_location(cfg.data.path, "data.path")
    if cfg.data.eval_path is not None:
        cfg.data.eval_path = storage.check_location(cfg.data.eval_path, "data.eval_path")
    checkpoint = check_inputs(cfg)
    held_out(cfg)
    return checkpoint


@contextmanager
def metered_press(family: Any, press: Any) -> Iterator[Any]:
    """Generation on `family` under `press` (None: no press) with its KV cache metered: yields the
    `KVMeter` (`kv_columns` reads it after)."""
    from mmreason.kv.accounting import KVMeter

    with (press(family) if press is not None else nullcontext()) as session, KVMeter(family.model, session) as meter:
        yield meter


def kv_columns(meter: Any, tokens: int) -> dict[str, Any]:
    """A result's KV and timing columns from a finished `metered_press` that generated `tokens`:
    KV bytes per example after the prompt and at the decoding peak (and uncompressed), their
    fractions, retained fraction per modality, prefill ms per example, decode tokens/s and the
    press's own seconds."""
    kv = meter.summary()
    stats = meter.session.stats if meter.session is not None else {}
    return {**{k: v for k, v in kv.items() if not isinstance(v, list)},
            "decode_tokens_per_s": tokens / kv["decode_seconds"] if kv.get("decode_seconds") else 0.0,
            "press_seconds": stats.get("press_seconds", 0.0),
            "press_prefill_seconds": stats.get("press_prefill_seconds", 0.0),
            # the press's own time in decode steps over the decode time (prompt-time work is in prefill)
            "press_fraction_of_decode": stats.get("press_decode_seconds", 0.0) / max(kv.get("decode_seconds", 0.0),
                                                                                    1e-9)}


def measure_press(cfg: PressEvalConfig, checkpoint: str, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Load the model in `cfg.precision` on `local_device(cfg.use_gpu)`, evaluate the held-out rows
    (`rows`, else `data`'s) under the press with the KV cache metered; returns plain data
    (`record_press_eval` writes it): the result row, accuracy by size, per-layer bytes and the predictions."""
    import torch

    from mmreason.eval.runner import evaluate
    from mmreason.hardware import local_device
    from mmreason.models import load_backbone

    press = build_press(cfg)
    rows = held_out(cfg) if rows is None else rows
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    family = load_backbone(cfg.model.backbone, checkpoint, dtype=torch_dtype(cfg.precision))
    family.model.to(local_device(cfg.use_gpu))
    t0 = time.perf_counter()
    with metered_press(family, press) as meter:
        result = evaluate(family, rows, cfg.mode, cfg.generation, n_latent_steps=cfg.n_latent_steps,
                          c_thought=cfg.c_thought, batch_size=cfg.batch_size, seed=cfg.seed)
    seconds = time.perf_counter() - t0
    kv = meter.summary()
    name = cfg.press["name"]
    settings = {k: v for k, v in cfg.press.items() if k != "name"}
    row: dict[str, Any] = {
        "run_name": cfg.run_name, "backbone": cfg.model.backbone, "checkpoint": checkpoint, "split": cfg.data.evaluated_split,
        "mode": cfg.mode,
        "press": name, "press_settings": json.dumps(settings, sort_keys=True), "n": result.n,
        "accuracy": result.accuracy, "tokens_per_answer": result.tokens_per_answer,
        **kv_columns(meter, sum(p["n_tokens"] for p in result.predictions)), "seconds": seconds,
    }
    return {"row": row, "accuracy_by_size": result.by("size"),
            "kv_bytes_prefill_per_layer": kv.get("kv_bytes_prefill_per_layer"),
            "kv_bytes_peak_per_layer": kv.get("kv_bytes_peak_per_layer"), "predictions": result.predictions,
            "device": str(family.model.device), "dtype": str(family.model.dtype)}


def record_press_eval(cfg: PressEvalConfig, measured: dict[str, Any]) -> dict[str, Any]:
    """Write `measure_press`'s result — RUN_NAME/result.json and predictions.jsonl, a row of
    results.csv under `output_dir` — and log it to MLflow; returns the row."""
    import tempfile

    row = measured["row"]
    detail = {"row": row, "accuracy_by_size": measured["accuracy_by_size"], "config": asdict(cfg),
              "device": measured["device"], "dtype": measured["dtype"],
              "kv_bytes_prefill_per_layer": measured["kv_bytes_prefill_per_layer"],
              "kv_bytes_peak_per_layer": measured["kv_bytes_peak_per_layer"]}
    with tempfile.TemporaryDirectory() as tmp:  # written whole, then put in place (a local dir or a bucket)
        out_dir = Path(tmp) / cfg.run_name
        out_dir.mkdir()
        (out_dir / "result.json").write_text(json.dumps(detail, indent=2))
        (out_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in measured["predictions"]))
        for name in ("result.json", "predictions.jsonl"):
            storage.write_bytes_atomic(storage.join(cfg.output_dir, cfg.run_name, name), (out_dir / name).read_bytes())
        append_csv(storage.join(cfg.output_dir, "results.csv"), row)
        _track(cfg, row, out_dir)
    return row


def run_press_eval(cfg: PressEvalConfig, log=print) -> dict[str, Any]:
    """Check inputs, evaluate under the press in this process, write JSON + CSV, log to MLflow;
    returns the row. (A sweep trial calls this: it already holds its CPUs and GPU.)"""
    checkpoint = prepare_press_eval(cfg)
    return record_press_eval(cfg, measure_press(cfg, checkpoint))


def append_csv(location: str | Path, row: dict[str, Any]) -> None:
    """One row more in the CSV at `location` (header first when new). A local file is appended to
    (concurrent sweep trials share one); an object has no append, so it is rewritten whole, atomically."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    if storage.is_remote(location):
        old = storage.read_text(location) if storage.exists(location) else ""
        if not old:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        storage.write_text_atomic(location, old + buffer.getvalue())
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        writer.writeheader()
    writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    with open(path, "a", newline="") as fh:
        fh.write(buffer.getvalue())


def _track(cfg: PressEvalConfig, row: dict[str, Any], out_dir: Path) -> None:
    import mlflow

    from mmreason.tracking import stage_run

    with stage_run(cfg.experiment, cfg.run_name, asdict(cfg), tags={"stage": "evaluate", "press": row["press"]}):
        mlflow.log_metrics({k: float(v) for k, v in row.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifacts(str(out_dir), artifact_path="evaluate")


def results_table(rows: dict[str, Any] | list[dict[str, Any]]) -> str:
    """A fixed-width table of evaluation rows (one row, or several: a press per line)."""
    rows = [rows] if isinstance(rows, dict) else rows
    keys = ("press", "accuracy", "kv_fraction_prefill", "kv_fraction_peak", "retained_text_prefill",
            "retained_vision_prefill", "prefill_ms_per_example", "decode_tokens_per_s")
    cells = [[f"{row.get(k, ''):.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
             for row in rows]
    width = [max(len(k), *(len(c[i]) for c in cells)) + 2 for i, k in enumerate(keys)]
    lines = ["".join(k.rjust(w) for k, w in zip(keys, width))]
    lines += ["".join(c.rjust(w) for c, w in zip(line, width)) for line in cells]
    return "\n".join(lines)
