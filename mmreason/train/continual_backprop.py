"""Continual backprop (Dohare et al., "Loss of plasticity in deep continual learning", Nature 2024;
shibhansh/loss-of-plasticity) on the MLP hidden units of a backbone — seed 004's "continual
propagation".

Every MLP hidden unit i (the input of `down_proj`, or of `fc2` in a plain MLP) has a utility

    u_i ← η·u_i + (1 − η)·|h_i|·Σ_k |w_out[k, i]|

with |h_i| the unit's mean absolute activation over the step's training tokens and w_out the
outgoing weights. Every `apply_freq` steps, each MLP adds `replacement_rate` × (its units older than
`maturity_threshold` steps) to an accumulator and replaces ⌊accumulator⌋ of them (keeping the
fraction for later), the eligible units of lowest bias-corrected utility u / (1 − η^age): incoming
weights (the unit's rows of gate/up or fc1; biases 0) are drawn afresh from the model's own init
distribution N(0, initializer_range), outgoing weights (its column of down_proj / fc2) set to 0, so
the network computes exactly the same function at the moment of replacement; the optimizer state of
those entries is zeroed, and utility and age restart at 0.

Where the weights live depends on the engine (`bind`):
- plain torch: the parameters and `optimizer.state[param]`.
- DeepSpeed ZeRO-1/2: every rank holds the full model weights, but the fp32 master weights and the
  AdamW moments are flat partitions spread over the ranks. A replacement writes the model weights on
  every rank and, on each rank, the slice of master weights and moments it owns (through the
  parameter's `_hp_mapping` addresses); no collective is needed. Utilities are averaged over the
  ranks (all-reduce) before every replacement and the new weights come from a generator seeded by
  (seed, step), so every rank replaces the same units with the same values.
- DeepSpeed ZeRO-3: the weights are partitioned too. Reading |w_out| and replacing go through
  DeepSpeed's collective API (`GatheredParameters`, `safe_get/set_full_fp32_param`,
  `safe_get/set_full_optimizer_state`): correct, but every step gathers each down_proj once and every
  replacement gathers the affected matrices and their optimizer states — traffic that grows with the
  model, so `apply_freq` should be large there.

`state_dict()` / `load_state_dict()` carry utilities, ages and accumulators across checkpoints and
from one dataset to the next (the training job saves them next to an export), so training over
several datasets in sequence is one continual run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmreason.config import ConfigError

STATE_FILE = "continual_backprop.pt"


@dataclass
class ContinualBackpropConfig:
    enabled: bool = False
    """Track utilities and replace low-utility MLP units during training."""
    replacement_rate: float = 1e-4
    """Fraction of eligible units replaced per application (fractions accumulate across applications)."""
    maturity_threshold: int = 100
    """Training steps a unit must have lived before it may be replaced."""
    decay_rate: float = 0.99
    """η: the running utility's decay."""
    apply_freq: int = 1
    """Steps between replacement rounds (utilities are updated every step)."""
    include_vision: bool = False
    """Also the plain fc1→fc2 MLPs (vision encoders); default: the language model's gated MLPs."""

    def __post_init__(self) -> None:
        if not 0 <= self.replacement_rate <= 1:
            raise ConfigError(f"continual_backprop.replacement_rate must lie in [0, 1], got {self.replacement_rate}")
        if self.maturity_threshold < 0:
            raise ConfigError(f"continual_backprop.maturity_threshold must be >= 0, got {self.maturity_threshold}")
        if not 0 <= self.decay_rate < 1:
            raise ConfigError(f"continual_backprop.decay_rate must lie in [0, 1), got {self.decay_rate}")
        if self.apply_freq < 1:
            raise ConfigError(f"continual_backprop.apply_freq must be >= 1, got {self.apply_freq}")


@dataclass
class MLPUnits:
    """The hidden units of one MLP: unit i is row `offset + i` of each incoming layer and column i of
    the outgoing one."""

    name: str
    incoming: list[tuple[nn.Linear, int]]
    outgoing: nn.Linear
    size: int
    utility: torch.Tensor = field(init=False)
    age: torch.Tensor = field(init=False)
    accumulated: float = 0.0

    def __post_init__(self) -> None:
        self.utility = torch.zeros(self.size, dtype=torch.float64)
        self.age = torch.zeros(self.size, dtype=torch.long)


ENCODER_PARTS = ("vision", "image_embed", "img_processor", "vqmodel", "audio")
"""Module-name parts of the encoders in front of the language model (InternVL's vision tower,
Phi-4-MM's image and audio embedders, Anole's VQ-VAE)."""


def find_mlp_units(model: nn.Module, include_vision: bool = False) -> list[MLPUnits]:
    """The language model's gated MLPs (gate_proj + up_proj, or Phi's fused gate_up_proj, →
    down_proj); with `include_vision` also the vision encoders' MLPs (plain fc1 → fc2). Audio
    encoders (never run here) and frozen modules (Anole's VQ-VAE) are left out."""
    skip = ("audio",) if include_vision else ENCODER_PARTS
    found = []
    for name, module in model.named_modules():
        if any(part in name for part in skip):
            continue
        down = getattr(module, "down_proj", None)
        gate, up, fused = (getattr(module, a, None) for a in ("gate_proj", "up_proj", "gate_up_proj"))
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if isinstance(down, nn.Linear) and isinstance(gate, nn.Linear) and isinstance(up, nn.Linear):
            mlp = MLPUnits(name, [(gate, 0), (up, 0)], down, down.in_features)
        elif isinstance(down, nn.Linear) and isinstance(fused, nn.Linear):
            mlp = MLPUnits(name, [(fused, 0), (fused, down.in_features)], down, down.in_features)
        elif include_vision and isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) \
                and fc1.out_features == fc2.in_features:
            mlp = MLPUnits(name, [(fc1, 0)], fc2, fc2.in_features)
        else:
            continue
        if all(p.requires_grad for p in module.parameters()):
            found.append(mlp)
    return found


def _init_std(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        std = getattr(cfg, "initializer_range", None)
        if std:
            return float(std)
    return 0.02


class ContinualBackprop:
    """Utility tracking and selective re-initialisation for one model. Create it before the engine
    (it hooks the MLPs), `bind` the optimizer (a torch optimizer or DeepSpeed's ZeRO optimizer),
    then call `after_step()` after every optimizer step."""

    def __init__(self, model: nn.Module, cfg: ContinualBackpropConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.mlps = find_mlp_units(model, cfg.include_vision)
        if not self.mlps:
            raise ValueError(f"{type(model).__name__} has no MLP with gate/up/down or fc1/fc2 projections")
        self.init_std = _init_std(model)
        self.steps = 0
        self.replaced = 0
        self._optimizer: Any = None
        self._sums = [torch.zeros(m.size, dtype=torch.float64) for m in self.mlps]
        self._counts = [0] * len(self.mlps)
        self._hooks = [m.outgoing.register_forward_pre_hook(self._hook(k)) for k, m in enumerate(self.mlps)]

    def _hook(self, k: int):
        def record(module: nn.Module, args: tuple) -> None:
            # training forwards only: not generation, evaluation or no-grad passes (GRPO's π_old)
            if module.training and torch.is_grad_enabled():
                h = args[0].detach()
                self._sums[k] += h.abs().reshape(-1, h.shape[-1]).sum(0).double().cpu()
                self._counts[k] += h.numel() // h.shape[-1]
        return record

    def bind(self, optimizer: Any) -> "ContinualBackprop":
        self._optimizer = optimizer
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    # --- per step -------------------------------------------------------------------------------
    def after_step(self) -> int:
        """Fold this step's activations into the utilities, age the units, and every `apply_freq`
        steps replace; returns how many units were replaced now."""
        eta = self.cfg.decay_rate
        for k, mlp in enumerate(self.mlps):
            if self._counts[k] == 0:
                continue  # this MLP did not run in training this step
            mean_h = self._sums[k] / self._counts[k]
            w_mag = _full_weight(mlp.outgoing.weight).abs().sum(0).double().cpu()
            mlp.utility.mul_(eta).add_((1 - eta) * mean_h * w_mag)
            mlp.age += 1
            self._sums[k].zero_()
            self._counts[k] = 0
        self.steps += 1
        if self.steps % self.cfg.apply_freq:
            return 0
        return self.replace()

    def replace(self) -> int:
        """One replacement round (see the module docstring)."""
        self._sync_utilities()
        eta, done = self.cfg.decay_rate, 0
        for k, mlp in enumerate(self.mlps):
            eligible = (mlp.age > self.cfg.maturity_threshold).nonzero().flatten()
            if eligible.numel() == 0:
                continue
            mlp.accumulated += self.cfg.replacement_rate * eligible.numel()
            n = min(int(mlp.accumulated), eligible.numel())
            if n == 0:
                continue
            mlp.accumulated -= n
            ages = mlp.age[eligible].double()
            corrected = mlp.utility[eligible] / (1 - eta ** ages) if eta > 0 else mlp.utility[eligible]
            units = eligible[torch.topk(-corrected, n).indices].sort().values
            self._reinit(k, mlp, units)
            mlp.utility[units] = 0.0
            mlp.age[units] = 0
            done += n
        self.replaced += done
        return done

    def _sync_utilities(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([m.utility for m in self.mlps]).float()
            dist.all_reduce(flat)
            flat = (flat / dist.get_world_size()).double()
            for m, chunk in zip(self.mlps, flat.split([m.size for m in self.mlps])):
                m.utility.copy_(chunk)

    @torch.no_grad()
    def _reinit(self, k: int, mlp: MLPUnits, units: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(hash((self.seed, self.steps, k)) % (2**63))
        for layer, offset in mlp.incoming:
            rows = units + offset
            shape = _shape(layer.weight)
            mask = torch.zeros(shape, dtype=torch.bool)
            mask[rows] = True
            values = torch.zeros(shape)
            values[rows] = torch.randn(len(rows), shape[1], generator=gen) * self.init_std
            self._write(layer.weight, mask, values)
            if layer.bias is not None:
                bmask = torch.zeros(_shape(layer.bias), dtype=torch.bool)
                bmask[rows] = True
                self._write(layer.bias, bmask, torch.zeros(_shape(layer.bias)))
        mask = torch.zeros(_shape(mlp.outgoing.weight), dtype=torch.bool)
        mask[:, units] = True
        self._write(mlp.outgoing.weight, mask, torch.zeros(mask.shape))

    # --- writing weights and optimizer state, per engine --------------------------------------------
    def _write(self, param: nn.Parameter, mask: torch.Tensor, values: torch.Tensor) -> None:
        """param[mask] = values[mask] wherever the engine keeps the parameter; zero its optimizer
        moments at mask."""
        if hasattr(param, "ds_id"):  # ZeRO-3
            _write_zero3(param, mask, values)
            return
        param.data[mask.to(param.device)] = values.to(param.device, param.dtype)[mask.to(param.device)]
        if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: this rank's slice of the fp32 master and the moments
            if param._hp_mapping is not None:  # None: no element of it in this rank's partition
                _write_zero12(param, param._hp_mapping, self._optimizer, mask, values)
        elif self._optimizer is not None:
            for value in self._optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[mask.to(value.device)] = 0

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._sync_utilities()
        return {"steps": self.steps, "replaced": self.replaced,
                "mlps": {m.name: {"utility": m.utility.clone(), "age": m.age.clone(), "accumulated": m.accumulated}
                         for m in self.mlps}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mlps = {m.name: m for m in self.mlps}
        if set(state["mlps"]) != set(mlps):
            raise ValueError(f"continual backprop state is for MLPs {sorted(state['mlps'])[:3]}…, "
                             f"this model has {sorted(mlps)[:3]}…")
        for name, saved in state["mlps"].items():
            if saved["utility"].shape != mlps[name].utility.shape:
                raise ValueError(f"continual backprop state: {name} has {saved['utility'].numel()} units, "
                                 f"the model {mlps[name].size}")
            mlps[name].utility.copy_(saved["utility"])
            mlps[name].age.copy_(saved["age"])
            mlps[name].accumulated = float(saved["accumulated"])
        self.steps, self.replaced = int(state["steps"]), int(state["replaced"])


def _shape(param: nn.Parameter) -> torch.Size:
    """The full shape (under ZeRO-3 `param.shape` is this rank's empty placeholder)."""
    return getattr(param, "ds_shape", param.shape)


def _full_weight(param: nn.Parameter) -> torch.Tensor:
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().clone()
    return param.data


def _write_zero12(param: nn.Parameter, mapping: Any, zero_optimizer: Any, mask: torch.Tensor,
                  values: torch.Tensor) -> None:
    lp = mapping.lp_fragment_address
    sel = mask.flatten()[lp.start : lp.start + lp.numel].to(mapping.hp_fragment.device)
    if not bool(sel.any()):
        return
    new = values.flatten()[lp.start : lp.start + lp.numel].to(mapping.hp_fragment.device, mapping.hp_fragment.dtype)
    mapping.hp_fragment.data[sel] = new[sel]
    # the moments, looked up afresh (a reset optimizer holds new tensors; DeepSpeed's own fragment
    # views would still point at the old ones)
    if zero_optimizer is None:
        return
    flat = zero_optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    hp = mapping.hp_fragment_address
    for value in inner.state.get(flat, {}).values():
        if torch.is_tensor(value) and value.shape == flat.shape:
            value.narrow(0, hp.start, hp.numel)[sel] = 0


def _write_zero3(param: nn.Parameter, mask: torch.Tensor, values: torch.Tensor) -> None:
    import deepspeed
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                                 safe_set_full_optimizer_state)

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        param.data[mask] = values.to(param.dtype)[mask]
    full = safe_get_full_fp32_param(param)
    if full is not None:
        full[mask.to(full.device)] = values.to(full.device, full.dtype)[mask.to(full.device)]
        safe_set_full_fp32_param(param, full)
    for key in ("exp_avg", "exp_avg_sq"):
        try:
            state = safe_get_full_optimizer_state(param, key)
        except KeyError:  # no optimizer step yet: no moments to reset
            continue
        if state is not None:
            state[mask.to(state.device)] = 0
            safe_set_full_optimizer_state(param, state, key)


__all__ = ["STATE_FILE", "ContinualBackprop", "ContinualBackpropConfig", "MLPUnits", "find_mlp_units"]
