"""Layer dropping (He et al., 2024, "What Matters in Transformers? Not All Attention is Needed", arXiv 2406.15786).

For pre-norm block l with input X, H = X + attention(norm(X)) and output Y = H + mlp(norm(H)), the similarity of a
module is the per-token cosine between what enters its residual branch and what leaves it, averaged over every
calibration token in fp32, as in the authors' released code (with its default of measuring before the norm):

    attention: cos(X, H)      mlp: cos(H, Y)      block: cos(X, Y)

A module whose output barely turns the residual stream (similarity near 1) is redundant: `drop` removes the `n`
most similar attention modules, MLP modules or blocks, or with `joint` the most similar of attention and MLP
modules ranked together. One-shot (the paper's default) scores the dense model once; `iterative` drops one module
at a time and scores again with the earlier drops applied. `score: influence` ranks blocks by ShortGPT's Block
Influence (Men et al., 2024, arXiv 2403.03853), 1 - cos(X, Y) averaged over the tokens: it is reported as such and,
being the same per-token cosine, picks the same blocks (lowest influence = highest similarity). `modules` names
the modules to drop instead (`model.layers.3.self_attn`, `model.layers.5.mlp`, `model.layers.7`).

Dropped blocks are removed (a smaller stock model: plain `from_pretrained`); dropped attention / MLP modules are
not stored and load through the remote-code writer (see `modules.py`); a dropped attention allocates no KV cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..configs.layer_drop import LayerDropConfig
from ..context import Context
from ..errors import InvalidOptionError, UnsupportedModelError, choices
from ..modules import SkippedAttention, SkippedMLP, remove_blocks, replace_module, skip_sublayer, text_config
from ..registry import Report
from ..sequential import BlockStep, block_stacks, hidden_output, hidden_states_of, with_hidden_output
from ..statistics import SubLayerProbes, input_output_cosine, mean_cosine
from ..structure import dropped

ATTENTION_NAMES, MLP_NAMES = ("self_attn", "attention", "attn"), ("mlp", "feed_forward")


@dataclass(frozen=True)
class SubLayers:
    """Child names of one pre-norm block: its attention and MLP, the norms that belong to each branch (the one in
    front first; Gemma 2/3 also normalize each branch's output), and the module whose output joins the residual
    stream after attention."""
    attention: str
    mlp: str
    attention_norms: tuple[str, ...]
    mlp_norms: tuple[str, ...]
    attention_residual: str


def sublayers(block: nn.Module) -> SubLayers | None:
    """The block's sub-layers, or None when it is not a pre-norm block with named attention and MLP children."""
    children = dict(block.named_children())
    attention = next((n for n in ATTENTION_NAMES if n in children), None)
    mlp = next((n for n in MLP_NAMES if n in children), None)
    if attention is None or mlp is None or "input_layernorm" not in children:
        return None
    if "pre_feedforward_layernorm" in children:                 # Gemma 2/3: norms before and after each branch
        return SubLayers(attention, mlp, ("input_layernorm", "post_attention_layernorm"),
                         ("pre_feedforward_layernorm", "post_feedforward_layernorm"), "post_attention_layernorm")
    mlp_norms = ("post_attention_layernorm",) if "post_attention_layernorm" in children else ()
    return SubLayers(attention, mlp, ("input_layernorm",), mlp_norms, attention)


def the_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    stacks = block_stacks(model)
    if len(stacks) != 1:
        raise UnsupportedModelError(f"layer_drop works on models with one stack of blocks; this one has "
                                    f"{choices([name for name, _ in stacks])}")
    return stacks[0]


def candidates(model: nn.Module, drop: str) -> dict[str, str]:
    """Droppable module name -> its kind (`attention`, `mlp`, `block`), in model order (`joint`: attention and MLP
    modules). Skipped sub-layers (an earlier step's) are not candidates."""
    stack_name, stack = the_stack(model)
    found: dict[str, str] = {}
    for index, block in enumerate(stack):
        prefix = f"{stack_name}.{index}"
        if drop == "block":
            found[prefix] = "block"
            continue
        parts = sublayers(block)
        if parts is None:
            raise UnsupportedModelError(f"{drop} drop needs pre-norm blocks with an attention "
                                        f"({choices(ATTENTION_NAMES)}), an MLP ({choices(MLP_NAMES)}) and "
                                        f"`input_layernorm`; {prefix} is {type(block).__name__}. --drop block works "
                                        "on any model")
        for kind, name in (("attention", parts.attention), ("mlp", parts.mlp)):
            if drop in (kind, "joint") and not isinstance(getattr(block, name), (SkippedAttention, SkippedMLP)):
                found[f"{prefix}.{name}"] = kind
    return found


def check_drops(model: nn.Module, names: list[str]) -> None:
    """Refuse names that are not droppable, and drops that leave no block, no attention or no MLP."""
    _, stack = the_stack(model)
    pre_norm = all(sublayers(block) is not None for block in stack)
    everything = {**candidates(model, "block"), **(candidates(model, "joint") if pre_norm else {})}
    unknown = [name for name in names if name not in everything]
    if unknown:
        raise InvalidOptionError(f"cannot drop {unknown}: not a block, attention or MLP of this model; e.g. "
                                 f"{choices(list(everything)[:3])}")
    for kind in {everything[name] for name in names}:
        if sum(everything[name] == kind for name in set(names)) >= sum(k == kind for k in everything.values()):
            raise InvalidOptionError(f"dropping {sorted(set(names))} would remove every {kind}; keep at least one")


@contextmanager
def muted(model: nn.Module, names: list[str]) -> Iterator[None]:
    """While active, the named blocks return their input and the named sub-layers return zeros, through forward
    hooks: the model computes as if they were dropped, and nothing about it changes for good."""
    def identity(module, args, kwargs, output):
        return with_hidden_output(output, hidden_states_of(args, kwargs))

    def zeros(module, args, output):
        return with_hidden_output(output, torch.zeros_like(hidden_output(output)))

    stack_name, _ = the_stack(model)
    handles = [model.get_submodule(name).register_forward_hook(identity, with_kwargs=True) if
               name.count(".") == stack_name.count(".") + 1 else
               model.get_submodule(name).register_forward_hook(zeros) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def similarities(model: nn.Module, drop: str, context: Context, earlier: list[str]) -> dict[str, float]:
    """Module name -> similarity (per-token cosine, fp32, all calibration tokens) for every candidate of `drop` not
    among the `earlier` picks, with those muted."""
    wanted = {name for name in candidates(model, drop) if name not in earlier}
    scores: dict[str, float] = {}

    def process(step: BlockStep) -> None:
        if drop == "block":
            similarity = input_output_cosine(step)
            if step.name in wanted:
                scores[step.name] = similarity
            return
        parts = sublayers(step.block)
        with SubLayerProbes(step.block, step.block.get_submodule(parts.attention_residual)) as probes:
            step.run()
        pairs = {parts.attention: (probes.block_input, probes.after_attention),
                 parts.mlp: (probes.after_attention, probes.block_output)}
        for child, (entering, leaving) in pairs.items():
            if f"{step.name}.{child}" in wanted:
                scores[f"{step.name}.{child}"] = mean_cosine(zip(entering, leaving, strict=True))

    with muted(model, earlier):
        context.run_blocks(model, process, sequential=False, desc="layer_drop scores")
    return scores


def choose(model: nn.Module, config: LayerDropConfig, context: Context) -> tuple[list[str], list[dict[str, float]]]:
    """(modules to drop in pick order, the similarities of each scoring round): the most similar first, skipping a
    pick that would leave no attention, MLP or block."""
    picks: list[str] = []
    rounds: list[dict[str, float]] = []
    while len(picks) < config.n:
        scores = similarities(model, config.drop, context, picks)
        rounds.append(scores)
        added = 0
        for name in sorted(scores, key=lambda name: scores[name], reverse=True):
            if len(picks) == config.n or (config.iterative and added):
                break
            try:
                check_drops(model, picks + [name])
            except InvalidOptionError:
                continue
            picks.append(name)
            added += 1
        if not added or (not config.iterative and len(picks) < config.n):
            raise InvalidOptionError(f"only {len(picks)} of n={config.n} modules can be dropped while one of each "
                                     "kind stays")
    return picks, rounds


def apply_drops(model: nn.Module, names: list[str]) -> Report:
    """Drop the named modules (blocks removed, sub-layers skipped with the norm feeding them); return the step's
    structure entries, block removals as renames and config changes."""
    stack_name, stack = the_stack(model)
    modules: dict[str, dict] = {}
    blocks = []
    for name in names:
        index, _, child = name[len(stack_name) + 1:].partition(".")
        if not child:
            blocks.append(int(index))
            continue
        parts, prefix = sublayers(stack[int(index)]), f"{stack_name}.{index}"
        part = "attention" if child == parts.attention else "mlp"
        norms = parts.attention_norms if part == "attention" else parts.mlp_norms
        modules.update(skip_sublayer(model, prefix, part, int(index), child, norms[0] if norms else None))
        for norm in norms[1:]:               # a norm of the branch's output: it would only normalize zeros
            replace_module(model, f"{prefix}.{norm}", nn.Identity())
            modules[f"{prefix}.{norm}"] = dropped(f"{part} norm")
    renamed, config = remove_blocks(model, stack_name, blocks) if blocks else ({}, {})
    return Report("layer_drop", {}, modules, renamed, config)


def layer_drop_check(model: nn.Module, config: LayerDropConfig) -> Report | list[str]:
    """Before loading: names, counts and architecture. Explicit modules are dropped from the weightless model; a
    scored block drop removes its last n blocks there (which ones go is known only from the data, but every choice
    leaves the later steps the same names and shapes); a scored sub-layer drop lists its candidates."""
    if config.modules:
        check_drops(model, list(config.modules))
        return apply_drops(model, list(config.modules))
    found = candidates(model, config.drop)
    limit = len(found) - (1 if config.drop != "joint" else 2)      # joint keeps an attention and an MLP at least
    if config.n > limit:
        raise InvalidOptionError(f"n={config.n} is too many: the model has {len(found)} "
                                 f"{config.drop if config.drop != 'joint' else 'attention and MLP'} modules and one "
                                 f"of each kind must stay; give n between 1 and {limit}")
    if config.drop == "block":
        return apply_drops(model, list(found)[-config.n:])
    return list(found)


def layer_drop(model: nn.Module, config: LayerDropConfig, context: Context) -> Report:
    """Layer dropping: remove the attention modules, MLP modules or blocks that change the residual stream least."""
    if config.modules:
        picks, rounds = list(config.modules), []
    else:
        picks, rounds = choose(model, config, context)
    kv_before = kv_cache_bytes_per_token(model)
    report = apply_drops(model, picks)
    influence = config.score == "influence"
    report.stats = {"dropped": picks, "n": len(picks), "iterative": config.iterative,
                    "scores": [{name: round(1 - s if influence else s, 6) for name, s in scores.items()}
                               for scores in rounds],
                    "score": config.score, "kv_cache_bytes_per_token": [kv_before, kv_cache_bytes_per_token(model)]}
    return report


def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Bytes the KV cache stores per token: keys and values of every attention not skipped, in the model's dtype."""
    config = text_config(model.config)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(1, config.num_attention_heads)
    _, stack = the_stack(model)
    live = sum(not any(isinstance(m, SkippedAttention) for m in block.modules()) for block in stack)
    return 2 * live * heads * head_dim * next(model.parameters()).dtype.itemsize
