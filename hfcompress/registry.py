"""Method registry: name -> (config class, transform, paper, calibration need, supported model families).

Built-in methods register with `@register(ConfigClass, ...)` on their transform. Third-party packages add methods by
declaring an entry point in the group `hfcompress.methods` whose target is a module (or callable) that calls
`register`; those entry points are loaded the first time the registry is read.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UnknownMethodError, choices

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hfcompress.methods"
MODEL_FAMILIES = ("causal-lm", "encoder", "seq2seq", "vision", "vision-language")


@dataclass
class Report:
    """What a transform did: headline numbers plus the per-module map that the saved format records.

    Args:
        method: registered method name.
        stats: measured numbers, e.g. `{"sparsity": 0.5}`.
        modules: module name -> what changed in it, e.g. `{"model.layers.0.mlp.up_proj": {"sparsity": 0.5}}`.
    """

    method: str
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    transform: Callable[..., Report]
    paper: str
    needs_calibration: bool
    supports: tuple[str, ...]
    summary: str
    check: Callable[[Any, Any], Any] | None = None


_METHODS: dict[str, MethodSpec] = {}
_plugins_loaded = False


def register(
    config_class: type,
    *,
    paper: str,
    needs_calibration: bool,
    supports: tuple[str, ...] = ("causal-lm",),
    summary: str = "",
    check: Callable[[Any, Any], Any] | None = None,
) -> Callable[[Callable[..., Report]], Callable[..., Report]]:
    """Register `transform(model, config, calibration) -> Report` as the method named `config_class.method`.

    Args:
        config_class: a frozen dataclass with a class attribute `method` (the method's name).
        paper: link to the paper the method implements.
        needs_calibration: whether the transform needs calibration batches.
        supports: model families the transform handles, a subset of `MODEL_FAMILIES`.
        summary: one line for `hfcompress methods` and the README.
        check: `check(model, config)` raises an `HfCompressError` when the config does not fit the model (e.g.
            targets that match no layer). It runs on a weightless (meta-device) copy of the model before the
            weights are loaded, so it must only read names and shapes.
    """
    if not (dataclasses.is_dataclass(config_class) and config_class.__dataclass_params__.frozen):
        raise TypeError(f"{config_class!r} must be a frozen dataclass: decorate it with @dataclass(frozen=True)")
    name = getattr(config_class, "method", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config_class.__name__} needs a class attribute `method: ClassVar[str] = '<name>'`")
    unknown = set(supports) - set(MODEL_FAMILIES)
    if unknown:
        raise TypeError(f"unknown model families {sorted(unknown)} for {name}; valid: {choices(MODEL_FAMILIES)}")

    def decorator(transform: Callable[..., Report]) -> Callable[..., Report]:
        existing = _METHODS.get(name)
        if existing is not None and existing.transform is not transform:
            raise TypeError(f"a method named {name!r} is already registered (by {existing.transform.__module__}); "
                            "pick another name")
        _METHODS[name] = MethodSpec(name, config_class, transform, paper, needs_calibration, tuple(supports),
                                    summary or (transform.__doc__ or "").strip().splitlines()[0], check)
        return transform

    return decorator


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from . import methods  # noqa: F401  (built-in methods register on import)

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


def methods_table() -> str:
    """Markdown table of the registered methods (printed by `hfcompress methods`, embedded in the README)."""
    rows = ["| method | what it does | paper | calibration | models |", "|---|---|---|---|---|"]
    for name, spec in available_methods().items():
        rows.append(f"| `{name}` | {spec.summary} | {spec.paper} | {'yes' if spec.needs_calibration else 'no'} | "
                    f"{', '.join(spec.supports)} |")
    return "\n".join(rows)
