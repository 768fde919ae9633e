"""Device and precision, from the config: one place that turns `use_gpu` / `precision` into a torch
device, a dtype and DeepSpeed's precision section, and that refuses GPUs a cluster does not have.

Nothing here assumes CUDA: on a machine without it the same calls give the CPU and fp32/bf16
(DeepSpeed's CPU accelerator runs bf16), so the CPU tests cover the logic the GPU path takes.
"""

from __future__ import annotations

from typing import Any

import torch

from mmreason.config import ConfigError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(precision: str, setting: str = "precision") -> torch.dtype:
    """The parameter dtype of `precision` (fp32 | bf16 | fp16); anything else is an error naming `setting`."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ConfigError(f"{setting}: unknown precision {precision!r} (known: {', '.join(PRECISIONS)})") from None


def deepspeed_precision(precision: str) -> dict[str, Any]:
    """DeepSpeed's precision section: bf16 (A100/H100; master weights and optimizer state stay fp32),
    fp16 with dynamic loss scaling (older GPUs), or nothing for fp32."""
    torch_dtype(precision)
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 2, "min_loss_scale": 1}}
    return {}


def local_device(use_gpu: bool) -> torch.device:
    """The device of a process that is not a Ray Train worker (an evaluation task, a script): the
    GPU Ray assigned it (`CUDA_VISIBLE_DEVICES` then holds just that one) or the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("use_gpu: true, but this process sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


def require_gpus(use_gpu: bool, wanted: float, available: float, setting: str = "use_gpu",
                 scalable: float = 0.0) -> None:
    """Refuse `use_gpu` before anything starts when one worker (or trial) needs more GPUs than the
    cluster has (`available`, what Ray reports: 0 on a CPU machine) and than any node its autoscaler
    can still start has (`scalable`)."""
    if use_gpu and available < wanted and scalable < wanted:
        hint = " (this machine has no GPU: set use_gpu=false)" if not available and not scalable else ""
        raise ConfigError(f"{setting}: true asks for {wanted:g} GPU(s) per worker, but the cluster has "
                          f"{available:g} GPU(s) and its autoscaler can add nodes of at most {scalable:g}{hint}")


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """`batch`'s tensors on `device`; floating-point ones (pixel values, masks of weights) in `dtype`
    when given — integer ids and masks keep theirs."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
        out[key] = value
    return out
