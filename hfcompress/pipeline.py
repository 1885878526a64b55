"""One compression run: recipe -> load -> calibrate -> compress (steps in order) -> evaluate -> save -> card -> push.

Everything that can be checked without the weights (method options, output folder, push target, architecture
support, context length, amount of calibration text) is checked before the weights are loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import __version__
from .calibration import CalibrationData, cut_windows, load_calibration, read_text, token_stream
from .card import render_card
from .errors import InvalidOptionError, UnsupportedModelError, choices
from .evaluate import folder_weights_bytes, format_table, measure
from .formats import save_model, staged_folder, write_metadata
from .hub import check_push_target, check_token, push
from .loading import ResolvedModel, load_model, load_tokenizer, model_skeleton, pick_device, resolve
from .options import config_to_dict
from .plots import have_matplotlib, sparsity_map
from .recipe import EvaluationSpec, ModelSpec, Recipe
from .registry import Report, get_method

SPARSITY_MAP = "sparsity_map.png"


@dataclass
class Result:
    """What `compress` returns: the model (compressed, in memory), measurements, and where it was written."""

    model: torch.nn.Module
    tokenizer: Any
    reports: list[Report]
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    push_url: str | None = None

    @property
    def table(self) -> str:
        return format_table(self.before, self.after)


def _as_recipe(recipe: Recipe | dict | str) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def check_support(resolved: ResolvedModel, recipe: Recipe) -> None:
    """Every step supports the model's family and fits its layers (checked on a weightless copy of the model);
    fail before loading weights when one does not."""
    config = resolved.config
    configs = [config, getattr(config, "text_config", None)]
    if resolved.kind != "gguf" and getattr(config, "quantization_config", None):
        raise UnsupportedModelError(f"{resolved.source!r} is already quantized "
                                    f"({dict(config.quantization_config).get('quant_method', 'unknown method')}); "
                                    "compress its original full-precision checkpoint instead")
    experts = [getattr(c, name, None) for c in configs if c is not None
               for name in ("num_local_experts", "num_experts", "n_routed_experts")]
    if any(isinstance(n, int) and n > 1 for n in experts):
        raise UnsupportedModelError(f"{resolved.source!r} is a mixture-of-experts model; its experts are fused "
                                    "tensors rather than Linear layers, which no method handles yet")
    checks = []
    for step in recipe.steps:
        spec = get_method(type(step).method)
        if resolved.family not in spec.supports:
            architecture = (getattr(resolved.config, "architectures", None) or [resolved.config.model_type])[0]
            raise UnsupportedModelError(f"method `{spec.name}` does not support {architecture} ({resolved.family}); "
                                        f"it supports: {choices(spec.supports)}")
        if spec.check:
            checks.append((spec.check, step))
    if checks:
        skeleton = model_skeleton(resolved)
        for check, step in checks:
            check(skeleton, step)


def resolve_defaults(recipe: Recipe, resolved: ResolvedModel, device: torch.device) -> Recipe:
    """Fill the device- and model-dependent defaults (window counts and lengths) and check lengths against the
    model's context."""
    calib, ev = recipe.calibration, recipe.evaluation
    on_gpu = device.type == "cuda"
    context = resolved.context_length or 2048
    checks = [("calibration seq_len", calib.seq_len), ("evaluation seq_len", ev.seq_len)]
    for what, length in checks:
        if length is not None and length > context:
            raise InvalidOptionError(f"{what} {length} is longer than the model's context ({context} tokens)")
    return dataclasses.replace(
        recipe,
        calibration=dataclasses.replace(calib, n_samples=calib.n_samples or (128 if on_gpu else 32),
                                        seq_len=calib.seq_len or min(2048 if on_gpu else 512, context)),
        evaluation=dataclasses.replace(ev, seq_len=ev.seq_len or min(512, context)))


def _describe(step: Any, report: Report) -> str:
    options = ", ".join(f"{k}={v}" for k, v in config_to_dict(step).items() if k != "method" and v not in (None, []))
    stats = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.stats.items())
    return f"{report.method} ({options}); measured: {stats}"


def _source_license(resolved: ResolvedModel) -> str | None:
    from huggingface_hub import ModelCard

    if resolved.kind == "gguf":
        import gguf

        field_ = gguf.GGUFReader(f"{resolved.location}/{resolved.gguf_file}").fields.get("general.license")
        return field_.contents() if field_ is not None else None
    try:
        path = f"{resolved.location}/README.md" if resolved.kind == "local" else resolved.location
        return ModelCard.load(path).data.license
    except Exception:  # a missing or malformed base card only means no license line
        return None


def evaluates_on_calibration_text(recipe: Recipe) -> bool:
    """Whether evaluation reads the calibration text (split and subset matter only for `datasets` sources)."""
    c, ev = recipe.calibration, recipe.evaluation
    if ev.source != c.source or ev.source == "builtin":
        return False
    return os.path.isfile(os.path.expanduser(ev.source)) or (ev.subset, ev.split) == (c.subset, c.split)


def evaluation_windows(tokenizer: Any, ev: EvaluationSpec, family: str) -> torch.Tensor | None:
    """The (n_windows, seq_len) perplexity windows, or None when perplexity does not apply."""
    if not ev.enabled or family != "causal-lm":
        return None
    stream = token_stream(tokenizer, read_text(ev.source, "evaluation", text_field=ev.text_field, split=ev.split,
                                               subset=ev.subset))
    return cut_windows(stream, ev.seq_len, ev.n_windows, seed=None, what=f"evaluation source {ev.source!r}",
                       options="--eval-windows or --eval-seq-len")


def evaluate_model(model_spec: ModelSpec, ev: EvaluationSpec) -> dict[str, Any]:
    """Measure one model (no compression): perplexity, size, parameters, sparsity, bits, tokens/s."""
    device = pick_device(model_spec.device)
    resolved = resolve(model_spec.id, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code)
    ev = resolve_defaults(Recipe(model_spec, evaluation=ev), resolved, device).evaluation
    tokenizer = load_tokenizer(resolved)
    windows = evaluation_windows(tokenizer, ev, resolved.family)
    model = load_model(resolved, model_spec.dtype, device)
    return measure(model, resolved.family, device, windows, speed=ev.speed,
                   storage_dtype=resolved.dtype or model.dtype)


def compress(recipe: Recipe | dict | str, *, log: Callable[[str], None] = print) -> Result:
    """Run a recipe end to end and return the result (see `Result`).

    Args:
        recipe: a `Recipe`, its dict form, or a YAML path/string.
        log: receives one line per stage.
    """
    recipe = _as_recipe(recipe)
    recipe.validate()
    device = pick_device(recipe.model.device)
    resolved = resolve(recipe.model.id, revision=recipe.model.revision,
                       trust_remote_code=recipe.model.trust_remote_code)
    check_support(resolved, recipe)
    if recipe.output.push_to:  # e.g. builtin:smollm2-135m is HuggingFaceTB/SmolLM2-135M-Instruct on the Hub
        check_push_target(recipe.output.push_to, resolved.base_model)
        check_token()
    recipe = resolve_defaults(recipe, resolved, device)
    tokenizer = load_tokenizer(resolved)

    calibration: CalibrationData | None = None
    c, ev = recipe.calibration, recipe.evaluation
    if any(get_method(type(step).method).needs_calibration for step in recipe.steps):
        log(f"calibration: {c.n_samples} x {c.seq_len} tokens from {c.source}")
        calibration = load_calibration(tokenizer, c.source, c.n_samples, c.seq_len, c.seed, c.text_field, c.split,
                                       c.subset)
    if ev.enabled and calibration and evaluates_on_calibration_text(recipe):
        log(f"warning: evaluating on the calibration text {ev.source!r}; perplexity will look optimistic")
    windows = evaluation_windows(tokenizer, ev, resolved.family)

    log(f"loading {recipe.model.id} on cpu (compute device: {device})")
    model = load_model(resolved, recipe.model.dtype, device)
    # Saved in the checkpoint's own dtype (a bf16 model computed in fp32 on a CPU is stored in bf16 again).
    storage_dtype = resolved.dtype or model.dtype
    before = (measure(model, resolved.family, device, windows, speed=ev.speed, desc="before",
                      storage_dtype=storage_dtype) if ev.enabled else {})

    reports, steps_meta = [], []
    for step in recipe.steps:
        spec = get_method(type(step).method)
        log(f"step {len(reports) + 1}/{len(recipe.steps)}: {spec.name}")
        start = time.perf_counter()
        report = spec.transform(model, step, calibration, device)
        report.stats["seconds"] = round(time.perf_counter() - start, 2)
        reports.append(report)
        steps_meta.append({"method": spec.name, "paper": spec.paper, "description": _describe(step, report),
                           "config": config_to_dict(step), "stats": report.stats, "modules": report.modules})
    after = (measure(model, resolved.family, device, windows, speed=ev.speed, desc="after",
                     storage_dtype=storage_dtype) if ev.enabled else {})

    metadata = _metadata(recipe, resolved, calibration, windows, device, steps_meta, before, after)
    metadata["dtype"] = {"compute": str(model.dtype).removeprefix("torch."),
                         "saved": str(storage_dtype).removeprefix("torch.")}
    result = Result(model, tokenizer, reports, before, after, metadata)
    if recipe.output.dir:
        _save(result, recipe, log)
        log(f"saved to {recipe.output.dir}")
    if recipe.output.push_to:
        result.push_url = push(result.folder, recipe.output.push_to, private=recipe.output.private)
        log(f"pushed: {result.push_url}")
    return result


def _metadata(recipe: Recipe, resolved: ResolvedModel, calibration: CalibrationData | None,
              windows: torch.Tensor | None, device: torch.device, steps: list[dict], before: dict,
              after: dict) -> dict[str, Any]:
    """The content of hfcompress.json (everything the card and `hfcompress.load` need)."""
    return {
        "hfcompress_version": __version__,
        "libraries": {"torch": torch.__version__, "transformers": _version("transformers"),
                      "huggingface_hub": _version("huggingface_hub"), "safetensors": _version("safetensors")},
        "source": recipe.model.id,
        "base_model": resolved.base_model,
        "gguf_file": resolved.gguf_file,
        "family": resolved.family,
        "architectures": getattr(resolved.config, "architectures", None),
        "license": _source_license(resolved),
        "recipe": recipe.to_dict(),
        "calibration": calibration.info if calibration else None,
        "evaluation": {**dataclasses.asdict(recipe.evaluation),
                       "n_windows_used": None if windows is None else len(windows), "device": str(device),
                       "on_calibration_text": bool(calibration) and evaluates_on_calibration_text(recipe),
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                       "date": datetime.date.today().isoformat()},
        "steps": steps,
        "metrics": {"before": before, "after": after},
        "loading": {"trust_remote_code": bool(getattr(resolved.config, "auto_map", None)), "packages": []},
        "output": {"push_to": recipe.output.push_to},
    }


def _save(result: Result, recipe: Recipe, log: Callable[[str], None]) -> None:
    """Weights, tokenizer, plots, hfcompress.json and the card, staged in a temporary folder, then renamed."""
    metadata, out_dir = result.metadata, recipe.output.dir
    with staged_folder(out_dir, recipe.output.overwrite, recipe.model.id) as staging:
        result.model.to(getattr(torch, metadata["dtype"]["saved"]))
        save_model(result.model, result.tokenizer, staging)
        if result.after:
            result.after["size_bytes"] = folder_weights_bytes(staging)  # the real size on disk, not an estimate
        if not have_matplotlib():
            log("no sparsity map in the card: pip install 'hfcompress[plots]' to draw it")
        elif sparsity_map(result.model, staging / SPARSITY_MAP):
            metadata["plots"] = {"sparsity_map": SPARSITY_MAP}
        write_metadata(staging, metadata)
        (staging / "README.md").write_text(render_card(metadata), encoding="utf-8")
    result.folder = out_dir


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
