"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv 2306.11695).

Score each weight by |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input channel j over every calibration
token, and drop the lowest-scoring share in each output row (or the N lowest of every M consecutive inputs). No
weight update. Blocks are processed one after another and, as in the authors' code, each block's statistics come
from the outputs of the already-pruned blocks before it (`sequential: false` uses dense activations instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration import CalibrationData
from ..options import option
from ..registry import Report, register
from ..sequential import input_hooks, run_blocks, weight_matrix
from ..sparsity import PruningConfig, apply_mask, keep_mask, pruning_targets, report_stats


@dataclass(frozen=True)
class WandaConfig(PruningConfig):
    method: ClassVar[str] = "wanda"
    sequential: bool = option(True, "statistics of block l come from the pruned blocks before it (true, as in the "
                                    "paper's code) or from the dense model (false)")


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for weight (out, in) and the per-channel sum of squared inputs (in,), in fp32."""
    return weight.float().abs() * input_sq_sum.sqrt().unsqueeze(0)


@register(WandaConfig, paper="https://arxiv.org/abs/2306.11695", needs_calibration=True,
          supports=("causal-lm", "encoder"), check=pruning_targets)
def wanda(model: nn.Module, config: WandaConfig, calibration: CalibrationData, device: torch.device | str) -> Report:
    """Wanda: prune by weight magnitude times input activation norm, per output row; no weight update."""
    modules, numel = {}, {}
    targets = pruning_targets(model, config)

    def process(prefix: str, block: nn.Module, run) -> None:
        layers = targets[prefix]
        if not layers:  # nothing targeted in this block: the engine still runs it to feed the next one
            return
        # per input channel j: sum over calibration tokens of x_j^2, in fp32 whatever the model dtype
        sq_sums = {name: torch.zeros(weight_matrix(layer).shape[1], device=layer.weight.device)
                   for name, layer in layers.items()}

        def observe(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()   # (tokens, in)
            sq_sums[name] += x.pow(2).sum(dim=0)

        with input_hooks(layers, observe):
            run()
        for name, layer in layers.items():
            score = wanda_score(weight_matrix(layer), sq_sums[name])  # (out, in)
            modules[name] = apply_mask(layer, keep_mask(score, config.ratio, config.nm))
            numel[name] = score.numel()

    run_blocks(model, calibration.batches(), device, process, sequential=config.sequential, desc="wanda")
    return Report("wanda", report_stats(modules, numel), modules)
