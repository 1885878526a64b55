"""Options of ECoFLaP (`hfcompress.methods.ecoflap`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import option
from ..registry import register
from .pruning import PruningConfig

ORDERS = ("zeroth", "first")
PERTURBATIONS = ("all", "block", "tensor")


@dataclass(frozen=True)
class ECoFLaPConfig(PruningConfig):
    method: ClassVar[str] = "ecoflap"
    order: str = option("first", "stage-1 scores from one backward pass per window (`first`) or from forward "
                                 "passes only (`zeroth`)", choices=ORDERS)
    perturb: str = option("all", "zeroth order: perturb every targeted weight at once (`all`, 2 passes per window), "
                                 "each `block` or each `tensor` in turn (2 passes per block or tensor)",
                          choices=PERTURBATIONS, applies=("order", "zeroth"))
    noise_samples: int = option(1, "zeroth order: random directions per window", applies=("order", "zeroth"))
    noise_seed: int = option(0, "zeroth order: seed of the random directions (its own generator)",
                             applies=("order", "zeroth"))
    eps: float = option(1e-3, "zeroth order: size of the perturbation", applies=("order", "zeroth"))
    score_windows: int = option(8, "calibration windows (or image-caption pairs) stage 1 uses (the first ones; "
                                   "0 = all)")
    grouping: str = option("block", "one sparsity per `block` or per `tensor`", choices=("block", "tensor"))
    aggregate: str = option("sum", "group score: `sum` of its tensors' scores or their `mean` per weight",
                            choices=("sum", "mean"))
    max_sparsity: float | None = option(None, "highest sparsity of any group (default: sparsity + 0.1)")
    local: str = option("wanda", "stage 2, inside each layer: `wanda` or `sparsegpt`", choices=("wanda", "sparsegpt"))
    sequential: bool = option(True, "stage 2: statistics of block l come from the pruned blocks before it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nm:
            raise InvalidOptionError(f"ecoflap gives each group its own sparsity, which an N:M pattern fixes at "
                                     f"{self.nm[0]}/{self.nm[1]}; use `pattern: unstructured`")
        if self.max_sparsity is not None and not self.ratio <= self.max_sparsity < 1:
            raise InvalidOptionError(f"max_sparsity must be in [sparsity, 1) = [{self.ratio:g}, 1), "
                                     f"got {self.max_sparsity}")
        if self.max_sparsity is None and self.ratio + 0.1 >= 1:
            raise InvalidOptionError(f"sparsity {self.ratio:g} + the default bound 0.1 reaches 1; give "
                                     f"max_sparsity in [{self.ratio:g}, 1)")
        if self.noise_samples < 1 or self.score_windows < 0:
            raise InvalidOptionError(f"noise_samples must be >= 1 and score_windows >= 0, got "
                                     f"{self.noise_samples} and {self.score_windows}")
        if not self.eps > 0:
            raise InvalidOptionError(f"eps must be > 0, got {self.eps}")
        if self.order == "zeroth" and self.perturb == "block" and self.grouping != "block":
            raise InvalidOptionError("perturb: block gives one score per block; use grouping: block, or perturb: "
                                     "tensor or all")

    @property
    def bound(self) -> float:
        return self.max_sparsity if self.max_sparsity is not None else self.ratio + 0.1


register(ECoFLaPConfig, transform="hfcompress.methods.ecoflap:ecoflap", check="hfcompress.sparsity:pruning_check",
         paper="https://arxiv.org/abs/2310.02998", needs_calibration=True,
         supports=("causal-lm", "encoder", "vision-language"),
         changes="sparse", hessian=lambda config: config.local == "sparsegpt",
         summary="ECoFLaP: per-block sparsity from a global (zeroth- or first-order) loss score, then Wanda "
                 "inside each layer.")
