"""Layer-wise mixed-precision quantization (Dumitru et al., 2024, arXiv 2406.17415; no code was released, this is
hfcompress's reading of the paper).

Rank the transformer blocks by an importance score, give the least important ones the low bit-widths and the rest
the high ones, as many at each level as an average bit-width allows, then quantize every Linear layer of each block
at its block's bit-width with `rtn` or `gptq` (same grid, groups and compressed-tensors output as those methods).

Scores (higher = more important):
- `lim` (layer input modification): minus the per-token cosine similarity between a block's input and output
  hidden states, averaged over every calibration token (a block that changes its input more matters more).
- `zd` (z-score distribution): the share of the block's Linear weights whose z-score (w - mean) / std over the
  block exceeds 1. The paper says "smaller is better"; hfcompress reads that as lower ZD = more important
  (`zd_direction: low`, the default) and keeps the other reading as `zd_direction: high`. Needs no data.
- `random` (seeded by `shuffle_seed`) and `reverse` (the LIM order reversed) for ablations.
- `layer_bits` gives the bit-width of every block explicitly instead.

Allocation: the bit-widths follow the importance order (a more important block never gets fewer bits), and among
such assignments the one with the largest average that is at most `avg_bits` is chosen (ties: fewer blocks at the
lowest levels); averages count blocks, as in the paper (4/2 at 3.5 puts three quarters of the blocks at 4 bits).
With `target_size` instead, the measure is the size of the weight files as the compressed-tensors writer stores
them (packed integers, scales, and every tensor left unquantized: embeddings, norms, biases), and the allocation
is the largest one at or under the target. The sizes reachable with the levels are known from the shapes alone,
so a target outside them is refused before any weight is loaded.
"""

from __future__ import annotations

import itertools
import random
from typing import Callable

import torch
from torch import nn

from ..configs.layerwise_quant import LayerwiseQuantConfig, parse_size
from ..context import Context
from ..errors import InvalidOptionError
from ..evaluate import stored_bytes
from ..formats.compressed_tensors import stored_layer_bytes
from ..quantization import quantization_check, quantization_targets, resolve_group_size
from ..registry import Report
from ..sequential import BlockStep, find_linears, named_blocks, weight_matrix
from ..statistics import input_output_cosine
from .gptq import gptq_blocks
from .rtn import rtn_layers

HEADER_BYTES_PER_TENSOR = 160  # safetensors header entry (name, dtype, shape, offsets), a generous estimate


def mean_bits(bits: list[int]) -> float:
    return sum(bits) / len(bits)


def allocate_bits(importance: list[float], levels: tuple[int, ...], budget: float,
                  cost: Callable[[list[int]], float] = mean_bits) -> list[int]:
    """Bit-width per block: monotone in `importance` (more important, at least as many bits), with the largest
    cost(bits) <= budget (cost: the average bit-width, or the stored bytes); among equal costs, the fewest blocks
    at the lowest levels. Every monotone assignment is one split of the importance order into runs per level."""
    blocks = len(importance)
    order = sorted(range(blocks), key=lambda i: (importance[i], i))       # least important first
    best, best_key = None, None
    for cuts in itertools.combinations_with_replacement(range(blocks + 1), len(levels) - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, blocks), strict=True)]   # blocks per level, low first
        bits = [0] * blocks
        for level, start, end in zip(sorted(levels), (0, *cuts), (*cuts, blocks), strict=True):
            for index in order[start:end]:
                bits[index] = level
        value = cost(bits)
        if value > budget + 1e-9:
            continue
        key = (round(value, 9), [-n for n in counts])
        if best_key is None or key > best_key:
            best, best_key = bits, key
    if best is None:
        raise InvalidOptionError(f"no assignment of the levels {list(levels)} reaches {budget}")
    return best


def zd_score(block: nn.Module, direction: str) -> float:
    """Share of the block's Linear weights with z-score > 1 (over the whole block), signed by `direction`."""
    weights = torch.cat([weight_matrix(layer).detach().float().flatten() for layer in find_linears(block).values()])
    share = ((weights - weights.mean()) / weights.std() > 1).float().mean().item()
    return -share if direction == "low" else share


def block_importance(model: nn.Module, score: str, context: Context, *, zd_direction: str = "low",
                     shuffle_seed: int = 0) -> dict[str, float]:
    """Block name -> importance (higher = more important) under `score` (one of SCORES)."""
    names = [name for name, _ in named_blocks(model)]
    if score == "zd":
        return {name: zd_score(block, zd_direction) for name, block in named_blocks(model)}
    if score == "random":
        ranks = list(range(len(names)))
        random.Random(shuffle_seed).shuffle(ranks)
        return {name: float(rank) for name, rank in zip(names, ranks, strict=True)}
    lim: dict[str, float] = {}

    def process(step: BlockStep) -> None:
        lim[step.name] = -input_output_cosine(step)

    context.run_blocks(model, process, sequential=False, desc=f"importance ({score})")
    return {name: -value for name, value in lim.items()} if score == "reverse" else lim


def size_model(model: nn.Module, config: LayerwiseQuantConfig,
               dtype: torch.dtype | None) -> tuple[int, dict[str, dict[int, int]]]:
    """(bytes of everything not quantized, headers included; block name -> {bits: bytes of its quantized layers})
    for the weight files, from the shapes alone (works on a weightless model). Floating tensors in `dtype`."""
    layers = quantization_targets(model, config)
    group_size = resolve_group_size({weight_matrix(layer).shape[1] for layer in layers.values()}, config.group_size)
    element = (dtype or next(iter(layers.values())).weight.dtype).itemsize
    tensors = len(model.state_dict()) + 2 * len(layers)       # a quantized weight is stored as three tensors
    fixed = stored_bytes(model, None, dtype) + HEADER_BYTES_PER_TENSOR * tensors
    fixed -= sum(weight_matrix(layer).numel() for layer in layers.values()) * element
    shapes = {prefix: [weight_matrix(layer).shape for name, layer in layers.items() if name.startswith(prefix + ".")]
              for prefix, _ in named_blocks(model)}
    per_block = {prefix: {bits: sum(stored_layer_bytes(*shape, bits, group_size, element) for shape in block)
                          for bits in {*config.bits, *config.layer_bits}}
                 for prefix, block in shapes.items() if block}
    return fixed, per_block


def size_cost(fixed: int, per_block: dict[str, dict[int, int]], names: list[str]) -> Callable[[list[int]], float]:
    """cost(bits per block, in the order of `names`) = stored bytes of the weight files."""
    return lambda bits: fixed + sum(per_block[name][b] for name, b in zip(names, bits, strict=True)
                                    if name in per_block)


def block_bits(model: nn.Module, config: LayerwiseQuantConfig, context: Context,
               size: Callable[[list[int]], float] | None = None) -> tuple[dict[str, int], dict]:
    """(block name -> bit-width, block name -> importance score or {}); `size` (bytes of the weight files for bits
    per block) is the measure when `config.target_size` is given."""
    names = [name for name, _ in named_blocks(model)]
    if config.layer_bits:
        return dict(zip(names, config.layer_bits, strict=True)), {}
    importance = block_importance(model, config.score, context, zd_direction=config.zd_direction,
                                  shuffle_seed=config.shuffle_seed)
    scores = [importance[name] for name in names]
    if config.target_size is None:
        bits = allocate_bits(scores, config.bits, config.avg_bits)
    else:
        bits = allocate_bits(scores, config.bits, parse_size(config.target_size), size)
    return dict(zip(names, bits, strict=True)), importance


def layerwise_check(model: nn.Module, config: LayerwiseQuantConfig) -> list[str]:
    """Before loading: the block count for layer_bits, and a target size within what the levels can reach (the
    weightless model carries the dtype the weights are stored in)."""
    names = [name for name, _ in named_blocks(model)]
    if config.layer_bits and len(config.layer_bits) != len(names):
        raise InvalidOptionError(f"layer_bits has {len(config.layer_bits)} entries; the model has {len(names)} "
                                 "blocks")
    layers = quantization_check(model, config)
    if config.target_size is not None:
        cost = size_cost(*size_model(model, config, None), names)
        target, low, high = parse_size(config.target_size), cost([min(config.bits)] * len(names)), \
            cost([max(config.bits)] * len(names))
        if not low <= target <= high:
            raise InvalidOptionError(f"target_size {config.target_size} ({target / 1e6:.3f} MB) is outside what the "
                                     f"levels {list(config.bits)} reach: {low / 1e6:.3f} MB (every block at "
                                     f"{min(config.bits)} bits) to {high / 1e6:.3f} MB (every block at "
                                     f"{max(config.bits)} bits), unquantized tensors such as the embeddings "
                                     "included")
    return layers


def layerwise_quant(model: nn.Module, config: LayerwiseQuantConfig, context: Context) -> Report:
    """Layer-wise quantization: rank the blocks by importance and give the least important ones fewer bits."""
    layers = quantization_targets(model, config)
    group_size = resolve_group_size({weight_matrix(layer).shape[1] for layer in layers.values()}, config.group_size)
    storage = context.storage_dtype or next(iter(layers.values())).weight.dtype
    names = [name for name, _ in named_blocks(model)]
    size = size_cost(*size_model(model, config, storage), names) if config.target_size is not None else None
    bits, importance = block_bits(model, config, context, size)
    layer_bits = {name: bits[prefix] for prefix in bits for name in layers if name.startswith(prefix + ".")}
    if config.quantizer == "gptq":
        modules = gptq_blocks(model, layer_bits, group_size, storage, context)
    else:
        modules = rtn_layers(layers, layer_bits, group_size, storage, context)
    quantized_blocks = {prefix for prefix in bits for name in layer_bits if name.startswith(prefix + ".")}
    nominal = sum(bits[prefix] for prefix in quantized_blocks) / len(quantized_blocks)
    stats = {"avg_bits_nominal": round(nominal, 4), "group_size": group_size, "layers": len(modules),
             "block_bits": list(bits.values()), "importance": {k: round(v, 6) for k, v in importance.items()}}
    if size is not None:
        stats["planned_bytes"] = int(size([bits[name] for name in names]))
    return Report("layerwise_quant", stats, modules)
