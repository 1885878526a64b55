"""compressed-tensors writer: quantized Linear layers as packed integers with per-group scales.

For each quantized layer `name` the file holds, instead of `name.weight`:
    name.weight_packed  int32 (out, ceil(in * bits / 32))  the b-bit integers q + 2^(b-1), packed densely: element j
                        of a row occupies bits [j*b, j*b + b) of the row's bit string, 32 bits per int32 word
    name.weight_scale   (out, in / group_size) in the storage dtype
    name.weight_shape   int64 (2,) = (out, in)
and config.json gains a `quantization_config` (quant_method `compressed-tensors`, format `pack-quantized`) with one
config group per (bits, group size) whose `targets` are the layers' exact names. Plain `from_pretrained` loads it
once `pip install compressed-tensors` is done (dequantizing w = q * s, which is the model as it was in memory), and
vLLM serves the 4- and 8-bit forms. For bit-widths that do not divide 32 (3, 5, 6, 7) this dense packing is the one
compressed-tensors 0.20 reads; older releases packed those differently and refuse the shapes.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..quantization import layer_integers
from .dense import storage_state_dict, write

PACKAGE = "compressed-tensors"
SERVED_BITS = (4, 8)  # vLLM's compressed-tensors integer kernels (W4A16, W8A16)


def kernel_warning(bit_widths: set[int]) -> str | None:
    """Why some of these bit-widths will not run fast outside transformers, or None when all of them do."""
    others = sorted(set(bit_widths) - set(SERVED_BITS))
    if not others:
        return None
    return (f"{'/'.join(map(str, others))}-bit layers have no vLLM kernel (vLLM serves 4- and 8-bit integer groups)"
            "; the model loads in transformers, which dequantizes the weights, and `hfcompress export` stores 3-, 5-, "
            "6- and 7-bit layers in ONNX Runtime's next MatMulNBits width (4 or 8 bits: the same values, that "
            "width's size)")


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed b-bit integers q (out, in) int8 into int32 words (out, ceil(in * b / 32)), offset by 2^(b-1)."""
    rows, cols = q.shape
    values = q.to(torch.int64) + 2 ** (bits - 1)                          # (out, in) in [0, 2^b)
    words = -(-cols * bits // 32)
    start = torch.arange(cols, device=q.device) * bits                   # first bit of each element
    word, offset = start // 32, start % 32
    packed = torch.zeros(rows, words + 1, dtype=torch.int64, device=q.device)
    packed.scatter_add_(1, word.expand(rows, -1), (values << offset) & 0xFFFFFFFF)
    spill = offset + bits - 32                                            # bits that overflow into the next word
    crosses = spill > 0
    if crosses.any():
        packed.scatter_add_(1, (word[crosses] + 1).expand(rows, -1), values[:, crosses] >> (bits - spill[crosses]))
    packed = packed[:, :words]
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)  # the same 32 bits, signed


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 words (out, ceil(in * b / 32)) -> signed b-bit integers (out, in) int8."""
    words = packed.to(torch.int64) & 0xFFFFFFFF                           # the unsigned 32-bit words
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)     # a zero word after the last spill
    start = torch.arange(columns, device=packed.device) * bits
    word, offset = start // 32, start % 32
    values = ((words[:, word] >> offset) | (words[:, word + 1] << (32 - offset))) & ((1 << bits) - 1)
    return (values - 2 ** (bits - 1)).to(torch.int8)


def stored_layer_bytes(rows: int, columns: int, bits: int, group_size: int, scale_bytes: int) -> int:
    """Bytes this writer stores for one quantized (rows, columns) weight: packed words, scales and the shape."""
    return rows * -(-columns * bits // 32) * 4 + rows * (columns // group_size) * scale_bytes + 2 * 8


def package_requirement(bit_widths: set[int]) -> str:
    """The pip requirement that reads these bit-widths correctly."""
    return PACKAGE if bit_widths <= {1, 2, 4, 8} else f"{PACKAGE}>=0.20"


def quantization_config(quantized: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config.json's `quantization_config`: one group per (bits, group size), targets by exact module name."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, entry in quantized.items():
        groups.setdefault((entry["bits"], entry["group_size"]), []).append(name)
    config_groups = {}
    for index, ((bits, group_size), names) in enumerate(sorted(groups.items(), reverse=True)):
        config_groups[f"group_{index}"] = {
            "targets": sorted(names), "format": "pack-quantized", "input_activations": None,
            "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "observer": None, "actorder": None}}
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "0.20.1"  # the release whose layout this writer follows
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None, "sparsity_config": {},
            "version": version}


def packed(model: nn.Module, structure: Any, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor],
                                                                               Callable[[dict], dict], list[str]]:
    """(state dict with the quantized layers packed, the edit that adds `quantization_config` to config.json, the
    pip requirements loading needs): what this writer adds, for it and for the remote-code writer."""
    quantized = structure.of_kind("quantized")
    state = storage_state_dict(model, dtype)
    modules = dict(model.named_modules())
    for name, entry in quantized.items():
        q, scale = layer_integers(modules[name], entry["bits"])
        del state[f"{name}.weight"]
        state[f"{name}.weight_packed"] = pack_int32(q.cpu(), entry["bits"])
        state[f"{name}.weight_scale"] = scale.to("cpu", dtype or scale.dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
    groups = quantization_config(quantized)
    bit_widths = {entry["bits"] for entry in quantized.values()}
    return state, lambda config: {**config, "quantization_config": groups}, [package_requirement(bit_widths)]


def saved_integers(location: str | Path, quantized: dict[str, dict[str, Any]]) -> dict[str, tuple]:
    """(q (out, in) int8, scale (out, in / group) float32) of each quantized layer, read from the saved files."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    wanted = {f"{name}.{part}" for name in quantized for part in ("weight_packed", "weight_scale", "weight_shape")}
    for shard in sorted(Path(location).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as weights:
            tensors.update({key: weights.get_tensor(key) for key in weights.keys() if key in wanted})
    return {name: (unpack_int32(tensors[f"{name}.weight_packed"], entry["bits"],
                                int(tensors[f"{name}.weight_shape"][1])), tensors[f"{name}.weight_scale"].float())
            for name, entry in quantized.items()}


def load_unpacked(resolved: Any, quantized: dict[str, dict[str, Any]], dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """A saved output as the model it was in memory: stock modules, each quantized layer holding w = q * s with its
    scales in `weight_scale`, from the saved integers (no compressed-tensors code in the way, whose dequantizing
    loader refuses some mixed-width checkpoints). Returns (model, {name: (q, scale)})."""
    import copy

    from transformers.utils import logging

    from ..formats import load
    from ..quantization import store_quantized

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantized:  # load the rest as a stock model; the quantized weights are filled in below
        config = copy.deepcopy(resolved.config)
        del config.quantization_config
        kwargs["config"] = config
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the quantized layers' `weight` is reported missing: it is set right after
    try:
        model = load(resolved.location, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    modules, integers = dict(model.named_modules()), saved_integers(resolved.location, quantized)
    with torch.no_grad():
        for name, (q, scale) in integers.items():
            store_quantized(modules[name], q, scale, scale.dtype)
    return model, integers


def save(model: nn.Module, folder: Path, structure: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """Write the model with its quantized layers packed; return what loading it needs."""
    state, edit_config, packages = packed(model, structure, dtype)
    write(model, folder, state, dtype, edit_config)
    return {"format": "compressed-tensors", "packages": packages, "trust_remote_code": False}
