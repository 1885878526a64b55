"""Remote-code writer: changes no stock architecture expresses (low-rank pairs, skipped attention / MLP sub-layers).

The weights are written densely as the model holds them (a low-rank pair as its two factors `first` / `second`,
a skipped sub-layer not at all, so the repo really shrinks). config.json keeps every field of the base config but
gets `model_type: hfcompress`, `architectures: [HfCompressModel]`, an `auto_map`, and under `hfcompress` the base
model type and architecture and the structure entries that need modules of their own. `hfcompress/modules.py` is
copied beside it as `modeling_hfcompress.py`: one file, the same for every architecture, which builds the base
architecture and applies those entries. Plain `from_pretrained` then stops with transformers' request for
`trust_remote_code=True` (the model type is unknown to it) instead of loading the stock class with missing weights;
`hfcompress.load` builds the model with its own copy of that file and runs no code from the repo.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import modules
from ..structure import replacing_kinds
from . import compressed_tensors
from .dense import storage_state_dict, write


def save(model: nn.Module, folder: Path, structure: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """Write weights, the remote-code config and the modeling file; return what loading needs."""
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    entries = {name: {kind: entry[kind] for kind in replacing_kinds(entry)}
               for name, entry in structure.modules.items() if replacing_kinds(entry)}
    hfcompress = {"auto_class": "AutoModelForCausalLM" if causal else "AutoModel", "modules": entries}
    if structure.of_kind("quantized"):  # e.g. quantized low-rank factors: packed as the compressed-tensors writer does
        state, quantization, packages = compressed_tensors.packed(model, structure, dtype)
    else:
        state, quantization, packages = storage_state_dict(model, dtype), (lambda config: config), []
    write(model, folder, state, dtype, lambda config: modules.remote_code_config(quantization(config), hfcompress))
    shutil.copyfile(modules.__file__, folder / modules.MODELING_FILE)
    return {"format": "remote-code", "packages": packages, "trust_remote_code": True}
