"""RTN: round-to-nearest weight quantization with symmetric per-group scales (the baseline of GPTQ, arXiv 2210.17323).

Every targeted Linear weight is cut into groups of `group_size` consecutive input columns per output row; each group
gets one scale s = max|w| / (2^(b-1) - 1/2) and its weights become q * s with q = round(w / s) clamped to b-bit
signed integers (see `quantization.py`). No calibration data. The result is saved in the compressed-tensors
pack-quantized format (b-bit integers packed into int32, one scale per group), which plain
`from_pretrained` loads once `compressed-tensors` is installed, and vLLM serves for 4 and 8 bits.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configs.rtn import RTNConfig
from ..context import Context
from ..quantization import (
    quantization_targets,
    quantize_layer,
    resolve_group_size,
)
from ..registry import Report
from ..sequential import weight_matrix
from ..structure import quantized


def rtn_layers(layers: dict[str, nn.Module], layer_bits: dict[str, int], group_size: int, storage: torch.dtype,
               context: Context) -> dict[str, dict]:
    """Round each layer of `layers` to its bit-width in `layer_bits`, with progress and cancel between layers;
    return their structure entries."""
    modules = {}
    for index, (name, layer) in enumerate(tqdm(layers.items(), desc="rtn", leave=False)):
        context.check_cancelled()
        context.report(index / len(layers), f"rtn: {name}")
        quantize_layer(layer, layer_bits[name], group_size, storage, context.device)
        modules[name] = quantized(layer_bits[name], group_size, "rtn")
    return modules


def rtn(model: nn.Module, config: RTNConfig, context: Context) -> Report:
    """RTN: round every weight to the nearest level of a b-bit symmetric grid, one scale per group of columns."""
    layers = quantization_targets(model, config)
    group_size = resolve_group_size({weight_matrix(layer).shape[1] for layer in layers.values()}, config.group_size)
    bits = config.bits[0]
    storage = context.storage_dtype or next(iter(layers.values())).weight.dtype
    modules = rtn_layers(layers, dict.fromkeys(layers, bits), group_size, storage, context)
    return Report("rtn", {"bits": bits, "group_size": group_size, "layers": len(modules)}, modules)
