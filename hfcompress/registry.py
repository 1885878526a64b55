"""Method registry: name -> (config class, transform, paper, calibration need, supported model families).

A method registers with `@register(ConfigClass, ...)` on its transform, or with `register(ConfigClass, ...,
transform="package.module:function")`, which imports the transform's module (and torch) only when it first runs:
the built-in methods register that way from `hfcompress.configs`, so the CLI's help, `hfcompress methods` and
option errors come without importing torch. Third-party packages add methods by declaring an entry point in the
group `hfcompress.methods` whose target is a module (or callable) that calls `register`; those entry points are
loaded the first time the registry is read.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

from .errors import UnknownMethodError, choices
from .structure import KINDS

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hfcompress.methods"
MODEL_FAMILIES = ("causal-lm", "encoder", "seq2seq", "vision", "vision-language")
# Option names of the pipeline (CLI flags, recipe sections): a method field with one of these names would give the
# CLI two flags of one name, so the registry refuses it.
RESERVED_OPTIONS = frozenset({
    "model", "method", "recipe", "no_eval", "revision", "dtype", "compute_dtype", "device", "trust_remote_code",
    "calib", "source", "n_samples", "seq_len", "seed", "text_field", "image_field", "split", "subset", "eval_source",
    "eval_seq_len", "eval_windows", "eval_dtype", "eval_text_field", "eval_split", "eval_subset", "out", "dir",
    "overwrite", "push_to", "private", "to", "token", "help", "onnx", "allow_pickle", "export", "remeasure",
    "eval_speed", "eval_samples", "onnx_speed",
})


@dataclass
class Report:
    """What a transform did: headline numbers plus its entries for the structure map (see `structure.py`).

    Args:
        method: registered method name.
        stats: measured numbers, e.g. `{"sparsity": 0.5}`.
        modules: module name (after this step) -> {kind: details}, built with `structure.sparse(...)`,
            `structure.quantized(...)`, `structure.lowrank(...)` or `structure.dropped(...)`.
        renamed: module-name prefixes this step renumbered: old -> new, or None for a removed module.
        config: model config attributes this step changed, with their new values.
    """

    method: str
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    renamed: dict[str, str | None] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method. `transform_ref` and `check_ref` are the functions, or `"module:function"` references
    imported on first use (read them through `transform` and `check`)."""

    name: str
    config_class: type
    transform_ref: Callable[..., Report] | str
    paper: str
    needs_calibration: bool | Callable[[Any], bool]
    supports: tuple[str, ...]
    summary: str
    check_ref: Callable[[Any, Any], Any] | str | None = None
    changes: str | None = None
    hessian: bool | Callable[[Any], bool] = False

    @property
    def transform(self) -> Callable[..., Report]:
        transform = _resolve(self.transform_ref)
        _check_signature(self.name, transform)
        return transform

    @property
    def check(self) -> Callable[[Any, Any], Any] | None:
        return None if self.check_ref is None else _resolve(self.check_ref)

    def calibrates(self, config: Any) -> bool:
        """Whether this step, with these options, needs calibration batches."""
        return self.needs_calibration(config) if callable(self.needs_calibration) else self.needs_calibration

    def uses_hessian(self, config: Any) -> bool:
        """Whether this step, with these options, solves with each layer's input Hessian X^T X."""
        return self.hessian(config) if callable(self.hessian) else self.hessian


_METHODS: dict[str, MethodSpec] = {}
_plugins_loaded = False


@cache
def _resolve(ref: Callable | str) -> Callable:
    """The function a `"module:function"` reference names (imported now), or `ref` itself when it is one."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_signature(name: str, transform: Callable) -> None:
    parameters = [p for p in inspect.signature(transform).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(parameters) != 3:
        raise TypeError(f"the transform of {name} takes {[p.name for p in parameters]}; it must take "
                        "(model, config, context), see hfcompress.context.Context")


def register(
    config_class: type,
    *,
    paper: str,
    needs_calibration: bool | Callable[[Any], bool],
    supports: tuple[str, ...] = ("causal-lm",),
    summary: str = "",
    check: Callable[[Any, Any], Any] | str | None = None,
    changes: str | None = None,
    transform: str | None = None,
    hessian: bool | Callable[[Any], bool] = False,
) -> Callable[[Callable[..., Report]], Callable[..., Report]] | None:
    """Register `transform(model, config, context) -> Report` as the method named `config_class.method`: used as a
    decorator on the transform, or called with `transform="module:function"` (and `summary`), which registers at
    once and imports that module only when the method first runs.

    The transform edits `model` in place; `context` (`hfcompress.context.Context`) carries the calibration data,
    the compute device, the storage dtype, and runs the block-by-block engine with progress and cancel.

    Args:
        config_class: a frozen dataclass with a class attribute `method` (the method's name).
        paper: link to the paper the method implements.
        needs_calibration: whether the transform needs calibration batches, or `needs_calibration(config)` when
            that depends on its options.
        supports: model families the transform handles, a subset of `MODEL_FAMILIES`.
        summary: one line for `hfcompress methods` and the README (default: the transform's first docstring line).
        check: `check(model, config)`, or its `"module:function"`, raises an `HfCompressError` when the config
            does not fit the model (e.g. targets that match no layer) and returns the names of the modules the
            step will change. It runs on a weightless (meta-device) copy of the model as the earlier steps left it,
            before any weight is loaded, so it must only read names and shapes. A step that edits the structure
            (removes blocks, replaces modules) applies its edit to that copy and returns a `Report` with the
            planned `modules`, `renamed` and `config` instead, so that the later steps are checked against the
            edited model.
        changes: the kind of change the step makes to those modules (`sparse`, `quantized`, `lowrank`,
            `dropped`), so that a step that cannot follow an earlier one is refused before loading.
        transform: `"module:function"` of the transform, to register without importing it.
        hessian: whether the transform solves with each layer's input Hessian X^T X, or `hessian(config)`: such a
            step needs more calibration tokens than the widest input it sees (X^T X has rank at most the token
            count), and preflight says when there are too few.
    """
    if not (dataclasses.is_dataclass(config_class) and config_class.__dataclass_params__.frozen):
        raise TypeError(f"{config_class!r} must be a frozen dataclass: decorate it with @dataclass(frozen=True)")
    name = getattr(config_class, "method", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config_class.__name__} needs a class attribute `method: ClassVar[str] = '<name>'`")
    unknown = set(supports) - set(MODEL_FAMILIES)
    if unknown:
        raise TypeError(f"unknown model families {sorted(unknown)} for {name}; valid: {choices(MODEL_FAMILIES)}")
    clashes = sorted(f.name for f in dataclasses.fields(config_class) if f.init and f.name in RESERVED_OPTIONS)
    if clashes:
        raise TypeError(f"{config_class.__name__} fields {clashes} reuse pipeline option names; rename them "
                        f"(reserved: {', '.join(sorted(RESERVED_OPTIONS))})")
    if changes is not None and changes not in KINDS:
        raise TypeError(f"unknown kind of change {changes!r} for {name}; valid: {choices(KINDS)}")

    def add(ref: Callable[..., Report] | str, line: str) -> None:
        existing = _METHODS.get(name)
        if existing is not None and existing.transform_ref != ref:
            where = existing.transform_ref if isinstance(existing.transform_ref, str) else \
                existing.transform_ref.__module__
            raise TypeError(f"a method named {name!r} is already registered (by {where}); pick another name")
        _METHODS[name] = MethodSpec(name, config_class, ref, paper, needs_calibration, tuple(supports), line, check,
                                    changes, hessian)

    if transform is not None:
        if not summary:
            raise TypeError(f"registering {name} by reference needs its `summary`")
        add(transform, summary)
        return None

    def decorator(function: Callable[..., Report]) -> Callable[..., Report]:
        _check_signature(name, function)
        add(function, summary or next(iter((function.__doc__ or "").strip().splitlines()), ""))
        return function

    return decorator


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    from . import configs  # noqa: F401  (built-in methods register on import; an error here surfaces every time)

    _plugins_loaded = True

    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = entry_point.load()
            if callable(target) and not isinstance(target, type):
                target()
        except Exception as error:  # a broken plugin must not take the built-in methods down with it
            logger.warning("could not load hfcompress plugin %r: %s", entry_point.name, error)


def available_methods() -> dict[str, MethodSpec]:
    """All registered methods (built-in and plugins), by name."""
    _load_plugins()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> MethodSpec:
    methods = available_methods()
    if name not in methods:
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {choices(methods)}")
    return methods[name]


def calibrating_steps(steps) -> int:
    """How many of a recipe's steps (method configs) read the calibration data."""
    return sum(get_method(type(step).method).calibrates(step) for step in steps)


def methods_table() -> str:
    """Markdown table of the registered methods (printed by `hfcompress methods`, embedded in the README)."""
    rows = ["| method | what it does | paper | calibration | models |", "|---|---|---|---|---|"]
    for name, spec in available_methods().items():
        rows.append(f"| `{name}` | {spec.summary} | {spec.paper} | {_calibration_column(spec.needs_calibration)} | "
                    f"{', '.join(spec.supports)} |")
    return "\n".join(rows)


def _calibration_column(needs: bool | Callable[[Any], bool]) -> str:
    return "some modes" if callable(needs) else "yes" if needs else "no"
