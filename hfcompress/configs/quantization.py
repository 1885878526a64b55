"""Options every weight quantizer takes; importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOptionError
from ..options import check_choices, option

BITS = range(2, 9)
AUTO = "auto"


@dataclass(frozen=True)
class QuantizationConfig:
    """Options shared by every weight quantizer."""

    bits: tuple[int, ...] = option((4,), "bit-width of the weights, 2-8 (several, high to low, for methods that "
                                         "mix bit-widths)")
    group_size: str = option(AUTO, "input columns sharing one scale; must divide every targeted width. `auto`: 128 "
                                   "where it does, else the largest power of two >= 16 that does (64 for "
                                   "SmolLM2's 576)")
    targets: tuple[str, ...] = option((), "module-name globs to quantize (default: every Linear layer of the "
                                          "transformer blocks; embeddings and lm_head are left as they are)")

    def __post_init__(self) -> None:
        check_choices(self)
        bad = [b for b in self.bits if b not in BITS]
        if not self.bits or bad:
            raise InvalidOptionError(f"bits must be between 2 and 8, got {list(self.bits)}")
        if list(self.bits) != sorted(self.bits, reverse=True):
            raise InvalidOptionError(f"bits are listed high to low, got {list(self.bits)}")
        if self.group_size != AUTO and not (str(self.group_size).isdigit() and int(self.group_size) > 0):
            raise InvalidOptionError(f"group_size must be `auto` or a positive number, got {self.group_size!r}")
