"""Options of layer dropping (`hfcompress.methods.layer_drop`), importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from ..options import check_choices, option
from ..registry import register

DROPS = ("attention", "mlp", "block", "joint")
@dataclass(frozen=True)
class LayerDropConfig:
    method: ClassVar[str] = "layer_drop"
    drop: str = option("attention", "what to drop: `attention` modules, `mlp` modules, whole `block`s, or `joint` "
                                    "(attention and MLP modules ranked together)", choices=DROPS)
    n: int = option(4, "how many modules (or blocks) to drop")
    iterative: bool = option(False, "drop one module at a time and score again with the earlier drops applied "
                                    "(one-shot when false, as in the paper)")
    score: str = option("similarity", "ranking: `similarity` (the paper's input/output cosine) or `influence` "
                                      "(ShortGPT's block influence, 1 - cosine; blocks only)",
                        choices=("similarity", "influence"))
    modules: tuple[str, ...] = option((), "modules to drop instead of scoring, e.g. `model.layers.3.self_attn`, "
                                          "`model.layers.7`")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.n < 1 and not self.modules:
            raise InvalidOptionError(f"n must be at least 1, got {self.n}")
        if self.score == "influence" and self.drop != "block":
            raise InvalidOptionError("score `influence` ranks whole blocks: use it with --drop block")


register(LayerDropConfig, transform="hfcompress.methods.layer_drop:layer_drop",
         check="hfcompress.methods.layer_drop:layer_drop_check", paper="https://arxiv.org/abs/2406.15786",
         needs_calibration=True, supports=("causal-lm", "encoder"), changes="dropped",
         summary="Layer dropping: remove the attention modules, MLP modules or blocks that change the "
                 "residual stream least.")
