"""SparseGPT: one-shot pruning with error compensation (Frantar & Alistarh, 2023, arXiv 2301.00774).

For each Linear layer with calibration inputs X (tokens, in), the Hessian of the layer's reconstruction error is
H = 2 X^T X (accumulated in fp32; dampened by `damp` x its mean diagonal). Columns are visited left to right in
blocks of `block_size`. Inside a block the mask is chosen by the saliency w_ij^2 / [H^-1]_jj^2, using the inverse
Hessian's upper Cholesky factor; each column is then pruned and its error w_ij / [H^-1]_jj is spread over the
remaining columns of the row through row j of that factor, so the kept weights change to compensate. Dead input
channels (zero Hessian diagonal) get a unit diagonal and zero weights, as in the authors' code.

Where it departs from the paper: by default every row loses exactly its share of weights (the row's total
int(in * sparsity) is split over the column blocks by cumulative rounding, and each row prunes its lowest-saliency
weights inside each block), so per-row sparsity is exact like Wanda's. `per_row: false` uses the authors' choice,
one saliency threshold per block across all rows (rows then end with unequal sparsity). N:M picks, in every group
of M columns, the N lowest-saliency weights of each row, as the authors do. Blocks are processed sequentially, each
block's statistics coming from the already-pruned blocks before it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs.sparsegpt import SparseGPTConfig
from ..context import Context
from ..registry import Report
from ..sparsity import prune_blocks
from ..statistics import InputStatistics


def without_dead_channels(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of weight (out, in) and Hessian (in, in) where input channels that never fire (zero Hessian
    diagonal) get a unit diagonal and zero weights, as in the authors' code, so that H can be inverted."""
    weight, hessian = weight.clone().float(), hessian.clone().float()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    return weight, hessian


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) for the dampened Hessian (in, in), in fp32. When the
    factorization fails (H not positive definite in fp32) the dampening grows tenfold, up to three times."""
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    for attempt in range(4):
        dampened = hessian.clone()
        dampened[diagonal, diagonal] += damp * 10 ** attempt * hessian.diagonal().mean()
        factor, info = torch.linalg.cholesky_ex(dampened)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
    raise ValueError("the Hessian is not positive definite even with 1000x the dampening")


def block_drop_counts(columns: int, block_size: int, sparsity: float) -> list[int]:
    """Weights each row drops in each column block, summing exactly to int(columns * sparsity)."""
    edges = list(range(0, columns, block_size)) + [columns]
    return [int(end * sparsity) - int(start * sparsity) for start, end in zip(edges, edges[1:], strict=False)]


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    block_size: int = 128, damp: float = 0.01,
                    per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune weight (out, in) with error compensation; return (keep mask, updated weight), both (out, in)."""
    weight, hessian = without_dead_channels(weight, hessian)
    rows, columns = weight.shape
    factor = inverse_hessian_factor(hessian, damp)                       # (in, in), upper triangular
    keep = torch.ones_like(weight, dtype=torch.bool)
    drops = block_drop_counts(columns, block_size, sparsity)
    for block, start in enumerate(range(0, columns, block_size)):
        end = min(start + block_size, columns)
        w = weight[:, start:end].clone()                                  # (out, b), updated as columns go
        u = factor[start:end, start:end]                                  # (b, b)
        errors = torch.zeros_like(w)
        saliency = w.pow(2) / u.diagonal().pow(2).unsqueeze(0)           # (out, b)
        if nm is None and per_row and drops[block]:
            pruned = torch.topk(saliency, drops[block], dim=1, largest=False).indices
            keep[:, start:end].scatter_(1, pruned, False)
        elif nm is None and not per_row:
            cut = int(saliency.numel() * sparsity)
            if cut:
                threshold = saliency.flatten().kthvalue(cut).values
                keep[:, start:end] = saliency > threshold
        for column in range(end - start):
            if nm is not None and column % nm[1] == 0:  # choose the group's mask with the weights as updated so far
                group = w[:, column:column + nm[1]].pow(2) / u.diagonal()[column:column + nm[1]].pow(2)
                pruned = torch.topk(group, nm[0], dim=1, largest=False).indices
                keep[:, start + column:start + column + nm[1]].scatter_(1, pruned, False)
            kept = keep[:, start + column]
            error = torch.where(kept, torch.zeros_like(w[:, column]), w[:, column]) / u[column, column]  # (out,)
            w[:, column:] -= error.unsqueeze(1) * u[column, column:].unsqueeze(0)
            w[:, column] *= kept
            errors[:, column] = error
        weight[:, start:end] = w
        weight[:, end:] -= errors @ factor[start:end, end:]               # the block's error, on the columns after
    return keep, weight * keep


def sparsegpt(model: nn.Module, config: SparseGPTConfig, context: Context) -> Report:
    """SparseGPT: prune with the inverse Hessian of the inputs, updating the kept weights to compensate."""
    def mask(weight: torch.Tensor, stats: InputStatistics, name: str, ratio: float,
             nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt_prune(weight, 2 * stats.hessian(name), ratio, nm, config.block_size, config.damp,
                               config.per_row)

    return prune_blocks(model, config, context, mask, statistics=("hessian",), sequential=config.sequential)
