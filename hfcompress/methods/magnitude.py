"""Magnitude pruning: zero the weights with the smallest absolute value.

The classic baseline that every data-aware pruning method is measured against. Needs no calibration data. Scores
are |W_ij|, compared within each output row (default, like Wanda) or across the whole matrix (`scope: layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..context import Context
from ..errors import InvalidOptionError
from ..options import option
from ..registry import Report, register
from ..sequential import weight_matrix
from ..sparsity import (
    PruningConfig,
    apply_mask,
    keep_mask,
    layer_keep_mask,
    pruning_check,
    pruning_report,
    pruning_targets,
)

SCOPES = ("row", "layer")


@dataclass(frozen=True)
class MagnitudeConfig(PruningConfig):
    method: ClassVar[str] = "magnitude"
    scope: str = option("row", "`row`: drop the smallest weights of each output row; `layer`: of the whole matrix "
                               "(unstructured only)", choices=SCOPES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope == "layer" and self.nm:
            raise InvalidOptionError("scope `layer` applies to unstructured pruning only; N:M patterns work per row")


@register(MagnitudeConfig, paper="https://arxiv.org/abs/1506.02626", needs_calibration=False,
          supports=("causal-lm", "encoder", "vision", "vision-language"), check=pruning_check,
          changes="sparse")
@torch.no_grad()
def magnitude(model: nn.Module, config: MagnitudeConfig, context: Context) -> Report:
    """Magnitude pruning: zero the smallest-magnitude weights, per output row or per layer."""
    modules, numel = {}, {}
    for layers in pruning_targets(model, config).values():
        for name, layer in layers.items():
            score = weight_matrix(layer).detach().to(context.device, torch.float32).abs()  # (out, in)
            if config.scope == "layer":
                keep = layer_keep_mask(score, config.ratio)
            else:
                keep = keep_mask(score, config.ratio, config.nm)
            modules[name] = apply_mask(layer, keep)
            numel[name] = score.numel()
    return pruning_report("magnitude", modules, numel)
