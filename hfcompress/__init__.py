"""hfcompress: compress Hugging Face models (prune, quantize, decompose, drop layers), evaluate, save, push.

    import hfcompress
    recipe = hfcompress.Recipe(model="HuggingFaceTB/SmolLM2-135M", steps=[{"method": "wanda", "sparsity": 0.5}],
                               output={"dir": "out/smollm2-wanda"})
    result = hfcompress.compress(recipe)
    model = hfcompress.load("out/smollm2-wanda")

The names below are imported on first use, so `import hfcompress` alone does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HfCompressError": "errors", "Recipe": "recipe", "Report": "registry", "Result": "pipeline",
    "available_methods": "registry", "compress": "pipeline", "load": "formats", "make_config": "options",
    "register": "registry", "Context": "context", "Cancelled": "context", "Structure": "structure",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    try:  # a submodule, e.g. `hfcompress.formats`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'hfcompress' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(__all__)
