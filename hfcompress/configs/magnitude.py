"""Options of magnitude pruning (`hfcompress.methods.magnitude`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import option
from ..registry import register
from .pruning import PruningConfig

SCOPES = ("row", "layer")


@dataclass(frozen=True)
class MagnitudeConfig(PruningConfig):
    method: ClassVar[str] = "magnitude"
    scope: str = option("row", "`row`: drop the smallest weights of each output row; `layer`: of the whole matrix "
                               "(unstructured only)", choices=SCOPES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope == "layer" and self.nm:
            raise InvalidOptionError("scope `layer` applies to unstructured pruning only; N:M patterns work per row")


register(MagnitudeConfig, transform="hfcompress.methods.magnitude:magnitude",
         check="hfcompress.sparsity:pruning_check", paper="https://arxiv.org/abs/1506.02626",
         needs_calibration=False, supports=("causal-lm", "encoder", "vision", "vision-language"), changes="sparse",
         summary="Magnitude pruning: zero the smallest-magnitude weights, per output row or per layer.")
