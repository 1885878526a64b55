"""Shared pieces of the pruning methods: the options they all take and the pure mask maths.

Pattern convention (as in Wanda and SparseGPT): `N:M` zeroes the N lowest-scoring weights in every group of M
consecutive input weights of a row, so `2:4` keeps 2 of every 4 and has sparsity N/M.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .configs.pruning import PruningConfig, parse_pattern  # noqa: F401  (the pruning API in one place)
from .errors import InvalidOptionError, UnsupportedModelError
from .registry import Report
from .sequential import BlockStep, block_stacks, find_linears, named_blocks, weight_matrix
from .statistics import InputStatistics
from .structure import sparse


def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Boolean mask (out, in) of the weights to keep: per row, drop the `sparsity` share with the lowest score, or
    with `nm=(N, M)` the N lowest of every M consecutive columns. Ties go to the lower column index."""
    rows, cols = score.shape
    # not topk: it leaves the order of equal scores open (and CPU and CUDA break them differently)
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)                        # (out, in/M, M)
        drop = groups.argsort(dim=-1, stable=True)[..., :n]
        keep = torch.ones_like(groups, dtype=torch.bool)
        return keep.scatter_(-1, drop, False).reshape(rows, cols)
    k = int(cols * sparsity)
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    # what the first k columns of a stable ascending argsort drop, in about half its time: everything below the
    # k-th lowest score, then as many of the scores equal to it as are left, lowest columns first
    score = torch.nan_to_num(score, nan=torch.inf)                        # NaN last, as a sort puts it
    kth = score.kthvalue(k, dim=1, keepdim=True).values                   # (out, 1)
    below, tied = score < kth, score == kth
    room = k - below.sum(dim=1, keepdim=True)                             # (out, 1) ties to drop
    return ~(below | (tied & (tied.cumsum(dim=1) <= room)))


def layer_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the highest-scoring (1 - sparsity) share of the whole matrix (not per row)."""
    k = int(score.numel() * sparsity)
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.flatten(), k, largest=False, sorted=False).indices] = False
    return mask.reshape(score.shape)


def pruning_targets(model: nn.Module, config: PruningConfig) -> dict[str, dict[str, nn.Module]]:
    """Block name -> {layer name: layer} to prune. Checked before anything changes: the targets must match at least
    one layer, and every matched layer must take the N:M pattern."""
    block_stacks(model)  # a clear error when the model has no blocks
    targets = {prefix: find_linears(block, config.targets, prefix) for prefix, block in named_blocks(model)}
    if not any(targets.values()):
        prefix, block = next(named_blocks(model))
        examples = list(find_linears(block, (), prefix))
        raise InvalidOptionError(f"targets {list(config.targets)} match no Linear layer of the blocks; layer names "
                                 f"look like {examples[:4]}")
    nm = config.nm
    if nm:
        widths = {name: weight_matrix(layer).shape[1] for layers in targets.values() for name, layer in layers.items()}
        bad = [name for name, width in widths.items() if width % nm[1]]
        if bad:
            fitting = [m for m in (2, 4, 8, 16, 32) if all(width % m == 0 for width in widths.values())]
            others = f" and {len(bad) - 1} more layers" if len(bad) > 1 else ""
            raise UnsupportedModelError(
                f"pattern {config.pattern} needs every pruned layer's input width divisible by M={nm[1]}, but "
                f"{bad[0]}{others} take {', '.join(map(str, sorted({widths[name] for name in bad})))} inputs; "
                + (f"M = {', '.join(map(str, fitting))} fits every layer (e.g. --pattern "
                   f"{'2:4' if 4 in fitting else f'1:{fitting[0]}'}), " if fitting else "")
                + "or leave those layers out with --targets")
    return targets


def pruning_check(model: nn.Module, config: PruningConfig) -> list[str]:
    """The registry check of every pruning method: the names of the layers it will prune (errors as above)."""
    return [name for layers in pruning_targets(model, config).values() for name in layers]


def apply_mask(layer: nn.Module, keep: torch.Tensor) -> dict[str, Any]:
    """Zero the pruned weights in place; return the layer's structure-map entry."""
    weight = weight_matrix(layer)
    weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))
    return sparse(1 - keep.float().mean().item())


def pruning_report(method: str, modules: dict[str, dict[str, Any]], layers_numel: dict[str, int]) -> Report:
    """The Report of a pruning step, with the weighted mean sparsity over the pruned layers."""
    total = sum(layers_numel.values())
    pruned = sum(modules[name]["sparse"]["sparsity"] * numel for name, numel in layers_numel.items())
    return Report(method, {"sparsity": round(pruned / total, 6) if total else 0.0, "layers": len(modules)}, modules)


# mask_fn(weight (out, in) fp32 copy, statistics, layer name, ratio, nm) -> keep mask (out, in); it may also return
# an updated weight as (keep, new_weight), for methods that compensate the pruning error (SparseGPT).
MaskFunction = Callable[[torch.Tensor, InputStatistics, str, float, "tuple[int, int] | None"], Any]


def prune_blocks(model: nn.Module, config: PruningConfig, context: Any, mask_fn: MaskFunction, *,
                 statistics: tuple[str, ...] = ("sq_sum",), ratio_of: Callable[[str], float] | None = None,
                 sequential: bool = True) -> Report:
    """The pruning loop shared by the calibrated pruning methods: block by block, collect the input `statistics`
    of the targeted layers while the block runs, then prune each layer with `mask_fn` at its ratio (`ratio_of(name)`,
    default `config.ratio`)."""
    method = type(config).method
    targets = pruning_targets(model, config)
    modules: dict[str, dict[str, Any]] = {}
    numel: dict[str, int] = {}

    def process(step: BlockStep) -> None:
        layers = targets[step.name]
        if not layers:  # nothing targeted in this block: the engine still runs it to feed the next one
            return
        with InputStatistics(layers, statistics) as stats:
            step.run()
        for name, layer in layers.items():
            weight = weight_matrix(layer)
            result = mask_fn(weight.detach().float(), stats, name, ratio_of(name) if ratio_of else config.ratio,
                             config.nm)
            keep, new_weight = result if isinstance(result, tuple) else (result, None)
            if new_weight is not None:
                weight.copy_(new_weight.to(weight.dtype))
            modules[name] = apply_mask(layer, keep)
            numel[name] = weight.numel()

    context.run_blocks(model, process, sequential=sequential, desc=method)
    return pruning_report(method, modules, numel)
