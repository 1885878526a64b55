"""The built-in methods' options, one module per method; importing this package registers every built-in method
without importing torch (each transform, in `hfcompress.methods`, is imported when it first runs)."""

from . import dsnot, ecoflap, gptq, layer_drop, layerwise_quant, lord, magnitude, rtn, sparsegpt, wanda  # noqa: F401
