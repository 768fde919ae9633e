"""Stage recipes, one module each, in one table: `cot` and `coconut` (`sft`), `dare`, `cosre`, `rl`.
A recipe holds its stage's batches and loss (`stages.base.Recipe`); `mmreason.train.loop` runs any of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmreason.train.stages.base import EvalPlan, Recipe, StageEnv
from mmreason.train.stages.cosre import Cosre
from mmreason.train.stages.dare import Dare
from mmreason.train.stages.rl import RL
from mmreason.train.stages.sft import SFT

if TYPE_CHECKING:
    from mmreason.models.base import Family
    from mmreason.train.config import TrainConfig

RECIPES: dict[str, type[Recipe]] = {"cot": SFT, "coconut": SFT, "dare": Dare, "cosre": Cosre, "rl": RL}


def needs_reference(cfg: "TrainConfig") -> bool:
    """The frozen starting model is loaded too: rl's KL(π‖π_ref), or distill's teacher."""
    return (cfg.stage == "rl" and cfg.rl.kl_coef > 0) or bool(cfg.distill)


def build_recipe(cfg: "TrainConfig", family: "Family", env: StageEnv, reference: Any = None) -> Recipe:
    return RECIPES[cfg.stage](cfg, family, env, reference)


__all__ = ["EvalPlan", "RECIPES", "Recipe", "StageEnv", "build_recipe", "needs_reference"]
