"""Pictures for cards and the README (PNG, matplotlib from the `plots` extra)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .sequential import find_linears, named_blocks, weight_matrix


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def measured_sparsity(model: nn.Module) -> dict[tuple[str, str], float]:
    """(block name, layer name inside the block) -> share of zero weights, for every block Linear layer."""
    result = {}
    for prefix, block in named_blocks(model):
        for name, layer in find_linears(block, prefix=prefix).items():
            result[(prefix, name[len(prefix) + 1:])] = (weight_matrix(layer) == 0).float().mean().item()
    return result


def _short_block_names(blocks: list[str]) -> list[str]:
    """`model.layers.7` -> `7` when all blocks share one stack, else the full names."""
    if len({b.rsplit(".", 1)[0] for b in blocks}) == 1:
        return [re.sub(r"^.*?\.(\d+)$", r"\1", b) for b in blocks]
    return blocks


def block_bars(values: dict[str, float], path: str | Path, title: str, ylabel: str, from_zero: bool = False) -> None:
    """Bar chart of one number per block (importance scores, bits per block), blocks in model order; bars rise
    from zero when `from_zero`, else from just below the smallest value (scores that differ in the third digit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(values)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * len(blocks)), 3.2))
    low, high = min(values.values()), max(values.values())
    base = 0.0 if from_zero else low - 0.1 * (high - low or 1)
    ax.bar(range(len(blocks)), [v - base for v in values.values()], bottom=base, color="#4c72b0")
    step = max(1, len(blocks) // 32)
    ax.set_xticks(range(0, len(blocks), step), _short_block_names(blocks)[::step])
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def module_scores(scores: dict[str, float], dropped: list[str], path: str | Path, title: str, ylabel: str) -> None:
    """Bars of one score per module (`<stack>.<i>` blocks, `<stack>.<i>.<child>` sub-layers), grouped by block,
    one colour per kind of module, the `dropped` ones hatched and outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def split(name: str) -> tuple[str, str]:
        match = re.match(r"^(.*?\.\d+)(?:\.(.+))?$", name)
        return (match.group(1), match.group(2) or "block") if match else (name, "block")

    blocks = list(dict.fromkeys(split(name)[0] for name in scores))
    kinds = list(dict.fromkeys(split(name)[1] for name in scores))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * len(blocks) * len(kinds)), 3.4))
    for k, kind in enumerate(kinds):
        names = [name for name in scores if split(name)[1] == kind]
        xs = [blocks.index(split(name)[0]) + (k - (len(kinds) - 1) / 2) * width for name in names]
        ax.bar(xs, [scores[name] for name in names], width, label=kind, color=f"C{k}",
               hatch=["//" if name in dropped else "" for name in names],
               edgecolor=["#c00000" if name in dropped else f"C{k}" for name in names])
    low, high = min(scores.values()), max(scores.values())
    ax.set_ylim(low - 0.1 * (high - low or 1), high + 0.05 * (high - low or 1))
    step = max(1, len(blocks) // 32)
    ax.set_xticks(range(0, len(blocks), step), _short_block_names(blocks)[::step])
    ax.set_xlabel("block (hatched: dropped)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sparsity_map(model: nn.Module, path: str | Path, title: str = "measured sparsity per layer") -> bool:
    """Heat map, blocks x layers, of the share of zero weights; returns False when there is nothing to draw."""
    values = measured_sparsity(model)
    if not values or max(values.values()) == 0:
        return False
    layer_map(values, path, title, "share of zero weights")
    return True


def kept_rank_shares(model: nn.Module, ranks: dict[str, int | None]) -> dict[tuple[str, str], float]:
    """(block name, layer name inside the block) -> rank kept / full rank (1 for a layer left dense), for the layers
    of `ranks` ({layer name: rank or None})."""
    result = {}
    for prefix, block in named_blocks(model):
        for name, module in block.named_modules(prefix=prefix):
            if name in ranks:
                rows, columns = (module.out_features, module.in_features) if ranks[name] is not None else \
                    tuple(weight_matrix(module).shape)
                result[(prefix, name[len(prefix) + 1:])] = 1.0 if ranks[name] is None else \
                    ranks[name] / min(rows, columns)
    return result


def layer_map(values: dict[tuple[str, str], float], path: str | Path, title: str, label: str) -> None:
    """Heat map, blocks x layers, of one number in [0, 1] per (block, layer inside the block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(dict.fromkeys(block for block, _ in values))
    layers = list(dict.fromkeys(layer for _, layer in values))
    grid = torch.full((len(layers), len(blocks)), float("nan"))
    for (block, layer), value in values.items():
        grid[layers.index(layer), blocks.index(block)] = value
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.3 * len(blocks)), 1 + 0.35 * len(layers)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    short = _short_block_names(blocks)
    step = max(1, len(blocks) // 16)
    ax.set_xticks(range(0, len(blocks), step), short[::step], rotation=90 if len(blocks) > 40 else 0)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
