"""Built-in methods; importing this package registers them. One module per method."""

from . import dsnot, magnitude, rtn, sparsegpt, wanda  # noqa: F401
