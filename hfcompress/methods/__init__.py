"""Built-in methods; importing this package registers them. One module per method."""

from . import dsnot, ecoflap, gptq, layer_drop, layerwise_quant, lord, magnitude, rtn, sparsegpt, wanda  # noqa: F401
