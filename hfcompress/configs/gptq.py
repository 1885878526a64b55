"""Options of GPTQ (`hfcompress.methods.gptq`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import option
from ..registry import register
from .quantization import QuantizationConfig


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    method: ClassVar[str] = "gptq"
    damp: float = option(0.01, "dampening added to the Hessian's diagonal, as a share of its mean diagonal")
    block_size: int = option(128, "columns per block of the error-feedback loop")
    act_order: bool = option(True, "quantize columns by decreasing Hessian diagonal, scales fixed from the original "
                                   "weights (llm-compressor's default too; false: in column order)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.bits) != 1:
            raise InvalidOptionError(f"gptq quantizes every layer to one bit-width, got bits {list(self.bits)}; "
                                     "give one (e.g. --bits 4)")
        if not self.damp > 0:
            raise InvalidOptionError(f"damp must be > 0, got {self.damp}")
        if self.block_size < 1:
            raise InvalidOptionError(f"block_size must be >= 1, got {self.block_size}")


register(GPTQConfig, transform="hfcompress.methods.gptq:gptq", check="hfcompress.quantization:quantization_check",
         paper="https://arxiv.org/abs/2210.17323", needs_calibration=True, supports=("causal-lm", "encoder"),
         changes="quantized", hessian=True,
         summary="GPTQ: quantize column by column, spreading each rounding error over the columns left "
                 "(inverse Hessian).")
