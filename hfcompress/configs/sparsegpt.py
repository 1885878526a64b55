"""Options of SparseGPT (`hfcompress.methods.sparsegpt`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import option
from ..registry import register
from .pruning import PruningConfig


@dataclass(frozen=True)
class SparseGPTConfig(PruningConfig):
    method: ClassVar[str] = "sparsegpt"
    damp: float = option(0.01, "dampening added to the Hessian's diagonal, as a share of its mean diagonal")
    block_size: int = option(128, "columns per block: the mask of a block is chosen before its columns are pruned")
    per_row: bool = option(True, "true: every row loses exactly its share (in each block); false: the authors' one "
                                 "threshold per block across all rows")
    sequential: bool = option(True, "statistics of block l come from the pruned blocks before it (true, as in the "
                                    "paper's code) or from the dense model (false)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise InvalidOptionError(f"damp must be > 0, got {self.damp}")
        if self.block_size < 1:
            raise InvalidOptionError(f"block_size must be >= 1, got {self.block_size}")
        if self.nm and self.block_size % self.nm[1]:
            raise InvalidOptionError(f"pattern {self.pattern}: SparseGPT chooses the N:M mask inside blocks of "
                                     f"--block-size columns ({self.block_size}), which M={self.nm[1]} must divide; "
                                     f"pick such an M (e.g. --pattern 2:4) or a --block-size that M divides")


register(SparseGPTConfig, transform="hfcompress.methods.sparsegpt:sparsegpt",
         check="hfcompress.sparsity:pruning_check", paper="https://arxiv.org/abs/2301.00774", needs_calibration=True,
         supports=("causal-lm", "encoder", "vision-language"), changes="sparse", hessian=True,
         summary="SparseGPT: prune with the inverse Hessian of the inputs, updating the kept weights to "
                 "compensate.")
