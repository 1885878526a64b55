"""Method options: build a method's config from plain values (YAML, CLI strings, Space form fields).

A config is a frozen dataclass; each field carries its help text in `metadata["help"]`. The CLI flags, recipe keys and
Space form fields are all generated from these fields, so an option is declared exactly once.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from .errors import InvalidOptionError, choices
from .registry import get_method

DTYPES = ("auto", "float32", "float16", "bfloat16")


def check_dtype(name: str) -> str:
    """`name` when it is a dtype hfcompress takes, else an error naming the valid ones."""
    if name not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {name!r}; valid: {choices(DTYPES)}")
    return name


def option(default: Any, help: str, *, choices: tuple | None = None, applies: tuple[str, Any] | None = None,
           **kwargs: Any) -> Any:
    """A config field with its help text (shown by `--help`, the README and the Space). `choices`, when given, are
    the only valid values: the Space shows them as a dropdown and `from_values` refuses anything else. `applies`
    (another field, a value): the option is used only when that field has that value (descriptions leave it out
    otherwise)."""
    metadata = {"help": help, **kwargs}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if applies is not None:
        metadata["applies"] = applies
    return dataclasses.field(default=default, metadata=metadata)


def parse_quantity(text: str, name: str, units: dict[str, int], examples: str) -> int:
    """The number `text` stands for, e.g. `100MB` with units {"MB": 10**6, ...} (unit names upper-case; `""` for a
    bare number); an error naming the valid units otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in units:
        raise InvalidOptionError(f"{name} {text!r} is not valid; write e.g. {examples} "
                                 f"(units: {', '.join(u for u in units if u)})")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def option_choices(config_class: type, name: str) -> tuple | None:
    """The declared choices of a config field (None: free-form)."""
    return next((f.metadata.get("choices") for f in config_fields(config_class) if f.name == name), None)


def config_fields(config_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if f.init]


def field_types(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert `value` (possibly a CLI string) to `annotation`: int, float, bool, str, tuple[X, ...], X | None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return _coerce(value, arms[0], name)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        return tuple(_coerce(item.strip() if isinstance(item, str) else item, item_type, name) for item in items)
    try:
        if isinstance(value, (dict, list, tuple)) and annotation in (bool, int, float, str):
            raise ValueError  # a mapping or list where one value belongs
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                    raise ValueError
                return value.lower() in TRUE_WORDS
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        words = " (true/false, yes/no, 1/0)" if annotation is bool else ""
        raise InvalidOptionError(f"option `{name}` expects {getattr(annotation, '__name__', annotation)}{words}, "
                                 f"got {value!r}") from None
    return value


def from_values(cls: type, values: dict[str, Any], what: str) -> Any:
    """Build dataclass `cls` from plain values, coercing strings; an unknown key names the valid ones."""
    known = {f.name for f in config_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidOptionError(f"unknown option{'s' if len(unknown) > 1 else ''} {choices(unknown)} for {what}; "
                                 f"valid options: {choices(sorted(known))}")
    hints = field_types(cls)
    return cls(**{key: _coerce(value, hints[key], key) for key, value in values.items()})


def check_choices(config: Any) -> None:
    """Refuse a field value outside its declared choices (called by the configs' `__post_init__`)."""
    for f in config_fields(type(config)):
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed is not None and value not in allowed:
            owner = getattr(config, "method", type(config).__name__)
            raise InvalidOptionError(f"{f.name} {value!r} is not valid for `{owner}`; valid: {choices(allowed)}")


def make_config(method: str, options: dict[str, Any] | None = None) -> Any:
    """Build the config of `method` from plain values, naming the valid options when one is unknown.

    Example: `make_config("wanda", {"sparsity": "0.5", "pattern": "2:4"})`.
    """
    return from_values(get_method(method).config_class, dict(options or {}), f"method `{method}`")


def options_text(config: Any) -> str:
    """`sparsity: 0.5, pattern: 2:4, ...`: a config's set options that apply to it, written as in a recipe."""
    import yaml

    unused = {f.name for f in config_fields(type(config))
              if "applies" in f.metadata and getattr(config, f.metadata["applies"][0]) != f.metadata["applies"][1]}
    return ", ".join(f"{key}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for key, value in config_to_dict(config).items()
                     if key != "method" and key not in unused and value not in (None, []))


def config_to_dict(config: Any) -> dict[str, Any]:
    """`{method: NAME, <every field>...}`: the recipe step form of a config."""
    step: dict[str, Any] = {"method": type(config).method}
    for f in config_fields(type(config)):
        value = getattr(config, f.name)
        step[f.name] = list(value) if isinstance(value, tuple) else value
    return step
