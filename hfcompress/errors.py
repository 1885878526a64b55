"""Errors a user can cause. Every message says what was wrong and what the valid choices are."""


class HfCompressError(ValueError):
    """Base class of every error caused by user input (a bad option, a missing file, an unreachable repo...)."""


class UnknownMethodError(HfCompressError):
    pass


class InvalidOptionError(HfCompressError):
    pass


class CalibrationError(HfCompressError):
    pass


class ModelLoadError(HfCompressError):
    pass


class UnsupportedModelError(HfCompressError):
    pass


class OutputExistsError(HfCompressError):
    pass


class PushError(HfCompressError):
    pass


class DiskFullError(HfCompressError):
    pass


def choices(values) -> str:
    """Format valid choices for an error message: `a`, `b`, `c`."""
    return ", ".join(f"`{v}`" for v in values)
