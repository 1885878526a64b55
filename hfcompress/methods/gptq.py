"""GPTQ: calibrated weight quantization with error feedback through the Hessian (Frantar et al., 2022,
arXiv 2210.17323).

Same grid and storage as `rtn` (symmetric b-bit integers, one scale per group of `group_size` input columns, saved
in the compressed-tensors format), but each Linear layer is quantized column by column with the inverse Hessian of
its inputs, H = 2 X^T X over every calibration token (fp32, dampened by `damp` x its mean diagonal): quantizing
column j leaves an error (w_j - q_j s) / [U]_jj, which is spread over the columns not yet quantized through row j of
U, the upper Cholesky factor of H^-1, so that the layer's output on the calibration data moves as little as
possible. Columns go in blocks of `block_size` (the error reaches the columns after a block in one matrix product).
A group's scale is taken from its weights as updated when the loop reaches its first column. `act_order: true` (the
default) visits columns by decreasing Hessian diagonal (the most active inputs first); the scales are then fixed
from the original weights before the loop, as the authors' static groups do, so that every group still holds
consecutive columns (no reordering at inference). Dead input channels (zero Hessian diagonal) get a unit diagonal
and zero weights, as in the authors' code. Weights that are exactly zero (a pruned model) quantize to zero whatever
the updates brought them, their error going to the columns left like any other, so quantizing after pruning keeps
the mask. Blocks are processed in order, each block's inputs coming from the already-quantized blocks before it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs.gptq import GPTQConfig
from ..context import Context
from ..quantization import (
    quantization_targets,
    resolve_group_size,
    store_quantized,
    symmetric_scales,
)
from ..registry import Report
from ..sequential import BlockStep, named_blocks, weight_matrix
from ..statistics import InputStatistics
from ..structure import quantized
from .sparsegpt import inverse_hessian_factor, without_dead_channels


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype,
                  block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weight (out, in) with error feedback; return (q (out, in) int8, scale (out, in / group_size) fp32,
    rounded to `dtype`), so that the quantized weight is `dequantize(q, scale)`."""
    weight, hessian = without_dead_channels(weight, hessian)
    rows, columns = weight.shape
    if act_order:
        scale = symmetric_scales(weight, bits, group_size, dtype)            # (out, in/g), fixed up front
        order = torch.argsort(hessian.diagonal(), descending=True)
    else:
        scale = torch.zeros(rows, columns // group_size, device=weight.device)
        order = torch.arange(columns, device=weight.device)
    weight, hessian = weight[:, order], hessian[order][:, order]
    pruned = weight == 0                                                     # (out, in): zeros stay zeros
    factor = inverse_hessian_factor(hessian, damp)                           # (in, in), upper triangular
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.zeros_like(weight)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        w = weight[:, start:end].clone()                                    # (out, b), updated as columns go
        errors = torch.zeros_like(w)
        for column in range(end - start):
            index = start + column
            group = int(order[index]) // group_size
            if not act_order and index % group_size == 0:  # a group starts: its scale from its weights as they are
                span = torch.cat([w[:, column:], weight[:, end:]], dim=1)[:, :group_size]
                scale[:, group] = symmetric_scales(span, bits, group_size, dtype)[:, 0]
            s = scale[:, group]
            q[:, index] = torch.round(w[:, column] / s).clamp_(low, high).masked_fill_(pruned[:, index], 0)
            error = (w[:, column] - q[:, index] * s) / factor[index, index]  # (out,)
            w[:, column:] -= error.unsqueeze(1) * factor[index, index:end].unsqueeze(0)
            errors[:, column] = error
        weight[:, end:] -= errors @ factor[start:end, end:]                  # the block's error, on later columns
    unpermuted = torch.empty_like(q)
    unpermuted[:, order] = q
    return unpermuted.to(torch.int8), scale


def gptq_blocks(model: nn.Module, layer_bits: dict[str, int], group_size: int, storage: torch.dtype,
                context: Context, *, damp: float = 0.01, block_size: int = 128,
                act_order: bool = True) -> dict[str, dict]:
    """Quantize the layers of `layer_bits` ({layer name: bits}) with GPTQ, block by block, each block's Hessians
    from the outputs of the already-quantized blocks; return their structure entries."""
    layers = dict(model.named_modules())
    by_block = {prefix: {name: layers[name] for name in layer_bits if name.startswith(prefix + ".")}
                for prefix, _ in named_blocks(model)}
    modules = {}

    def process(step: BlockStep) -> None:
        targets = by_block[step.name]
        if not targets:
            return
        with InputStatistics(targets, ("hessian",)) as stats:
            step.run()
        for name, layer in targets.items():
            q, scale = gptq_quantize(weight_matrix(layer).detach().float(), 2 * stats.hessian(name), layer_bits[name],
                                     group_size, storage, block_size, damp, act_order)
            store_quantized(layer, q, scale, storage)
            modules[name] = quantized(layer_bits[name], group_size, "gptq")

    context.run_blocks(model, process, desc="gptq")
    return modules


def gptq(model: nn.Module, config: GPTQConfig, context: Context) -> Report:
    """GPTQ: quantize column by column, spreading each rounding error over the columns left (inverse Hessian)."""
    layers = quantization_targets(model, config)
    group_size = resolve_group_size({weight_matrix(layer).shape[1] for layer in layers.values()}, config.group_size)
    bits = config.bits[0]
    storage = context.storage_dtype or next(iter(layers.values())).weight.dtype
    modules = gptq_blocks(model, dict.fromkeys(layers, bits), group_size, storage, context, damp=config.damp,
                          block_size=config.block_size, act_order=config.act_order)
    return Report("gptq", {"bits": bits, "group_size": group_size, "layers": len(modules)}, modules)
