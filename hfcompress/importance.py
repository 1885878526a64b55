"""`hfcompress importance MODEL --score lim|zd|random|reverse`: rank a model's transformer blocks by the importance
score `layerwise_quant` allocates bits with, print the ranking and draw it as a bar chart (PNG).

    scores = hfcompress.importance.rank_blocks(ModelSpec("builtin:smollm2-135m"), "zd")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .calibration import load_calibration
from .context import Context
from .errors import InvalidOptionError, UnsupportedModelError, choices
from .loading import load_model, load_tokenizer, model_skeleton, pick_device, resolve
from .methods.layerwise_quant import LayerwiseQuantConfig, block_importance
from .options import option_choices
from .plots import block_bars, have_matplotlib
from .recipe import CalibrationSpec, ModelSpec, Recipe
from .registry import get_method
from .sequential import block_stacks

NEEDS_DATA = ("lim", "reverse")


def rank_blocks(model: ModelSpec, score: str, calibration: CalibrationSpec | None = None, *,
                zd_direction: str = "low", shuffle_seed: int = 0, token: str | None = None) -> dict[str, float]:
    """Block name -> importance (higher = more important), in model order. Options are checked, and the model's
    blocks found on a weightless copy, before any weight or calibration text is loaded."""
    from .preflight import resolve_defaults

    for name, value in (("score", score), ("zd_direction", zd_direction)):
        allowed = option_choices(LayerwiseQuantConfig, name)
        if value not in allowed:
            raise InvalidOptionError(f"{name} {value!r} is not valid; valid: {choices(allowed)}")
    device = pick_device(model.device)
    resolved = resolve(model.id, revision=model.revision, trust_remote_code=model.trust_remote_code, token=token,
                       allow_pickle=model.allow_pickle)
    supports = get_method(LayerwiseQuantConfig.method).supports
    if resolved.family not in supports:
        raise UnsupportedModelError(f"importance scores the blocks of {choices(supports)} models; {model.id!r} is "
                                    f"{resolved.family}")
    block_stacks(model_skeleton(resolved))
    context = Context(device=device)
    if score in NEEDS_DATA:
        c = resolve_defaults(Recipe(model, calibration=calibration or CalibrationSpec()), resolved, device).calibration
        context = dataclasses.replace(context, calibration=load_calibration(
            load_tokenizer(resolved), c.source, c.n_samples, c.seq_len, c.seed, c.text_field, c.split, c.subset))
    loaded = load_model(resolved, model.dtype, device)
    return block_importance(loaded, score, context, zd_direction=zd_direction, shuffle_seed=shuffle_seed)


def ranking_table(scores: dict[str, float]) -> str:
    """Most important first: rank, block, score."""
    lines = ["rank  block                               score"]
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    lines += [f"{rank:>4}  {name:<34} {value:+.6f}" for rank, (name, value) in enumerate(ranked, 1)]
    return "\n".join(lines)


def plot_importance(scores: dict[str, float], path: str | Path, score: str) -> bool:
    """Bar chart of the scores in model order; False (nothing drawn) without matplotlib."""
    if not have_matplotlib():
        return False
    block_bars(scores, path, f"block importance ({score}; higher = more important)", score)
    return True
