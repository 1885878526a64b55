"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv 2306.11695).

Score each weight by |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input channel j over every calibration
token, and drop the lowest-scoring share in each output row (or the N lowest of every M consecutive inputs). No
weight update. Blocks are processed one after another and, as in the authors' code, each block's statistics come
from the outputs of the already-pruned blocks before it (`sequential: false` uses dense activations instead).
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs.wanda import WandaConfig
from ..context import Context
from ..registry import Report
from ..sparsity import keep_mask, prune_blocks
from ..statistics import InputStatistics


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for weight (out, in) and the per-channel sum of squared inputs (in,), in fp32."""
    return weight.float().abs() * input_sq_sum.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, stats: InputStatistics, name: str, ratio: float,
               nm: tuple[int, int] | None) -> torch.Tensor:
    """The keep mask (out, in) of one layer: the lowest Wanda scores of each row (or N of every M) are dropped."""
    return keep_mask(wanda_score(weight, stats.sq_sum(name)), ratio, nm)


def wanda(model: nn.Module, config: WandaConfig, context: Context) -> Report:
    """Wanda: prune by weight magnitude times input activation norm, per output row; no weight update."""
    return prune_blocks(model, config, context, wanda_mask, sequential=config.sequential)
