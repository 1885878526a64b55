"""Options of DSnoT (`hfcompress.methods.dsnot`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import option
from ..registry import register
from .pruning import PruningConfig

INITS = ("wanda", "magnitude", "sparsegpt")


@dataclass(frozen=True)
class DSnoTConfig(PruningConfig):
    method: ClassVar[str] = "dsnot"
    init: str = option("wanda", "method that gives the initial mask", choices=INITS)
    faithful: bool = option(False, "true: follow the authors' released code; false: hfcompress's variant (swaps "
                                   "chosen by the reconstruction error they remove)")
    cycles: int = option(50, "most prune-and-grow swaps per row")
    power: float = option(1.0, "faithful: variance power in the growth order W_ij mu_j / var_j^power",
                          applies=("faithful", True))
    threshold: float = option(0.1, "faithful: a row stops when its error |e|, summed over a window's tokens, is at "
                                   "most this", applies=("faithful", True))
    same_sign: bool | None = option(None, "faithful: stop a row when a swap would flip the sign of its error "
                                          "(default as released: off unstructured, on with N:M)",
                                    applies=("faithful", True))
    estimate: str = option("hessian", "default variant: reconstruction error from `hessian` (exact, X^T X) or "
                                      "`diagonal` (channel means and variances, no Hessian)",
                           choices=("hessian", "diagonal"), applies=("faithful", False))
    refine: tuple[str, ...] = option((), "module-name globs of the pruned layers to refine (default: all; the "
                                         "authors refine attention only: `*attn*`)")
    sequential: bool = option(True, "statistics of block l come from the pruned blocks before it (true) or from "
                                    "the dense model (false)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cycles < 1:
            raise InvalidOptionError(f"cycles must be >= 1, got {self.cycles}")
        if self.threshold < 0:
            raise InvalidOptionError(f"threshold must be >= 0, got {self.threshold}")
        if self.power < 0:
            raise InvalidOptionError(f"power must be >= 0, got {self.power}")


def dsnot_statistics(config: DSnoTConfig) -> tuple[str, ...]:
    """The input statistics a run needs: channel means only where an error or estimate uses them; `faithful`
    reads per-window averages accumulated as the authors' code accumulates them."""
    sparsegpt = ("hessian",) if config.init == "sparsegpt" else ()
    if config.faithful:
        return ("window_averages",) + sparsegpt
    return ("sq_sum",) + (("hessian",) if config.estimate == "hessian" else ("sum",) + sparsegpt)


register(DSnoTConfig, transform="hfcompress.methods.dsnot:dsnot", check="hfcompress.sparsity:pruning_check",
         paper="https://arxiv.org/abs/2310.08915", needs_calibration=True,
         hessian=lambda config: "hessian" in dsnot_statistics(config),
         supports=("causal-lm", "encoder", "vision-language"), changes="sparse",
         summary="DSnoT: refine a Wanda, magnitude or SparseGPT mask by prune-and-grow swaps within each row,"
                 " no training.")
