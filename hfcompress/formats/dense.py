"""Dense writer: every weight stored as a plain floating tensor (pruned weights with their zeros in place).

The folder is a standard checkpoint of the base architecture: plain `from_pretrained` loads it with no extra
package, and so does every runtime that loads the base model. Tensors are cast to the storage dtype as they are
written; the model in memory is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

MAX_SHARD_SIZE = "2GB"


def storage_state_dict(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors in `dtype`. Tensors that share storage (tied embeddings) stay
    one object, so that transformers still recognises them as tied and writes them once."""
    cast: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in cast:
            cast[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        state[name] = cast[key]
    return state


def write(model: nn.Module, folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype | None,
          edit_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """save_pretrained with the given state dict; config.json then records `dtype` and goes through `edit_config`
    (the writers' own changes to it)."""
    model.save_pretrained(folder, state_dict=state, max_shard_size=MAX_SHARD_SIZE)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("_model_name_or_path", None)  # where the source was read from: meaningless in the output
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    if edit_config is not None:
        config = edit_config(config)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save(model: nn.Module, folder: Path, structure: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """Write the model densely; return what loading it needs (nothing beyond transformers)."""
    write(model, folder, storage_state_dict(model, dtype), dtype)
    return {"format": "dense", "packages": [], "trust_remote_code": False}
