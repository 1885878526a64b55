"""Options of layer-wise quantization (`hfcompress.methods.layerwise_quant`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import option, parse_quantity
from ..registry import register
from .quantization import QuantizationConfig

SCORES = ("lim", "zd", "random", "reverse")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
def parse_size(text: str) -> int:
    """Bytes of a size such as `100MB` (10^6), `95MiB` (2^20), `1.5GB` or `123456`."""
    return parse_quantity(text, "target_size", UNITS, "`100MB`, `95MiB` or `1.5GB`")


@dataclass(frozen=True)
class LayerwiseQuantConfig(QuantizationConfig):
    method: ClassVar[str] = "layerwise_quant"
    bits: tuple[int, ...] = option((4, 2), "bit-width levels, high to low (two or more, e.g. `4,2` or `8,4,2`)")
    avg_bits: float | None = option(None, "average bit-width over the blocks, between the lowest and highest level "
                                          "(e.g. 3.5 with 4,2: three quarters of the blocks at 4 bits)")
    target_size: str | None = option(None, "size of the weight files to land at or just under (e.g. `100MB`, "
                                           "`95MiB`), instead of avg_bits: true bytes, scales and unquantized "
                                           "embeddings included")
    score: str = option("lim", "block importance: `lim` (input/output cosine on calibration data), `zd` (weight "
                               "z-scores, no data), `random`, `reverse` (LIM reversed)", choices=SCORES)
    zd_direction: str = option("low", "with score zd: whether a `low` or a `high` share of large weights marks an "
                                      "important block", choices=("low", "high"), applies=("score", "zd"))
    shuffle_seed: int = option(0, "seed of the `random` order", applies=("score", "random"))
    layer_bits: tuple[int, ...] = option((), "explicit bit-width of every block, in order (instead of score and "
                                             "avg_bits)")
    quantizer: str = option("rtn", "quantizer under the allocation", choices=("rtn", "gptq"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_bits:
            bad = [b for b in self.layer_bits if not 2 <= b <= 8]
            if bad:
                raise InvalidOptionError(f"layer_bits must be between 2 and 8, got {bad}")
            return
        if len(self.bits) < 2:
            raise InvalidOptionError(f"layerwise_quant needs two or more bit levels (e.g. --bits 4,2), got "
                                     f"{list(self.bits)}; for one bit-width use rtn or gptq")
        if (self.avg_bits is None) == (self.target_size is None):
            raise InvalidOptionError("give one of --avg-bits (the average bit-width over the blocks) or "
                                     "--target-size (the size of the weight files), or --layer-bits")
        if self.target_size is not None:
            parse_size(self.target_size)
        elif not min(self.bits) <= self.avg_bits <= max(self.bits):
            raise InvalidOptionError(f"avg_bits {self.avg_bits} is outside the levels' range "
                                     f"[{min(self.bits)}, {max(self.bits)}]")


register(LayerwiseQuantConfig, transform="hfcompress.methods.layerwise_quant:layerwise_quant",
         check="hfcompress.methods.layerwise_quant:layerwise_check", paper="https://arxiv.org/abs/2406.17415",
         needs_calibration=True, supports=("causal-lm", "encoder"), changes="quantized",
         hessian=lambda config: config.quantizer == "gptq",
         summary="Layer-wise quantization: rank the blocks by importance and give the least important ones "
                 "fewer bits.")
