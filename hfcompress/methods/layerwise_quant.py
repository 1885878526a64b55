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
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..context import Context
from ..errors import InvalidOptionError
from ..options import option
from ..quantization import QuantizationConfig, quantization_check, quantization_targets, resolve_group_size
from ..registry import Report, register
from ..sequential import BlockStep, find_linears, hidden_states_of, named_blocks, weight_matrix
from ..statistics import mean_cosine
from .gptq import gptq_blocks
from .rtn import rtn_layers

SCORES = ("lim", "zd", "random", "reverse")


@dataclass(frozen=True)
class LayerwiseQuantConfig(QuantizationConfig):
    method: ClassVar[str] = "layerwise_quant"
    bits: tuple[int, ...] = option((4, 2), "bit-width levels, high to low (two or more, e.g. `4,2` or `8,4,2`)")
    avg_bits: float | None = option(None, "average bit-width over the blocks, between the lowest and highest level "
                                          "(e.g. 3.5 with 4,2: three quarters of the blocks at 4 bits)")
    score: str = option("lim", "block importance: `lim` (input/output cosine on calibration data), `zd` (weight "
                               "z-scores, no data), `random`, `reverse` (LIM reversed)", choices=SCORES)
    zd_direction: str = option("low", "with score zd: whether a `low` or a `high` share of large weights marks an "
                                      "important block", choices=("low", "high"))
    shuffle_seed: int = option(0, "seed of the `random` order")
    layer_bits: tuple[int, ...] = option((), "explicit bit-width of every block, in order (instead of score and "
                                             "avg_bits)")
    quantizer: str = option("rtn", "quantizer under the allocation", choices=("rtn", "gptq"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_bits:
            bad = [b for b in self.layer_bits if not 2 <= b <= 8]
            if bad:
                raise InvalidOptionError(f"layer_bits must be between 2 and 8, got {bad}")
            return
        if len(self.bits) < 2:
            raise InvalidOptionError(f"layerwise_quant needs two or more bit levels (e.g. --bits 4,2), got "
                                     f"{list(self.bits)}; for one bit-width use rtn or gptq")
        if self.avg_bits is None:
            raise InvalidOptionError("give --avg-bits (the average bit-width over the blocks) or --layer-bits")
        if not min(self.bits) <= self.avg_bits <= max(self.bits):
            raise InvalidOptionError(f"avg_bits {self.avg_bits} is outside the levels' range "
                                     f"[{min(self.bits)}, {max(self.bits)}]")


def allocate_bits(importance: list[float], levels: tuple[int, ...], avg_bits: float) -> list[int]:
    """Bit-width per block: monotone in `importance` (more important, at least as many bits), with the largest
    average <= avg_bits; among equal averages, the fewest blocks at the lowest levels."""
    blocks = len(importance)
    order = sorted(range(blocks), key=lambda i: (importance[i], i))       # least important first
    best, best_key = None, None
    for cuts in itertools.combinations_with_replacement(range(blocks + 1), len(levels) - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, blocks), strict=True)]   # blocks per level, low first
        average = sum(n * bits for n, bits in zip(counts, sorted(levels), strict=True)) / blocks
        if average > avg_bits + 1e-9:
            continue
        key = (round(average, 9), [-n for n in counts])
        if best_key is None or key > best_key:
            best, best_key = counts, key
    bits = [0] * blocks
    position = 0
    for count, level in zip(best, sorted(levels), strict=True):
        for index in order[position:position + count]:
            bits[index] = level
        position += count
    return bits


def zd_score(block: nn.Module, direction: str) -> float:
    """Share of the block's Linear weights with z-score > 1 (over the whole block), signed by `direction`."""
    weights = torch.cat([weight_matrix(layer).detach().float().flatten() for layer in find_linears(block).values()])
    share = ((weights - weights.mean()) / weights.std() > 1).float().mean().item()
    return -share if direction == "low" else share


def block_importance(model: nn.Module, config: LayerwiseQuantConfig, context: Context) -> dict[str, float]:
    """Block name -> importance (higher = more important) for `config.score`."""
    names = [name for name, _ in named_blocks(model)]
    if config.score == "zd":
        return {name: zd_score(block, config.zd_direction) for name, block in named_blocks(model)}
    if config.score == "random":
        ranks = list(range(len(names)))
        random.Random(config.shuffle_seed).shuffle(ranks)
        return {name: float(rank) for name, rank in zip(names, ranks, strict=True)}
    lim: dict[str, float] = {}

    def process(step: BlockStep) -> None:
        outputs = step.run()
        inputs = [hidden_states_of(args, kwargs) for args, kwargs in step.inputs]
        lim[step.name] = -mean_cosine(zip(inputs, outputs, strict=True))

    context.run_blocks(model, process, sequential=False, desc="layerwise_quant: importance")
    return {name: -score for name, score in lim.items()} if config.score == "reverse" else lim


def block_bits(model: nn.Module, config: LayerwiseQuantConfig, context: Context) -> tuple[dict[str, int], dict]:
    """(block name -> bit-width, block name -> importance score or None)."""
    names = [name for name, _ in named_blocks(model)]
    if config.layer_bits:
        return dict(zip(names, config.layer_bits, strict=True)), {}
    importance = block_importance(model, config, context)
    bits = allocate_bits([importance[name] for name in names], config.bits, config.avg_bits)
    return dict(zip(names, bits, strict=True)), importance


def layerwise_check(model: nn.Module, config: LayerwiseQuantConfig) -> list[str]:
    blocks = len(list(named_blocks(model)))
    if config.layer_bits and len(config.layer_bits) != blocks:
        raise InvalidOptionError(f"layer_bits has {len(config.layer_bits)} entries; the model has {blocks} blocks")
    return quantization_check(model, config)


@register(LayerwiseQuantConfig, paper="https://arxiv.org/abs/2406.17415", needs_calibration=True,
          supports=("causal-lm", "encoder"), check=layerwise_check, changes="quantized")
def layerwise_quant(model: nn.Module, config: LayerwiseQuantConfig, context: Context) -> Report:
    """Layer-wise quantization: rank the blocks by importance and give the least important ones fewer bits."""
    layers = quantization_targets(model, config)
    group_size = resolve_group_size({weight_matrix(layer).shape[1] for layer in layers.values()}, config.group_size)
    storage = context.storage_dtype or next(iter(layers.values())).weight.dtype
    bits, importance = block_bits(model, config, context)
    layer_bits = {name: bits[prefix] for prefix in bits for name in layers if name.startswith(prefix + ".")}
    if config.quantizer == "gptq":
        modules = gptq_blocks(model, layer_bits, group_size, storage, context)
    else:
        modules = rtn_layers(layers, layer_bits, group_size, storage, context)
    quantized_blocks = {prefix for prefix in bits for name in layer_bits if name.startswith(prefix + ".")}
    nominal = sum(bits[prefix] for prefix in quantized_blocks) / len(quantized_blocks)
    return Report("layerwise_quant", {"avg_bits_nominal": round(nominal, 4), "group_size": group_size,
                                      "layers": len(modules), "block_bits": list(bits.values()),
                                      "importance": {k: round(v, 6) for k, v in importance.items()}}, modules)
