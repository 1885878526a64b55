"""Built-in methods; importing this package registers them. One module per method."""

from . import magnitude, rtn, wanda  # noqa: F401
