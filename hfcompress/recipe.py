"""Recipe: the model, the ordered compression steps, calibration, evaluation and output settings.

YAML and Python build the same object, and `validate()` checks everything that can be checked without the model
before any weight is loaded. Example YAML:

    model: HuggingFaceTB/SmolLM2-135M
    steps:
      - {method: wanda, sparsity: 0.5}
    calibration: {source: builtin, n_samples: 64, seq_len: 512, seed: 0}
    output: {dir: out/smollm2-wanda, push_to: me/smollm2-wanda, private: true}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import CalibrationError, InvalidOptionError, choices
from .formats.folders import check_output_folder
from .hub import check_push_target
from .options import check_choices, check_dtype, config_to_dict, from_values, make_config, option
from .registry import calibrating_steps, get_method


@dataclass
class ModelSpec:
    id: str = option("", "Hub repo id, local folder, .gguf file, or `builtin:smollm2-135m`")
    revision: str | None = option(None, "branch, tag or commit of a Hub repo")
    dtype: str = option("auto", "auto (checkpoint dtype on GPU, float32 on CPU), float32, float16 or bfloat16")
    device: str = option("auto", "compute device: auto (cuda when present), cpu, cuda, cuda:N")
    compute_dtype: str = option("auto", "dtype of the calibration passes through the blocks (statistics stay "
                                        "float32): auto (bfloat16 where the device runs it natively - CUDA with "
                                        "bf16, CPUs with AVX512-BF16 or AMX - else float32; float32 for N:M "
                                        "pruning), float32, bfloat16, float16")
    trust_remote_code: bool = option(False, "allow the source repo's own modeling code to run")
    allow_pickle: bool = option(False, "read a pickle (.bin) checkpoint when the source has no safetensors "
                                       "(unpickling can run code: only for checkpoints you trust)")

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        check_dtype(self.compute_dtype)


@dataclass
class CalibrationSpec:
    source: str = option("builtin", "`builtin`, a .txt/.jsonl file, or a `datasets` id / local dataset folder")
    n_samples: int | None = option(None, "number of token windows (default: 128 on GPU, 32 on CPU)")
    seq_len: int | None = option(None, "tokens per window (default: 2048 on GPU, 512 on CPU, capped at the "
                                       "model's context)")
    seed: int = option(0, "seed for drawing the windows")
    text_field: str = option("text", "field holding the text in .jsonl files and datasets")
    image_field: str = option("image", "column holding the images of an image-text source (vision-language "
                                       "models calibrate on image-caption pairs)")
    split: str = option("train", "dataset split")
    subset: str | None = option(None, "dataset configuration, e.g. `wikitext-2-raw-v1` for `wikitext`")

    def __post_init__(self) -> None:
        for name in ("n_samples", "seq_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidOptionError(f"calibration {name} must be positive, got {value}")


@dataclass
class EvaluationSpec:
    enabled: bool = option(True, "measure before/after: perplexity (text encoders: embedding cosine to the "
                                 "original; CLIP: that and image-to-caption top-1 on image-caption pairs), size, "
                                 "parameters, sparsity, bits, tokens/s")
    source: str = option("builtin", "evaluation text (`builtin` uses a book kept apart from calibration text)")
    seq_len: int | None = option(None, "tokens per evaluation window, non-overlapping (default: 512, capped at the "
                                       "model's context)")
    n_windows: int | None = option(32, "number of windows (`none`: the whole text); for CLIP, of image-caption pairs")
    speed: bool = option(True, "measure prefill and decode tokens/s")
    samples: bool = option(True, "greedy answers of the model before and after to three fixed prompts, side by side "
                                 "in the card (causal LMs; a few seconds on a CPU)")
    remeasure: bool = option(False, "measure the model before compression even when an earlier run recorded the "
                                    "same weights, windows and settings (kept in ~/.cache/hfcompress)")
    text_field: str = option("text", "field holding the text in .jsonl files and datasets")
    split: str = option("test", "dataset split")
    subset: str | None = option(None, "dataset configuration, e.g. `wikitext-2-raw-v1` for `wikitext`")
    dtype: str = option("model", "what the model computes in while measured: `model`, the dtype it is loaded in "
                                 "(float32 on a CPU: numbers comparable between runs and machines), or `compute`, "
                                 "the run's --compute-dtype (faster where bf16 is native; perplexity moves by "
                                 "about one percent)", choices=("model", "compute"))

    def __post_init__(self) -> None:
        check_choices(self)
        if self.seq_len is not None and self.seq_len <= 1:
            raise InvalidOptionError(f"evaluation seq_len (--eval-seq-len) must be at least 2, got {self.seq_len}")
        if self.n_windows is not None and self.n_windows <= 0:
            raise InvalidOptionError(f"evaluation n_windows (--eval-windows) must be positive, got {self.n_windows}")


@dataclass
class OutputSpec:
    dir: str | None = option(None, "output folder (written to a temporary folder, then renamed into place; the "
                                   "command line's default is a new out/{model}-{method} folder)")
    overwrite: bool = option(False, "replace an existing non-empty output folder")
    push_to: str | None = option(None, "Hub repo id to push the result to")
    private: bool = option(False, "create the pushed repo as private")



@dataclass
class ExportSpec:
    onnx: str | None = option(None, "also export the saved output to this ONNX folder (validated in ONNX Runtime "
                                    "against PyTorch; needs `pip install 'hfcompress[onnx]'`)")
    speed: bool = option(True, "measure the ONNX graph's prefill and decode tokens/s beside PyTorch's")


def looks_like_path(source: str) -> bool:
    """A calibration or evaluation source written as a file or folder path, not `builtin` or a `datasets` id."""
    return source.startswith((".", "/", "~")) or source.endswith((".txt", ".jsonl", ".json")) or source.count("/") > 1


def missing_source(source: str, purpose: str) -> CalibrationError:
    return CalibrationError(f"{purpose} source {source!r} does not exist; give `builtin`, a .txt or .jsonl file, or a "
                            "`datasets` id")


def default_name(model: str, methods: list[str]) -> str:
    """`{model}-{method}[-{method}...]`, the name hfcompress gives an output that was not named (folder or repo)."""
    name = os.path.basename(model.removeprefix("builtin:").rstrip("/")) or "model"
    return f"{name}-{'-'.join(method.replace('_', '-') for method in methods) or 'compressed'}"


def unused_folder(base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first that does not exist yet."""
    candidate, number = base, 1
    while os.path.exists(candidate):
        number += 1
        candidate = f"{base}-{number}"
    return candidate

SECTIONS = {"model": ModelSpec, "calibration": CalibrationSpec, "evaluation": EvaluationSpec, "output": OutputSpec,
            "export": ExportSpec}


def _section(cls: type, value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    if name == "model" and isinstance(value, str):
        return ModelSpec(id=value)
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise InvalidOptionError(f"recipe section `{name}` must be a mapping, got {type(value).__name__}")
    return from_values(cls, value, f"recipe section `{name}`")


def _step(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and hasattr(type(value), "method"):
        get_method(type(value).method)
        return value
    if not isinstance(value, dict) or "method" not in value:
        raise InvalidOptionError(f"a recipe step must be a mapping with a `method` key, got {value!r}")
    options = dict(value)
    return make_config(options.pop("method"), options)


@dataclass
class Recipe:
    """Everything one compression run needs. Sections accept dataclasses or plain dicts; steps accept method config
    objects or `{method: NAME, ...}` dicts.

    Args:
        model: repo id / folder / .gguf path, or a `ModelSpec`.
        steps: compression steps, applied in order.
        calibration: where calibration text comes from and how much of it.
        evaluation: what to measure before and after.
        output: where to write and push the result.
        export: what to export the saved result to (ONNX).
    """

    model: Any
    steps: list[Any] = field(default_factory=list)
    calibration: Any = None
    evaluation: Any = None
    output: Any = None
    export: Any = None

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            setattr(self, name, _section(cls, getattr(self, name), name))
        if not isinstance(self.steps, (list, tuple)):
            raise InvalidOptionError("recipe `steps` must be a list")
        self.steps = [_step(step) for step in self.steps]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        unknown = sorted(set(data) - {"steps", *SECTIONS})
        if unknown:
            raise InvalidOptionError(f"unknown recipe key(s) {unknown}; valid keys: "
                                     f"{choices(['model', 'steps', *list(SECTIONS)[1:]])}")
        if "model" not in data:
            raise InvalidOptionError("the recipe has no `model`")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path_or_text: str) -> "Recipe":
        """Read a recipe from a YAML file path or a YAML string."""
        is_file = os.path.isfile(path_or_text)
        source = path_or_text
        if is_file:
            with open(path_or_text, encoding="utf-8") as handle:
                path_or_text = handle.read()
        name = source if is_file else "the recipe"
        try:
            data = yaml.safe_load(path_or_text)
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise InvalidOptionError(f"{name} is not valid YAML{at}: {problem}") from None
        if isinstance(data, str) and not is_file and "\n" not in data:  # one plain word: it was meant as a path
            raise InvalidOptionError(f"recipe file {path_or_text!r} does not exist")
        if not isinstance(data, dict):
            raise InvalidOptionError("a recipe must be a YAML mapping with at least `model` and `steps`")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": dataclasses.asdict(self.model),
                                "steps": [config_to_dict(step) for step in self.steps]}
        for name in ("calibration", "evaluation", "output", "export"):
            data[name] = dataclasses.asdict(getattr(self, name))
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Checks that need no model and no section can make alone: steps, missing source files, the output folder,
        the push target. (Each section checks its own numbers when it is built.)"""
        if not self.model.id:
            raise InvalidOptionError("the recipe names no model")
        if not self.steps:
            raise InvalidOptionError("the recipe has no steps; add at least one `{method: NAME, ...}`")
        sources = {"calibration": self.calibration.source} if calibrating_steps(self.steps) else {}
        if self.evaluation.enabled:
            sources["evaluation"] = self.evaluation.source
        for purpose, source in sources.items():  # a mistyped file name, told before the model is even looked up
            if looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
                raise missing_source(source, purpose)
        out = self.output
        if out.dir:
            check_output_folder(out.dir, out.overwrite, self.model.id)
        if out.push_to and not out.dir:
            raise InvalidOptionError("pushing needs an output folder: set output.dir (--out)")
        if out.push_to:
            check_push_target(out.push_to, self.model.id)
        if self.export.onnx:
            from .export import check_packages

            if not out.dir:
                raise InvalidOptionError("exporting to ONNX needs an output folder: set output.dir (--out)")
            check_packages()
            check_output_folder(self.export.onnx, out.overwrite, self.model.id)
