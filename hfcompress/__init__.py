"""hfcompress: compress Hugging Face models (prune, quantize, decompose, drop layers), evaluate, save, push.

    import hfcompress
    recipe = hfcompress.Recipe(model="HuggingFaceTB/SmolLM2-135M", steps=[{"method": "wanda", "sparsity": 0.5}],
                               output={"dir": "out/smollm2-wanda"})
    result = hfcompress.compress(recipe)
    model = hfcompress.load("out/smollm2-wanda")
"""

__version__ = "0.1.0"

from .errors import HfCompressError  # noqa: E402
from .formats import load  # noqa: E402
from .options import make_config  # noqa: E402
from .pipeline import Result, compress  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .registry import Report, available_methods, register  # noqa: E402

__all__ = ["HfCompressError", "Recipe", "Report", "Result", "available_methods", "compress", "load", "make_config",
           "register", "__version__"]
