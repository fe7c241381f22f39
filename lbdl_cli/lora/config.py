"""LoRA's options and names, without torch: the CLI builds `lbdl finetune`'s flags from LoRAConfig at start-up."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config, setting
from ..errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = "all-linear"  # every linear layer but the output head (as PEFT)
INITS = ("gaussian", "kaiming")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig(Config):
    """The adapters: rank, scale, dropout, initialisation and which layers (`lbdl finetune`'s LoRA flags)."""

    RENAMED = {"dropout": "lora_dropout"}  # PEFT's name; it also keeps clear of the training's --dropout
    rank: int = setting(8, "LoRA rank R of each adapter pair (A is R x D, B is C x R).", low=1, high=1 << 16)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / R (alpha / sqrt(R) with --rslora).",
                           low=0, low_open=True, high=1e6)
    lora_dropout: float = setting(0.0, "Dropout on the adapters' input, in [0, 1).", low=0, high=1)
    rslora: bool = setting(False, "rsLoRA: scale by alpha / sqrt(R) instead of alpha / R.")
    init: str = setting("gaussian", "Initialisation of A: gaussian (std 1/R, PEFT's \"gaussian\") or kaiming "
                        "(PEFT's default kaiming-uniform); B starts at zero.", choices=INITS)
    targets: tuple[str, ...] = setting(ATTENTION, "Layers to adapt: module names (q_proj), paths or glob "
                                       "patterns over them (blocks.*.mlp.*), or all-linear.")

    def __post_init__(self):
        super().__post_init__()
        if self.lora_dropout >= 1:
            raise ConfigError(f"{self.config_name()}: lora_dropout must be in [0, 1), got {self.lora_dropout:g}")
        if not self.targets:
            raise ConfigError(f"{self.config_name()}: targets is empty; name layers (q_proj, ...) or all-linear")

    @classmethod
    def config_name(cls) -> str:
        return "lora config"

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)
