"""Options every pruning method takes, and the N:M pattern syntax; importable without torch.

Pattern convention (as in Wanda and SparseGPT): `N:M` zeroes the N lowest-scoring weights in every group of M
consecutive input weights of a row, so `2:4` keeps 2 of every 4 and has sparsity N/M.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidOptionError
from ..options import check_choices, option

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`"unstructured"` -> None, `"2:4"` -> (2, 4); anything else is an error naming the valid forms."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match:
        raise InvalidOptionError(f"pattern {pattern!r} is not valid; use `unstructured` or `N:M` such as `2:4`, `4:8`")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise InvalidOptionError(f"pattern {pattern!r}: N:M needs 0 < N < M (N of every M weights are zeroed)")
    return n, m


@dataclass(frozen=True)
class PruningConfig:
    """Options shared by every pruning method."""

    sparsity: float | None = option(None, "share of weights removed, 0 <= s < 1 (default 0.5; with an N:M pattern "
                                          "it is N/M and may be left out)")
    pattern: str = option("unstructured", "`unstructured` (per output row) or `N:M`: N of every M consecutive input "
                                          "weights are zeroed, e.g. `2:4`")
    targets: tuple[str, ...] = option((), "module-name globs to prune (default: every Linear layer in the transformer "
                                          "blocks)")

    def __post_init__(self) -> None:
        check_choices(self)
        nm = parse_pattern(self.pattern)
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise InvalidOptionError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if nm and self.sparsity is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise InvalidOptionError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                                     f"(which means sparsity {nm[0] / nm[1]:g}); give one of them")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def ratio(self) -> float:
        """The sparsity actually applied."""
        nm = self.nm
        return nm[0] / nm[1] if nm else (0.5 if self.sparsity is None else self.sparsity)
