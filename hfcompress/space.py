"""The browser app (Gradio) behind `spaces/app.py` and `hfcompress space`: pick a model, build a recipe from the
methods' own option declarations, run it with live progress, look at the results, download or push them.

Everything a user types goes through the same `make_config` / `Recipe` checks as the CLI, so errors name the valid
choices. Tokens: on a Hugging Face Space each user signs in (OAuth) and the run gets that user's token; off a Space
the token comes from a password field of that browser session. Either way it is passed to the Hub client for this
one call and never stored, logged or shared between sessions. One run at a time (queue of bounded size, position
shown by Gradio); Cancel stops a run between two blocks, and nothing of it is left behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import typing
import uuid
from pathlib import Path
from typing import Any

import yaml

from .errors import HfCompressError, InvalidOptionError
from .options import config_fields, config_to_dict, field_types, make_config
from .recipe import default_name
from .registry import available_methods

BUILTIN = "builtin:smollm2-135m"
QUEUE_SIZE = 8
WORK_ROOT = Path(tempfile.gettempdir()) / "hfcompress-space"
DEFAULT_STEP = {"method": "wanda", "sparsity": 0.5}


# --- forms from the config classes (pure; tested without a browser) ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class FormField:
    """One input of a method's form: `kind` is `dropdown` (declared choices), `checkbox`, `integer`, `number` or
    `text` (comma-separated for lists; empty means the default `None`)."""
    name: str
    kind: str
    default: Any
    help: str
    choices: tuple | None = None


def method_form(method: str) -> list[FormField]:
    """The inputs of `method`'s form, one per config field, in declaration order."""
    config_class = available_methods()[method].config_class
    hints = field_types(config_class)
    fields = []
    for f in config_fields(config_class):
        default, hint = f.default, hints[f.name]
        arms = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        base = typing.get_origin(arms[0]) or arms[0]
        if f.metadata.get("choices"):
            kind = "dropdown"
        elif base is bool:
            kind = "checkbox"
        elif base in (int, float) and len(arms) == 1 and type(None) not in typing.get_args(hint):
            kind = "integer" if base is int else "number"
        else:
            kind = "text"
        if kind == "text":
            default = "" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) \
                else str(default)
        fields.append(FormField(f.name, kind, default, f.metadata.get("help", ""), f.metadata.get("choices")))
    return fields


def step_from_form(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """A recipe step from the form's values: only what differs from the defaults, checked by `make_config` (so a bad
    value fails here with the valid choices)."""
    form = {f.name: f for f in method_form(method)}
    options = {}
    for name, value in values.items():
        if name not in form:
            raise InvalidOptionError(f"unknown option {name!r} for `{method}`; valid: {sorted(form)}")
        if isinstance(value, str):
            value = value.strip()
        if value == form[name].default or (form[name].kind == "text" and value == ""):
            continue
        if form[name].kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)
        options[name] = value
    config = make_config(method, options)
    full = config_to_dict(config)
    return {"method": method, **{name: full[name] for name in options}}


def steps_yaml(model: str, steps: list[dict[str, Any]], calibration: dict[str, Any]) -> str:
    """The recipe as YAML, to copy into a file for `hfcompress --recipe`."""
    return yaml.safe_dump({"model": model, "steps": steps, "calibration": calibration}, sort_keys=False)


def default_target(user: str | None, model: str, steps: list[dict[str, Any]]) -> str:
    """`{user}/{model}-{method}[-{method}...]`; `me` stands for the user until one is known."""
    return f"{user or 'me'}/{default_name(model, [step['method'] for step in steps])}"


def check_fits(model: str, token: str | None = None, available: int | None = None) -> int:
    """Estimated bytes a run on `model` needs, from its config before any weight is downloaded: twice its size in
    fp32 (the model, and room for the activations, statistics and the tensors being written); raises when that
    exceeds the memory free here (`available`, default: read from the system)."""
    from .loading import model_skeleton, resolve

    resolved = resolve(model, token=token)
    parameters = sum(p.numel() for p in model_skeleton(resolved).parameters())
    needed = 2 * 4 * parameters
    if available is None:
        from .resources import available_memory

        available = available_memory()
    if needed > available:
        raise InvalidOptionError(f"{model} has {parameters / 1e9:.2f} B parameters: a run needs about "
                                 f"{needed / 2**30:.1f} GiB of memory and this machine has {available / 2**30:.1f} "
                                 "GiB free; pick a smaller model or run hfcompress on a larger machine")
    return needed


# --- runs ---------------------------------------------------------------------------------------------------------

_cancels: dict[str, threading.Event] = {}   # browser session -> its cancel flag (the flag only, never a token)


def cancel_flag(session: str) -> threading.Event:
    return _cancels.setdefault(session, threading.Event())


def run_recipe(model: str, steps: list[dict[str, Any]], calibration: dict[str, Any], session: str,
               token: str | None = None, progress: Any = None) -> Any:
    """Compress `model` with `steps` into a fresh folder of this session; return the `Result`. A cancelled or failed
    run leaves no folder behind."""
    from . import compress

    if not steps:
        raise InvalidOptionError("add at least one step to the recipe")
    check_fits(model, token)
    flag = cancel_flag(session)
    flag.clear()
    out = WORK_ROOT / session / uuid.uuid4().hex[:8] / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return compress({"model": model, "steps": steps, "calibration": calibration,
                         "evaluation": {"n_windows": 8, "speed": False}, "output": {"dir": str(out)}},
                        log=lambda line: None, progress=progress, cancel=flag.is_set, token=token)
    except BaseException:
        shutil.rmtree(out.parent, ignore_errors=True)
        raise


def archive(folder: str | os.PathLike) -> str:
    """A .zip of the result folder beside it, for download."""
    folder = Path(folder)
    return shutil.make_archive(str(folder.parent / folder.parent.name), "zip", folder)


def clear_session(session: str) -> None:
    """Forget a closed browser session: its results and its cancel flag."""
    _cancels.pop(session, None)
    shutil.rmtree(WORK_ROOT / session, ignore_errors=True)


def on_a_space() -> bool:
    """True on a Hugging Face Space with OAuth configured (the sign-in button then works for real)."""
    return bool(os.environ.get("SPACE_ID") and os.environ.get("OAUTH_CLIENT_ID"))


# the command-line ways to give a token, and what a person in the browser does instead
TOKEN_ADVICE = [("log in (`hf auth login`) or set HF_TOKEN", "sign in (or paste a token)"),
                ("`hf auth login` or HF_TOKEN", "sign in, or paste a token"),
                ("check HF_TOKEN or run `hf auth login`", "sign in again or check the token you pasted"),
                ("run `hf auth login` or set HF_TOKEN", "sign in, or paste a token")]


def error_text(error: BaseException) -> str:
    """What the app shows for a failed run: the message of an error a user can fix (its command-line advice about
    tokens put as what to do in the browser), else its type and message."""
    if not isinstance(error, HfCompressError):
        return f"{type(error).__name__}: {error}"
    text = str(error)
    for command_line, browser in TOKEN_ADVICE:
        text = text.replace(command_line, browser)
    return text
