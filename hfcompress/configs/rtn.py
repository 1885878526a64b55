"""Options of RTN (`hfcompress.methods.rtn`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..registry import register
from .quantization import QuantizationConfig


@dataclass(frozen=True)
class RTNConfig(QuantizationConfig):
    method: ClassVar[str] = "rtn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.bits) != 1:
            raise InvalidOptionError(f"rtn quantizes every layer to one bit-width, got bits {list(self.bits)}; "
                                     "give one (e.g. --bits 4)")


register(RTNConfig, transform="hfcompress.methods.rtn:rtn", check="hfcompress.quantization:quantization_check",
         paper="https://arxiv.org/abs/2210.17323", needs_calibration=False,
         supports=("causal-lm", "encoder", "vision", "vision-language"), changes="quantized",
         summary="RTN: round every weight to the nearest level of a b-bit symmetric grid, one scale per group"
                 " of columns.")
