"""Options of LoRD (`hfcompress.methods.lord`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import check_choices, option, parse_quantity
from ..registry import register

MODES = ("svd", "activation")
DEFAULT_REDUCTION = 0.2
COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_count(text: str) -> int:
    """A parameter count such as `110M`, `1.2B` or `110000000`."""
    return parse_quantity(text, "target_params", COUNT_UNITS, "`110M` or `1.2B`")


@dataclass(frozen=True)
class LordConfig:
    method: ClassVar[str] = "lord"
    mode: str = option("activation", "`activation`: preserve each layer's output W X on the calibration data; `svd`: "
                                     "preserve W itself (data-free, the paper's)", choices=MODES)
    reduction: float | None = option(None, "share of the targeted layers' weights removed, 0 < r < 1 (default 0.2 "
                                           "unless target_params or tolerance is given)")
    target_params: str | None = option(None, "parameters of the whole model to land at or just under, e.g. `110M`")
    tolerance: float | None = option(None, "relative error every layer may have (share of its energy lost, "
                                           "0 < t < 1); ranks follow from it alone")
    rank_multiple: int = option(8, "ranks are rounded up to a multiple of this")
    damp: float = option(0.01, "activation mode: added to the input covariance's diagonal, as a share of its mean")
    sequential: bool = option(True, "activation mode: factor each block from the inputs the factored blocks before "
                                    "it give (false: from the dense model's)")
    merge: bool = option(False, "multiply each pair back into a dense Linear (plain loading everywhere, no size "
                                "saving)")
    targets: tuple[str, ...] = option((), "module-name globs to factor (default: every Linear layer of the "
                                          "transformer blocks, i.e. the attention and MLP projections)")

    def __post_init__(self) -> None:
        check_choices(self)
        given = [name for name in ("reduction", "target_params", "tolerance") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidOptionError(f"give one of reduction, target_params and tolerance, not {given}")
        for name in ("reduction", "tolerance"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise InvalidOptionError(f"{name} must be between 0 and 1 (exclusive), got {value}")
        if self.target_params is not None:
            parse_count(self.target_params)
        if self.rank_multiple < 1:
            raise InvalidOptionError(f"rank_multiple must be >= 1, got {self.rank_multiple}")
        if not self.damp > 0:
            raise InvalidOptionError(f"damp must be > 0, got {self.damp}")

    @property
    def ratio(self) -> float | None:
        """The reduction asked for (None when the ranks come from `tolerance` or `target_params`)."""
        if self.reduction is None and self.target_params is None and self.tolerance is None:
            return DEFAULT_REDUCTION
        return self.reduction


register(LordConfig, transform="hfcompress.methods.lord:lord", check="hfcompress.methods.lord:lord_check",
         paper="https://arxiv.org/abs/2309.14021", needs_calibration=lambda config: config.mode == "activation",
         supports=("causal-lm", "encoder"), changes="lowrank", hessian=lambda config: config.mode == "activation",
         summary="LoRD: replace Linear layers by two thin ones (truncated SVD, optionally of the output on "
                 "calibration data).")
