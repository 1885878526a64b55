"""The content of hfcompress.json: versions, source, licence, recipe, calibration, evaluation, steps, structure map,
metrics and what loading needs. Everything the card and `hfcompress.load` read comes from here."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
from typing import Any

import torch

from . import __version__
from .gguf_cache import gguf_license
from .loading import ResolvedModel
from .recipe import Recipe
from .structure import Structure


def library_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source_license(resolved: ResolvedModel) -> str | None:
    """The licence of the source model: its card's `license`, or the GGUF file's `general.license`."""
    from huggingface_hub import ModelCard

    if resolved.kind == "gguf":
        return gguf_license(resolved.location, resolved.gguf_file, resolved.converted)
    try:
        path = f"{resolved.location}/README.md" if resolved.kind == "local" else resolved.location
        return ModelCard.load(path, **({"token": resolved.token} if resolved.token else {})).data.license
    except Exception:  # a missing or malformed base card only means no license line
        return None


def evaluates_on_calibration_text(recipe: Recipe) -> bool:
    """Whether evaluation reads the calibration text (split and subset matter only for `datasets` sources)."""
    c, ev = recipe.calibration, recipe.evaluation
    if ev.source != c.source or ev.source == "builtin":
        return False
    return os.path.isfile(os.path.expanduser(ev.source)) or (ev.subset, ev.split) == (c.subset, c.split)


def build_metadata(recipe: Recipe, resolved: ResolvedModel, *, calibration: Any, n_windows: int | None,
                   device: torch.device, steps: list[dict], structure: Structure, before: dict, after: dict,
                   dtypes: dict[str, str]) -> dict[str, Any]:
    """hfcompress.json without `loading` (the writer adds what loading needs when it saves)."""
    return {
        "hfcompress_version": __version__,
        "libraries": {name: library_version(name) for name in ("torch", "transformers", "huggingface_hub",
                                                                "safetensors", "compressed-tensors")},
        "source": recipe.model.id,
        "base_model": resolved.base_model,
        "gguf_file": resolved.gguf_file,
        "family": resolved.family,
        "architectures": getattr(resolved.config, "architectures", None),
        "license": source_license(resolved),
        "recipe": recipe.to_dict(),
        "calibration": calibration.info if calibration else None,
        "evaluation": {**dataclasses.asdict(recipe.evaluation), "n_windows_used": n_windows, "device": str(device),
                       "on_calibration_text": bool(calibration) and evaluates_on_calibration_text(recipe),
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                       "date": datetime.date.today().isoformat()},
        "steps": steps,
        "structure": structure.to_dict(),
        "metrics": {"before": before, "after": after},
        "dtype": dtypes,
        "output": {"push_to": recipe.output.push_to},
    }
