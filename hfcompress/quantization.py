"""Shared pieces of the weight quantizers (`rtn`; the calibrated ones build on it): options, group sizes, targets and
the symmetric per-group integer grid, as pure functions.

Grid: for b bits and a group of `group_size` consecutive input columns of one output row, the scale is
s = max|w| / (2^(b-1) - 1/2) and q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1): the 2^b levels run from
-2^(b-1) s to (2^(b-1) - 1) s, and the largest weight in magnitude, +-(2^(b-1) - 1/2) s, lands at most half a step
from a level (the top one when positive). This is the
grid that compressed-tensors' symmetric integer format stores and dequantizes as w = q * s, so weights written in
that format load exactly as they were in memory. Scales are rounded to the dtype the weights are saved in before
q is computed, for the same reason.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .configs.quantization import AUTO, BITS, QuantizationConfig  # noqa: F401  (the quantizer API in one place)
from .errors import InvalidOptionError, UnsupportedModelError
from .sequential import Conv1D, block_stacks, find_linears, named_blocks, weight_matrix

SCALE_BUFFER = "weight_scale"  # (out, in / group_size) on each quantized layer, in the storage dtype


def resolve_group_size(widths: set[int], requested: str) -> int:
    """The group size for layers with these input widths: `requested`, checked, or the `auto` choice."""
    if requested == AUTO:
        for size in (128, 64, 32, 16):
            if all(width % size == 0 for width in widths):
                return size
        raise UnsupportedModelError(f"no power of two >= 16 divides every targeted width {sorted(widths)}; give "
                                    f"--group-size, one of {_common_divisors(widths)}")
    size = int(requested)
    bad = sorted(width for width in widths if width % size)
    if bad:
        raise InvalidOptionError(f"group_size {size} does not divide the targeted widths {bad}; sizes that divide "
                                 f"every width {sorted(widths)}: {_common_divisors(widths)}")
    return size


def _common_divisors(widths: set[int]) -> list[int] | str:
    gcd = math.gcd(*widths)
    found = [d for d in range(8, gcd + 1) if gcd % d == 0][:12]
    return found or f"none >= 8 (the widths' greatest common divisor is {gcd}); leave those layers out with --targets"


def quantization_targets(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module]:
    """Layer name -> Linear to quantize, checked: targets match something, compressed-tensors can store them."""
    block_stacks(model)
    layers = {name: layer for prefix, block in named_blocks(model)
              for name, layer in find_linears(block, config.targets, prefix).items()}
    if not layers:
        raise InvalidOptionError(f"targets {list(config.targets)} match no Linear layer of the blocks")
    conv = [name for name, layer in layers.items() if isinstance(layer, Conv1D)]
    if conv:
        raise UnsupportedModelError(f"{type(model).__name__} stores its layers as GPT-2 Conv1D ({conv[0]}, ...), "
                                    "which the compressed-tensors format cannot hold; quantization supports "
                                    "nn.Linear models")
    return layers


def quantization_check(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """The registry check of the quantizers: targets and group size fit the model (before any weight loads)."""
    layers = quantization_targets(model, config)
    resolve_group_size({weight_matrix(layer).shape[1] for layer in layers.values()}, config.group_size)
    return list(layers)


def symmetric_scales(weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group scales (out, in / group_size) of weight (out, in), rounded to `dtype` (the storage dtype) and
    returned in fp32. An all-zero group gets scale 1 (its weights quantize to 0 whatever the scale)."""
    groups = weight.float().reshape(weight.shape[0], -1, group_size)        # (out, in/g, g)
    scale = groups.abs().amax(dim=-1) / (2 ** (bits - 1) - 0.5)             # (out, in/g)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(dtype).float()


def quantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers q (out, in) as int8, q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1), for per-group `scale`."""
    group_size = weight.shape[1] // scale.shape[1]
    groups = weight.float().reshape(*scale.shape, group_size)              # (out, in/g, g)
    q = torch.round(groups / scale.unsqueeze(-1)).clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.reshape(weight.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w = q * s in fp32, (out, in), as compressed-tensors computes it when it loads the weights."""
    group_size = q.shape[1] // scale.shape[1]
    groups = q.float().reshape(*scale.shape, group_size) * scale.float().unsqueeze(-1)
    return groups.reshape(q.shape)


@torch.no_grad()
def quantize_layer(layer: nn.Module, bits: int, group_size: int, dtype: torch.dtype,
                   device: torch.device | str) -> dict[str, Any]:
    """Replace the layer's weight by its quantized value (w = q * s, in the layer's dtype) and keep the scales on
    the layer as the non-persistent buffer `weight_scale`, for the compressed-tensors writer."""
    w = weight_matrix(layer).detach().to(device, torch.float32)
    scale = symmetric_scales(w, bits, group_size, dtype)
    store_quantized(layer, quantize(w, scale, bits), scale, dtype)
    return {"bits": bits, "group_size": group_size}


@torch.no_grad()
def store_quantized(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """Set the layer's weight to q * s (in the layer's dtype) and keep `scale` (out, in / group_size) on it as the
    non-persistent buffer `weight_scale`, for the compressed-tensors writer."""
    weight = weight_matrix(layer)
    weight.copy_(dequantize(q, scale).to(weight.device, weight.dtype))
    layer.register_buffer(SCALE_BUFFER, scale.to(layer.weight.device, dtype), persistent=False)


def layer_integers(layer: nn.Module, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (out, in) int8, scale) of a quantized layer, recovered exactly: its weight is q * s."""
    scale = getattr(layer, SCALE_BUFFER, None)
    if scale is None:
        raise ValueError(f"{type(layer).__name__} has no `{SCALE_BUFFER}`: it was not quantized by hfcompress")
    return quantize(weight_matrix(layer).detach(), scale.float(), bits), scale
