"""Where a benchmark's time goes: wrap library functions so that every call adds its wall time to `seconds_in`."""

from __future__ import annotations

import functools
import time

import torch

seconds_in: dict[str, float] = {}


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a timer reads finished work (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(part: str, function):
    """`function`, adding the seconds of each of its calls to `seconds_in[part]`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            synchronize()
            seconds_in[part] = seconds_in.get(part, 0.0) + time.perf_counter() - start

    return wrapper


def time_parts(parts: dict[str, tuple[object, str]]) -> None:
    """Wrap each `module.name` of `parts` ({part: (module, name)}) with `timed`, in place."""
    for part, (module, name) in parts.items():
        setattr(module, name, timed(part, getattr(module, name)))
