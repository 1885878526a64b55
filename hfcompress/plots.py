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


def sparsity_map(model: nn.Module, path: str | Path, title: str = "measured sparsity per layer") -> bool:
    """Heat map, blocks x layers, of the share of zero weights; returns False when there is nothing to draw."""
    values = measured_sparsity(model)
    if not values or max(values.values()) == 0:
        return False
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
    short = [re.sub(r"^.*?\.(\d+)$", r"\1", b) if len({b.rsplit(".", 1)[0] for b in blocks}) == 1 else b
             for b in blocks]
    step = max(1, len(blocks) // 16)
    ax.set_xticks(range(0, len(blocks), step), short[::step], rotation=90 if len(blocks) > 40 else 0)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of zero weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
