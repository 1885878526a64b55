"""The structure map: what the steps changed, per module, in the saved model's module names.

Every transform reports its changes as entries `{module name: {kind: details}}`, one kind of change per key:

    sparse     {"sparsity": 0.5}                          zeros in a dense weight
    quantized  {"bits": 4, "group_size": 64, "symmetric": true, "quantizer": "rtn"}
    lowrank    {"rank": 128}                              the Linear became two thin ones ("merged": true: their
                                                          product was put back into the Linear)
    dropped    {"part": "attention" | "mlp" | "attention norm" | "mlp norm"}   a sub-layer is gone (residual kept)

A step that removes or renumbers modules (removing block 1 makes block 2 the new block 1) reports `renamed`: old
name prefix -> new prefix, or None for a removed one (a removed block has no entry: it is listed in `removed`).
`Structure.add` merges the steps in order into ONE map whose names are those of the saved model; it is written to
hfcompress.json and read by everything downstream (the writer that stores the weights, `hfcompress.load`,
evaluation, the card), so nothing guesses from method names.

Step planning uses the same map before any weight is loaded: each step's check names the modules it will change,
and a change that cannot follow an earlier one on the same module (pruning a quantized layer) is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidOptionError

KINDS = ("sparse", "quantized", "lowrank", "dropped")
STRUCTURAL = frozenset({"lowrank", "dropped"})  # changes that replace the module itself

# (earlier kind, later kind) -> why the later change cannot be applied to the same module
CANNOT_FOLLOW = {
    ("quantized", "sparse"): "pruning would move its weights off the quantization grid; prune before quantizing",
    ("quantized", "quantized"): "it is quantized already; give one quantization step per layer",
    ("quantized", "lowrank"): "decomposing it would discard the quantization; decompose before quantizing",
    ("lowrank", "sparse"): "it is a low-rank pair now; prune before decomposing",
    ("lowrank", "lowrank"): "it is a low-rank pair already",
}


def sparse(sparsity: float) -> dict[str, Any]:
    return {"sparse": {"sparsity": round(float(sparsity), 6)}}


def quantized(bits: int, group_size: int, quantizer: str, symmetric: bool = True) -> dict[str, Any]:
    return {"quantized": {"bits": int(bits), "group_size": int(group_size), "symmetric": symmetric,
                          "quantizer": quantizer}}


def lowrank(rank: int, merged: bool = False) -> dict[str, Any]:
    """A low-rank pair; `merged`: multiplied back into the dense weight (a stock Linear of rank `rank`)."""
    return {"lowrank": {"rank": int(rank), **({"merged": True} if merged else {})}}


def replacing_kinds(entry: dict[str, dict[str, Any]]) -> set[str]:
    """The kinds of change in one entry that put a module of hfcompress's own in place of the original (a merged
    low-rank pair is a stock Linear again)."""
    return {kind for kind, details in entry.items() if kind in STRUCTURAL and not details.get("merged")}


def dropped(part: str) -> dict[str, Any]:
    return {"dropped": {"part": part}}


def renamed_to(name: str, renamed: dict[str, str | None]) -> str | None:
    """`name` after a renumbering: the longest matching prefix of `renamed` is replaced (None: it was removed)."""
    for old in sorted(renamed, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            new = renamed[old]
            return None if new is None else new + name[len(old):]
    return name


@dataclass
class Structure:
    """The merged map of all steps (see the module docstring).

    Args:
        modules: module name in the saved model -> {kind: details}.
        config: config attributes the steps changed (e.g. `num_hidden_layers`), with their new values.
        removed: names (as they were when removed) of modules that no longer exist, e.g. dropped blocks.
    """

    modules: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def add(self, modules: dict[str, dict[str, Any]], renamed: dict[str, str | None] | None = None,
            config: dict[str, Any] | None = None, method: str = "a step") -> None:
        """Merge one step's entries, after rewriting the earlier entries' names by its `renamed`. Raises
        InvalidOptionError when a change cannot follow an earlier one on the same module."""
        if renamed:
            self.removed += [old for old, new in renamed.items() if new is None]
            self.modules = {renamed_to(name, renamed): entry for name, entry in self.modules.items()
                            if renamed_to(name, renamed) is not None}
        for name, entry in modules.items():
            unknown = set(entry) - set(KINDS)
            if unknown:
                raise ValueError(f"{method} reported unknown kinds of change {sorted(unknown)} for {name}; "
                                 f"valid: {list(KINDS)}")
            earlier = self.modules.setdefault(name, {})
            for kind in entry:
                for done in earlier:
                    why = CANNOT_FOLLOW.get((done, kind))
                    if why:
                        raise InvalidOptionError(f"`{method}` cannot change {name} ({kind}) after an earlier step "
                                                 f"made it {done}: {why}")
            if replacing_kinds(entry):  # a new module takes the place of the old one and of everything inside it
                earlier.clear()
                for inner in [n for n in self.modules if n.startswith(name + ".")]:
                    del self.modules[inner]
            earlier.update(copy.deepcopy(entry))
        self.config.update(config or {})

    def of_kind(self, kind: str) -> dict[str, dict[str, Any]]:
        """Module name -> details, for the modules with a change of `kind`."""
        return {name: entry[kind] for name, entry in self.modules.items() if kind in entry}

    @property
    def kinds(self) -> set[str]:
        return {kind for entry in self.modules.values() for kind in entry}

    @property
    def replacing(self) -> set[str]:
        """The kinds of change that need modules of hfcompress's own (see `replacing_kinds`)."""
        return {kind for entry in self.modules.values() for kind in replacing_kinds(entry)}

    def to_dict(self) -> dict[str, Any]:
        return {"modules": self.modules, "config": self.config, "removed": self.removed}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Structure":
        data = data or {}
        return cls(copy.deepcopy(data.get("modules", {})), dict(data.get("config", {})), list(data.get("removed", [])))

    @classmethod
    def from_steps(cls, steps: list[dict[str, Any]]) -> "Structure":
        """The map of an hfcompress.json written before the map existed (format version 1): sparse entries only."""
        structure = cls()
        for step in steps:
            structure.add({name: sparse(entry["sparsity"]) for name, entry in step.get("modules", {}).items()
                           if "sparsity" in entry}, method=step.get("method", "a step"))
        return structure
