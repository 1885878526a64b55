"""LoRD: low-rank decomposition (Kaushal et al., 2023, "LoRD: Low Rank Decomposition of Monolingual Code LLMs for
One-Shot Compression", arXiv 2309.14021).

Each targeted Linear W (out, in) becomes the product of two thin ones, `second(first(x))` with first = A (r, in)
and second = B (out, r) carrying the bias, computed in fp32:

- `mode: svd` (the paper, data-free): W = U S V^T, A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r), which minimises ||W - BA||.
- `mode: activation` (default): minimises the error of the layer's output on the calibration data, ||(W - BA) X||,
  X (in, tokens) every calibration token. With C = X X^T + damp * mean(diag C) * I = L L^T (Cholesky, fp32),
  ||(W - BA) X|| = ||(W - BA) L||, so the best rank-r pair comes from the SVD of W L = U S V^T: A = sqrt(S_r) V_r^T
  L^-1, B = U_r sqrt(S_r). At full rank BA = W exactly.

Ranks follow each layer's spectrum: the relative error of a layer at rank r is e(r) = sqrt(sum_{i>=r} s_i^2 /
sum_i s_i^2) (the share of its weight's, or output's, energy lost), and ONE threshold t holds for every layer: each
keeps the smallest rank with e(r) <= t, rounded up to a multiple of `rank_multiple`. `reduction` (share of the
targeted layers' weights removed) or `target_params` (parameters of the whole model) fix t by bisection, landing at
or just past the requested saving; `tolerance` is t itself. A layer whose pair would hold as many parameters as W
(r (in + out) >= in * out) stays dense. The ranks are chosen from the spectra of the dense model (one pass over
the calibration data); the factors of each block then come from the inputs the already-factored blocks give it
(`sequential`, as in the pruning methods).

The model holds `LowRankLinear` modules and is saved in the remote-code form (see `modules.py`); `merge` multiplies
each pair back into its Linear instead (a plain dense model of the same size, for runtimes that run no custom code).
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs.lord import LordConfig, parse_count
from ..context import Context
from ..errors import InvalidOptionError, choices
from ..evaluate import parameter_count
from ..modules import LowRankLinear, replace_module
from ..registry import Report
from ..sequential import BlockStep, block_stacks, find_linears, named_blocks, weight_matrix
from ..statistics import InputStatistics
from ..structure import lowrank

# --- the maths (pure functions) ---------------------------------------------------------------------------------

def whitening(covariance: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor L (in, in) of covariance (in, in) + damp * mean(diag) * I, in fp32."""
    covariance = covariance.float()
    diagonal = covariance.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    return torch.linalg.cholesky(covariance + damp * diagonal * eye)


def spectrum(weight: torch.Tensor, whiten: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values (min(out, in),) of weight (out, in), or of weight @ whiten in activation mode."""
    matrix = weight.float() if whiten is None else weight.float() @ whiten
    return torch.linalg.svdvals(matrix)


def relative_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """e (k + 1,): e[r] = the relative error of the best rank-r pair, sqrt(sum_{i>=r} s_i^2 / sum s_i^2)."""
    energy = singular_values.double().pow(2)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tail / tail[0].clamp_min(1e-300)).sqrt().float()


def factor(weight: torch.Tensor, rank: int, whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (rank, in), second (out, rank)), fp32, with second @ first the best rank-`rank` approximation of
    weight (out, in), in the Frobenius norm or, given the whitening L, in the norm of (W - BA) L."""
    matrix = weight.float() if whiten is None else weight.float() @ whiten
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    first = root.unsqueeze(1) * vh[:rank]                                    # (rank, in)
    if whiten is not None:                                                   # first L^-1, by a triangular solve
        first = torch.linalg.solve_triangular(whiten, first, upper=False, left=False)
    return first, u[:, :rank] * root.unsqueeze(0)                           # (out, rank)


def pair_params(rank: int | None, rows: int, columns: int) -> int:
    """Weights a layer holds: rank * (in + out) as a pair, in * out when it stays dense (rank None)."""
    return rows * columns if rank is None else rank * (rows + columns)


def rank_at(errors: torch.Tensor, threshold: float, multiple: int, rows: int, columns: int) -> int | None:
    """The smallest rank with relative error <= threshold, rounded up to `multiple`; None when the pair would not
    be smaller than the dense layer."""
    needed = int((errors[:-1] > threshold).sum())            # e is non-increasing: e[0..k-1] > threshold
    rank = max(multiple, -(-needed // multiple) * multiple)
    full = min(rows, columns)
    return None if rank >= full or pair_params(rank, rows, columns) >= rows * columns else rank


def allocate(errors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], multiple: int,
             keep: int | None = None, tolerance: float | None = None) -> tuple[dict[str, int | None], float]:
    """(rank per layer (None: dense), the threshold): one relative-error threshold for every layer, `tolerance`
    itself, or the smallest that brings the layers' weights to `keep` or fewer (found by bisection)."""
    def ranks(threshold: float) -> dict[str, int | None]:
        return {name: rank_at(e, threshold, multiple, *shapes[name]) for name, e in errors.items()}

    def kept(threshold: float) -> int:
        return sum(pair_params(rank, *shapes[name]) for name, rank in ranks(threshold).items())

    if tolerance is not None:
        return ranks(tolerance), tolerance
    if kept(1.0) > keep:
        raise InvalidOptionError(f"the layers cannot be brought to {keep:,} weights (at most to {kept(1.0):,})")
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if kept(middle) <= keep else (middle, high)
    return ranks(high), high


# --- planning and the transform ---------------------------------------------------------------------------------

def lord_targets(model: nn.Module, config: LordConfig) -> dict[str, nn.Module]:
    """Layer name -> layer to factor, across the blocks; targets that match nothing are refused."""
    block_stacks(model)  # a clear error when the model has no blocks
    layers = {name: layer for prefix, block in named_blocks(model)
              for name, layer in find_linears(block, config.targets, prefix).items()}
    if not layers:
        prefix, block = next(named_blocks(model))
        raise InvalidOptionError(f"targets {list(config.targets)} match no Linear layer of the blocks; layer names "
                                 f"look like {choices(list(find_linears(block, (), prefix))[:4])}")
    return layers


def weights_to_keep(model: nn.Module, config: LordConfig, shapes: dict[str, tuple[int, int]]) -> int | None:
    """The targeted layers' weight budget that `reduction` or `target_params` asks for (None: `tolerance`), checked
    against the most any allocation can remove (every saving layer at the smallest rank)."""
    total = sum(rows * columns for rows, columns in shapes.values())
    smallest = sum(pair_params(rank_at(torch.zeros(1), 1.0, config.rank_multiple, *shape), *shape)
                   for shape in shapes.values())
    if smallest >= total:
        raise InvalidOptionError(f"no targeted layer gets smaller as a pair of rank {config.rank_multiple} "
                                 "(rank_multiple); lower rank_multiple or target wider layers")
    if config.tolerance is not None:
        return None
    if config.target_params is not None:
        everything = parameter_count(model)  # the table's count
        target = parse_count(config.target_params)
        keep = total - (everything - target)
        what = f"target_params {config.target_params} ({everything:,} parameters now)"
    else:
        keep = int(total * (1 - config.ratio))
        what = f"reduction {config.ratio}"
    if keep < smallest:
        raise InvalidOptionError(f"{what} cannot be reached: factoring every targeted layer at rank "
                                 f"{config.rank_multiple} removes at most {1 - smallest / total:.1%} of their "
                                 f"{total:,} weights")
    if keep >= total:
        raise InvalidOptionError(f"{what} asks for no saving")
    return keep


def install_pair(model: nn.Module, name: str, first: torch.Tensor, second: torch.Tensor, merge: bool) -> None:
    """Put the pair in place of layer `name` (in its device and dtype), or multiply it back into its weight."""
    layer = model.get_submodule(name)
    weight = weight_matrix(layer)
    if merge:
        weight.copy_((second @ first).to(weight.dtype))
        return
    bias = getattr(layer, "bias", None)
    with torch.device(weight.device):
        pair = LowRankLinear(weight.shape[1], weight.shape[0], first.shape[0], bias=bias is not None)
    pair.to(weight.dtype)
    with torch.no_grad():
        pair.first.weight.copy_(first)
        pair.second.weight.copy_(second)
        if bias is not None:
            pair.second.bias.copy_(bias)
    replace_module(model, name, pair)


def lord_check(model: nn.Module, config: LordConfig) -> Report:
    """Before loading: targets, the budget, and the pairs put on the weightless model at the smallest rank (every
    rank is a multiple of it, which is what later steps' checks, such as a quantizer's group size, need)."""
    layers = lord_targets(model, config)
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in layers.items()}
    weights_to_keep(model, config, shapes)
    modules = {}
    for name, (rows, columns) in shapes.items():
        rank = rank_at(torch.zeros(1), 1.0, config.rank_multiple, rows, columns)
        if rank is not None:
            modules[name] = lowrank(rank, merged=config.merge)
            if not config.merge:
                install_pair(model, name, torch.empty(rank, columns, device="meta"),
                             torch.empty(rows, rank, device="meta"), merge=False)
    return Report("lord", {}, modules)


@torch.no_grad()
def lord(model: nn.Module, config: LordConfig, context: Context) -> Report:
    """LoRD: replace Linear layers by two thin ones (truncated SVD, optionally of the output on calibration data)."""
    layers = lord_targets(model, config)
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in layers.items()}
    keep = weights_to_keep(model, config, shapes)
    device, activation = context.device, config.mode == "activation"
    by_block = {prefix: [name for name in layers if name.startswith(prefix + ".")]
                for prefix, _ in named_blocks(model)}
    errors: dict[str, torch.Tensor] = {}

    def weight_of(name: str) -> torch.Tensor:
        return weight_matrix(model.get_submodule(name)).detach().to(device, torch.float32)

    def observed(step: BlockStep) -> InputStatistics | None:
        names = by_block[step.name]
        if not names:
            return None
        with InputStatistics({name: model.get_submodule(name) for name in names}, ("hessian",)) as stats:
            step.run()
        return stats

    if keep is not None:  # the ranks need every layer's spectrum first
        if activation:
            def measure(step: BlockStep) -> None:
                stats = observed(step)
                for name in by_block[step.name]:
                    errors[name] = relative_errors(spectrum(weight_of(name), whitening(stats.hessian(name),
                                                                                        config.damp))).cpu()
            context.run_blocks(model, measure, sequential=False, desc="lord spectra")
        else:
            errors = {name: relative_errors(spectrum(weight_of(name))).cpu() for name in layers}
    ranks, threshold = allocate(errors, shapes, config.rank_multiple, keep) if keep is not None else ({}, None)

    def decompose(name: str, whiten: torch.Tensor | None) -> None:
        weight = weight_of(name)
        if keep is None:
            ranks[name] = rank_at(relative_errors(spectrum(weight, whiten)), config.tolerance, config.rank_multiple,
                                  *shapes[name])
        if ranks[name] is not None:
            install_pair(model, name, *factor(weight, ranks[name], whiten), merge=config.merge)

    if activation:
        def process(step: BlockStep) -> None:
            stats = observed(step)
            for name in by_block[step.name]:
                decompose(name, whitening(stats.hessian(name), config.damp))
        context.run_blocks(model, process, sequential=config.sequential, desc="lord")
    else:
        for index, name in enumerate(layers):
            context.check_cancelled()
            context.report(index / len(layers), f"lord: {name}")
            decompose(name, None)
    modules = {name: lowrank(rank, merged=config.merge) for name, rank in ranks.items() if rank is not None}
    total = sum(rows * columns for rows, columns in shapes.values())
    kept = sum(pair_params(ranks[name], *shape) for name, shape in shapes.items())
    stats = {"mode": config.mode, "reduction": round(1 - kept / total, 6), "factored": len(modules),
             "dense": len(layers) - len(modules), "threshold": None if threshold is None else round(threshold, 6),
             "ranks": {name: ranks[name] for name in layers}}
    return Report("lord", stats, modules)
