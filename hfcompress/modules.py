"""The few modules compressed models hold, structural edits that keep a model a normal transformers model, and the
loader of the remote-code form.

Modules:
- `LowRankLinear`: W (out, in) replaced by the product of two thin Linear layers, `second(first(x))` with
  first (rank, in) and second (out, rank, bias).
- `SkippedAttention` / `SkippedMLP`: a dropped sub-layer. It returns zeros, so the block's residual path carries the
  hidden states through unchanged (the norm in front of it goes with it: replaced by nn.Identity). A skipped
  attention allocates no KV cache, except that the first layer of each attention type keeps a (batch, 1, T, 1)
  placeholder, because transformers reads the cache length and the mask size from that layer.

Edits: `replace_module`, `remove_blocks` (renumbers the stack, rewrites `num_hidden_layers` and every per-layer
config list such as `layer_types`, and fixes each attention's `layer_idx` so the KV cache lines up), and
`skip_sublayer`. The block-stack discovery of `sequential.py` keeps working on edited models.

Remote-code form: when a model holds changes no stock architecture expresses (low-rank pairs, skipped
sub-layers), hfcompress writes this very file into the repo as `modeling_hfcompress.py`, sets the config's
`model_type` to `hfcompress` (so plain loading cannot fall back to the stock class with missing weights: it stops
and asks for `trust_remote_code=True`) and records the base architecture and the structure map under the config's
`hfcompress` key. `HfCompressModel.from_pretrained` builds the base architecture from that config, applies the map
(`apply_structure`), then loads the weights as the base class would. The file depends on torch and transformers
only, and the code is the same for every architecture.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

MODELING_FILE = "modeling_hfcompress.py"


class LowRankLinear(nn.Module):
    """y = second(first(x)): first (rank, in) without bias, second (out, rank) with the original layer's bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class SkippedAttention(nn.Module):
    """A dropped attention: contributes zeros to the residual stream and stores (almost) nothing in the KV cache."""

    def __init__(self, layer_idx: int, keeps_length: bool) -> None:
        super().__init__()
        self.layer_idx, self.keeps_length = layer_idx, keeps_length

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, cache: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if hidden_states is None:
            hidden_states = args[0]
        cache = cache if cache is not None else past_key_values  # transformers 5 renamed it `cache`
        if self.keeps_length and cache is not None:
            batch, seq = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)             # (batch, heads=1, seq, dim=1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """A dropped MLP: contributes zeros to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at the dotted `name` of `model`; return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def text_config(config: Any) -> Any:
    """The text decoder's config of a multimodal config, else the config itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def remove_blocks(model: nn.Module, stack_name: str, indices: list[int]) -> tuple[dict[str, str | None],
                                                                                     dict[str, Any]]:
    """Remove the blocks `indices` of the ModuleList at `stack_name`; return (renamed, config changes).

    renamed maps every old block prefix to its new one (None for a removed block), for the structure map. The
    config's `num_hidden_layers` and every list with one entry per layer are rewritten; every `layer_idx` inside the
    remaining blocks becomes the block's new index, so each attention writes its own slot of the KV cache."""
    stack = model.get_submodule(stack_name)
    gone = sorted(set(indices))
    if not gone or gone[0] < 0 or gone[-1] >= len(stack) or len(gone) == len(stack):
        raise ValueError(f"cannot remove blocks {indices} of {len(stack)}: keep at least one, indices in range")
    kept = [i for i in range(len(stack)) if i not in gone]
    renamed: dict[str, str | None] = {f"{stack_name}.{i}": None for i in gone}
    renamed.update({f"{stack_name}.{old}": f"{stack_name}.{new}" for new, old in enumerate(kept) if new != old})
    new_stack = nn.ModuleList([stack[i] for i in kept])
    replace_module(model, stack_name, new_stack)
    for new, block in enumerate(new_stack):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new

    config = _stack_config(model.config, stack_name)
    old_count = getattr(config, "num_hidden_layers", None)
    if old_count != len(stack):
        raise ValueError(f"{stack_name} has {len(stack)} blocks but its config says num_hidden_layers={old_count}; "
                         "cannot tell which config describes this stack")
    changes: dict[str, Any] = {}
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == old_count and not key.startswith("_"):
            changes[key] = [value[i] for i in kept]
    changes["num_hidden_layers"] = len(kept)
    for key, value in changes.items():
        setattr(config, key, value)
    return renamed, changes


def _stack_config(config: Any, stack_name: str) -> Any:
    """The (sub-)config that describes the block stack `stack_name`: the vision tower's for a vision stack, else the
    text decoder's."""
    vision = getattr(config, "vision_config", None)
    if vision is not None and "vision" in stack_name:
        return vision
    return text_config(config)


def first_of_its_type(config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` is the first of its attention type (transformers reads cache sizes from it)."""
    layer_types = getattr(text_config(config), "layer_types", None)
    if not layer_types:
        return layer_idx == 0
    return layer_types.index(layer_types[layer_idx]) == layer_idx


def skip_sublayer(model: nn.Module, block_name: str, part: str, layer_idx: int, module_name: str,
                  norm_name: str | None = None) -> dict[str, Any]:
    """Replace the `part` (`attention` or `mlp`) at `block_name.module_name` by its skipped form and the norm in
    front of it (`norm_name`, when it feeds that sub-layer alone) by nn.Identity; return the structure entries."""
    if part == "attention":
        skipped: nn.Module = SkippedAttention(layer_idx, first_of_its_type(model.config, layer_idx))
    elif part == "mlp":
        skipped = SkippedMLP()
    else:
        raise ValueError(f"part must be `attention` or `mlp`, got {part!r}")
    replace_module(model, f"{block_name}.{module_name}", skipped)
    entries = {f"{block_name}.{module_name}": {"dropped": {"part": part}}}
    if norm_name:
        replace_module(model, f"{block_name}.{norm_name}", nn.Identity())
        entries[f"{block_name}.{norm_name}"] = {"dropped": {"part": f"{part} norm"}}
    return entries


def apply_structure(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Replace the modules named in a structure map by their compressed forms (shapes only; weights come later):
    `lowrank` -> LowRankLinear of that rank, `dropped` attention / MLP -> the skipped forms, their norms -> Identity.
    Other kinds (sparse zeros) need no module of their own."""
    for name, entry in modules.items():
        if "lowrank" in entry and not entry["lowrank"].get("merged"):
            old = model.get_submodule(name)
            rows, columns = old.weight.shape[::-1] if type(old).__name__ == "Conv1D" else old.weight.shape
            replace_module(model, name, LowRankLinear(columns, rows, entry["lowrank"]["rank"],
                                                      bias=getattr(old, "bias", None) is not None))
        part = entry.get("dropped", {}).get("part")
        if part == "attention":
            layer_idx = getattr(model.get_submodule(name), "layer_idx", None)
            if layer_idx is None:
                layer_idx = int(name.rsplit(".", 2)[-2])  # `...layers.<index>.<attention>`
            replace_module(model, name, SkippedAttention(layer_idx, first_of_its_type(model.config, layer_idx)))
        elif part == "mlp":
            replace_module(model, name, SkippedMLP())
        elif part in ("attention norm", "mlp norm"):
            replace_module(model, name, nn.Identity())


class HfCompressConfig(PretrainedConfig):
    """The saved config of a remote-code output: the base config's fields plus `hfcompress` = {base_model_type,
    base_architecture, auto_class, modules (the structure entries that need modules of their own)}."""

    model_type = "hfcompress"

    def __init__(self, hfcompress: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.hfcompress = hfcompress or {}
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        """The base architecture's own config class with these values (it writes itself back as this config)."""
        skip = {"model_type", "auto_map", "hfcompress", "architectures", "transformers_version"}
        values = {k: v for k, v in self.to_dict().items() if k not in skip}
        base = AutoConfig.for_model(self.hfcompress["base_model_type"], **values)
        base.__class__ = _remembering_config(type(base))
        base.hfcompress = self.hfcompress
        return base


def remote_code_config(config: dict[str, Any], hfcompress: dict[str, Any]) -> dict[str, Any]:
    """config.json of a remote-code output, from the base model's config.json."""
    auto_class = hfcompress["auto_class"]
    base = {"base_model_type": config["model_type"], "base_architecture": (config.get("architectures") or [None])[0]}
    return {**config, "hfcompress": {**base, **hfcompress},  # a re-saved model keeps its recorded base
            "model_type": "hfcompress", "architectures": ["HfCompressModel"],
            "auto_map": {"AutoConfig": "modeling_hfcompress.HfCompressConfig",
                         auto_class: "modeling_hfcompress.HfCompressModel"}}


@functools.cache
def _remembering_config(base: type) -> type:
    """`base` config class that serializes itself as the remote-code config again (so re-saving stays correct)."""
    def to_dict(self) -> dict[str, Any]:
        data = base.to_dict(self)
        hfcompress = data.pop("hfcompress", None)
        return remote_code_config(data, hfcompress) if hfcompress else data

    return type(base.__name__, (base,), {"to_dict": to_dict})


@functools.cache
def _compressed_class(base: type) -> type:
    """`base` (e.g. LlamaForCausalLM) that applies the structure map when it is built, and writes this file beside
    the weights when it is saved."""
    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        apply_structure(self, config.hfcompress["modules"])

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        result = base.save_pretrained(self, save_directory, *args, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, MODELING_FILE))
        return result

    return type("HfCompressModel", (base,), {"__init__": __init__, "save_pretrained": save_pretrained})


class HfCompressModel(PreTrainedModel):
    """Entry point of the remote-code form: resolves to the base architecture with the structure map applied."""

    config_class = HfCompressConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args: Any, config: Any = None,
                        **kwargs: Any) -> PreTrainedModel:
        if not isinstance(config, HfCompressConfig):
            hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            config = HfCompressConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        model_class = _compressed_class(getattr(transformers, config.hfcompress["base_architecture"]))
        return model_class.from_pretrained(pretrained_model_name_or_path, *args, config=config.base_config(),
                                           **kwargs)

    @classmethod
    def _from_config(cls, config: HfCompressConfig, **kwargs: Any) -> PreTrainedModel:
        model_class = _compressed_class(getattr(transformers, config.hfcompress["base_architecture"]))
        return model_class._from_config(config.base_config(), **kwargs)
