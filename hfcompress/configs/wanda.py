"""Options of Wanda (`hfcompress.methods.wanda`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..options import option
from ..registry import register
from .pruning import PruningConfig


@dataclass(frozen=True)
class WandaConfig(PruningConfig):
    method: ClassVar[str] = "wanda"
    sequential: bool = option(True, "statistics of block l come from the pruned blocks before it (true, as in the "
                                    "paper's code) or from the dense model (false)")


register(WandaConfig, transform="hfcompress.methods.wanda:wanda", check="hfcompress.sparsity:pruning_check",
         paper="https://arxiv.org/abs/2306.11695", needs_calibration=True,
         supports=("causal-lm", "encoder", "vision-language"),
         changes="sparse",
         summary="Wanda: prune by weight magnitude times input activation norm, per output row; no weight "
                 "update.")
