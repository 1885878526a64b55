"""Magnitude pruning: zero the weights with the smallest absolute value.

The classic baseline that every data-aware pruning method is measured against. Needs no calibration data. Scores
are |W_ij|, compared within each output row (default, like Wanda) or across the whole matrix (`scope: layer`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs.magnitude import MagnitudeConfig
from ..context import Context
from ..registry import Report
from ..sequential import weight_matrix
from ..sparsity import (
    apply_mask,
    keep_mask,
    layer_keep_mask,
    pruning_report,
    pruning_targets,
)


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
