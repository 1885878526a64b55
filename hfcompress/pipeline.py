"""One compression run: recipe -> load -> calibrate -> compress (steps in order) -> evaluate -> save -> card -> push.

Everything that can be checked without the weights (method options, output folder, push target, architecture
support, every step on the weightless model as the earlier steps leave it, context length, amount of calibration
text) is checked before the weights are loaded. The steps' reports merge into one structure map, which chooses the
writer and which the measurements and the card read.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml

from .calibration import CalibrationData, cut_windows, load_calibration, read_text, token_stream
from .card import render_card
from .context import Context, Progress
from .errors import InvalidOptionError, UnsupportedModelError, choices
from .evaluate import folder_weights_bytes, format_table, measure, size_metrics
from .formats import read_metadata, save_model, staged_folder, structure_of, write_metadata, writer_name
from .formats.compressed_tensors import kernel_warning
from .hub import check_push_target, check_token, push
from .loading import (
    ResolvedModel,
    compute_dtype,
    load_model,
    load_tokenizer,
    model_skeleton,
    pick_device,
    resolve,
    torch_dtype,
)
from .metadata import build_metadata, evaluates_on_calibration_text
from .options import config_to_dict
from .plots import block_bars, have_matplotlib, kept_rank_shares, layer_map, module_scores, sparsity_map
from .recipe import EvaluationSpec, ModelSpec, Recipe
from .registry import Report, get_method
from .resources import check_memory, run_memory
from .sequential import named_blocks
from .structure import Structure

SPARSITY_MAP = "sparsity_map.png"
RECIPE_FILE = "recipe.yaml"  # the exact recipe, which the card says to rerun
BLOCK_BITS, BLOCK_IMPORTANCE = "block_bits.png", "block_importance.png"
DROP_SCORES, RANK_MAP = "layer_drop_scores.png", "rank_map.png"


@dataclass
class Result:
    """What `compress` returns: the model (compressed, in memory), measurements, and where it was written."""

    model: torch.nn.Module
    tokenizer: Any
    reports: list[Report]
    structure: Structure = field(default_factory=Structure)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    push_url: str | None = None
    onnx: dict[str, Any] | None = None  # the ONNX export's report, when the recipe asked for one

    @property
    def table(self) -> str:
        return format_table(self.before, self.after)


def _as_recipe(recipe: Recipe | dict | str) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def plan(resolved: ResolvedModel, recipe: Recipe, source: Structure | None = None) -> Structure:
    """Check every step before any weight is loaded and return the planned structure map (kinds only), starting
    from the `source` model's own map.

    Each step must support the model's family; its check runs on a weightless (meta-device) copy of the model as
    the earlier steps left it (a structural step applies its edit there), and a change that cannot follow an
    earlier one on the same module is refused with the reason."""
    config = resolved.config
    configs = [config, getattr(config, "text_config", None)]
    if getattr(config, "model_type", None) == "hfcompress":
        raise UnsupportedModelError(f"{resolved.source!r} is an hfcompress output with low-rank or dropped "
                                    "sub-layers; compress its original model instead, with all steps in one recipe")
    if resolved.kind != "gguf" and getattr(config, "quantization_config", None):
        raise UnsupportedModelError(f"{resolved.source!r} is already quantized "
                                    f"({dict(config.quantization_config).get('quant_method', 'unknown method')}); "
                                    "compress its original full-precision checkpoint instead")
    experts = [getattr(c, name, None) for c in configs if c is not None
               for name in ("num_local_experts", "num_experts", "n_routed_experts")]
    if any(isinstance(n, int) and n > 1 for n in experts):
        raise UnsupportedModelError(f"{resolved.source!r} is a mixture-of-experts model; its experts are fused "
                                    "tensors rather than Linear layers, which no method handles yet")
    specs = [get_method(type(step).method) for step in recipe.steps]
    for spec in specs:
        if resolved.family not in spec.supports:
            architecture = (getattr(resolved.config, "architectures", None) or [resolved.config.model_type])[0]
            raise UnsupportedModelError(f"method `{spec.name}` does not support {architecture} ({resolved.family}); "
                                        f"it supports: {choices(spec.supports)}")
    planned = Structure.from_dict(source.to_dict()) if source else Structure()
    if any(spec.check for spec in specs):
        skeleton = model_skeleton(resolved)
        if resolved.dtype is not None:  # the dtype the weights will be stored in, for checks that count bytes
            skeleton = skeleton.to(resolved.dtype)
        for spec, step in zip(specs, recipe.steps, strict=True):
            planned_change = spec.check(skeleton, step) if spec.check else None
            if isinstance(planned_change, Report):  # a structural step: it edited the skeleton and says how
                planned.add(planned_change.modules, planned_change.renamed, planned_change.config, method=spec.name)
            elif planned_change is not None and spec.changes:
                planned.add({name: {spec.changes: {}} for name in planned_change}, method=spec.name)
    if recipe.output.dir:
        writer_name(planned)  # a map no writer can store is refused now, not after the run
    return planned


def source_structure(resolved: ResolvedModel) -> Structure:
    """The structure map the source already has (an earlier hfcompress output compressed again), else empty."""
    if resolved.kind == "gguf":
        return Structure()
    try:
        earlier = read_metadata(resolved.location, **({"token": resolved.token} if resolved.token else {}),
                                **({"revision": resolved.revision} if resolved.revision else {}))
    except Exception:  # no hfcompress.json to be had: an ordinary model
        return Structure()
    return structure_of(earlier) if earlier else Structure()


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


def memory_parts(resolved: ResolvedModel, recipe: Recipe, device: torch.device) -> dict[str, int]:
    """What the run will hold in CPU memory, by part (see `resources.run_memory`)."""
    text = resolved.config.get_text_config()
    calibrates = any(get_method(type(step).method).calibrates(step) for step in recipe.steps)
    loaded = torch_dtype(recipe.model.dtype, device)
    weight_bytes = loaded.itemsize if isinstance(loaded, torch.dtype) else (resolved.dtype or torch.float32).itemsize
    evaluates = recipe.evaluation.enabled and resolved.family == "causal-lm"
    return run_memory(sum(p.numel() for p in model_skeleton(resolved).parameters()),
                      getattr(text, "hidden_size", 0) or 0, getattr(text, "vocab_size", 0) or 0,
                      recipe.calibration.n_samples if calibrates else 0, recipe.calibration.seq_len,
                      recipe.evaluation.seq_len if evaluates else 0, weight_bytes,
                      (resolved.dtype or torch.float32).itemsize)


def _describe(step: Any, report: Report) -> str:
    options = ", ".join(f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                        for k, v in config_to_dict(step).items() if k != "method" and v not in (None, []))
    stats = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.stats.items())
    return f"{report.method} ({options}); measured: {stats}"


def evaluation_windows(tokenizer: Any, ev: EvaluationSpec, family: str) -> torch.Tensor | None:
    """The (n_windows, seq_len) perplexity windows, or None when perplexity does not apply."""
    if not ev.enabled or family != "causal-lm":
        return None
    stream = token_stream(tokenizer, read_text(ev.source, "evaluation", text_field=ev.text_field, split=ev.split,
                                               subset=ev.subset))
    return cut_windows(stream, ev.seq_len, ev.n_windows, seed=None, what=f"evaluation source {ev.source!r}",
                       options="--eval-windows or --eval-seq-len")


def evaluate_model(model_spec: ModelSpec, ev: EvaluationSpec, token: str | None = None) -> dict[str, Any]:
    """Measure one model (no compression): perplexity, size, parameters, sparsity, bits, tokens/s."""
    device = pick_device(model_spec.device)
    resolved = resolve(model_spec.id, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code,
                       token=token, allow_pickle=model_spec.allow_pickle)
    ev = resolve_defaults(Recipe(model_spec, evaluation=ev), resolved, device).evaluation
    tokenizer = load_tokenizer(resolved)
    windows = evaluation_windows(tokenizer, ev, resolved.family)
    model = load_model(resolved, model_spec.dtype, device)
    metrics = measure(model, resolved.family, device, windows, structure=source_structure(resolved),
                      speed=ev.speed, sparsity=True, storage_dtype=resolved.dtype or model.dtype)
    if resolved.kind == "local":  # what is really on disk
        metrics.update(size_metrics(folder_weights_bytes(resolved.location), metrics["parameters"]))
    return metrics


def compress(recipe: Recipe | dict | str, *, log: Callable[[str], None] = print, progress: Progress | None = None,
             cancel: Callable[[], bool] | None = None, token: str | None = None) -> Result:
    """Run a recipe end to end and return the result (see `Result`).

    Args:
        recipe: a `Recipe`, its dict form, or a YAML path/string.
        log: receives one line per stage.
        progress: `progress(fraction, desc=...)` over the whole run, per step and per block (e.g. `gr.Progress()`).
        cancel: returns True to stop; checked between blocks and stages. A cancelled run raises
            `hfcompress.context.Cancelled` and leaves no output behind.
        token: Hub token for reading the source and pushing (default: HF_TOKEN or the stored login); it is passed
            through to the Hub client only, never logged or written.
    """
    recipe = _as_recipe(recipe)
    recipe.validate()
    device = pick_device(recipe.model.device)
    resolved = resolve(recipe.model.id, revision=recipe.model.revision,
                       trust_remote_code=recipe.model.trust_remote_code, token=token,
                       allow_pickle=recipe.model.allow_pickle)
    source = source_structure(resolved)  # read once: planning and the run both start from it
    planned = plan(resolved, recipe, source)
    if recipe.export.onnx:
        from .export import check_family

        check_family(resolved.family, recipe.model.id)
    if recipe.output.push_to:  # e.g. builtin:smollm2-135m is HuggingFaceTB/SmolLM2-135M-Instruct on the Hub
        check_push_target(recipe.output.push_to, resolved.base_model)
        check_token(token)
    levels = {bits for step in recipe.steps if get_method(type(step).method).changes == "quantized"
              for bits in (*getattr(step, "bits", ()), *getattr(step, "layer_bits", ()))}
    warning = kernel_warning(levels)
    if warning:
        log(f"warning: {warning}")
    recipe = resolve_defaults(recipe, resolved, device)
    check_memory(memory_parts(resolved, recipe, device))  # before any weight is read
    run = Context(device=device, progress=progress, cancel=cancel,
                  compute_dtype=compute_dtype(recipe.model.compute_dtype, device))
    tokenizer = load_tokenizer(resolved)

    calibration: CalibrationData | None = None
    c, ev = recipe.calibration, recipe.evaluation
    if any(get_method(type(step).method).calibrates(step) for step in recipe.steps):
        log(f"calibration: {c.n_samples} x {c.seq_len} tokens from {c.source}")
        calibration = load_calibration(tokenizer, c.source, c.n_samples, c.seq_len, c.seed, c.text_field, c.split,
                                       c.subset)
    if ev.enabled and calibration and evaluates_on_calibration_text(recipe):
        log(f"warning: evaluating on the calibration text {ev.source!r}; perplexity will look optimistic")
    windows = evaluation_windows(tokenizer, ev, resolved.family)

    log(f"loading {recipe.model.id} on cpu (compute device: {device})")
    run.report(0.0, "loading")
    model = load_model(resolved, recipe.model.dtype, device)
    # Saved in the checkpoint's own dtype (a bf16 model computed in fp32 on a CPU is stored in bf16 again).
    storage_dtype = resolved.dtype or model.dtype
    pruned = "sparse" in planned.kinds or any(get_method(type(s).method).changes == "sparse" for s in recipe.steps)
    quantizes = "quantized" in planned.kinds
    run.check_cancelled()
    run.report(0.02, "measuring the model before compression")
    before = (measure(model, resolved.family, device, windows, structure=source, sparsity=pruned,
                      quantized=quantizes, speed=ev.speed, desc="before", storage_dtype=storage_dtype,
                      tokenizer=tokenizer)
              if ev.enabled else {})

    reports, steps_meta, structure = [], [], source
    for index, step in enumerate(recipe.steps):
        spec = get_method(type(step).method)
        log(f"step {index + 1}/{len(recipe.steps)}: {spec.name}")
        run.check_cancelled()
        context = dataclasses.replace(run, calibration=calibration, storage_dtype=storage_dtype,
                                      progress=_step_progress(progress, index, len(recipe.steps), spec.name))
        start = time.perf_counter()
        report = spec.transform(model, step, context)
        report.stats["seconds"] = round(time.perf_counter() - start, 2)
        structure.add(report.modules, report.renamed, report.config, method=spec.name)
        reports.append(report)
        steps_meta.append({"method": spec.name, "paper": spec.paper, "description": _describe(step, report),
                           "config": config_to_dict(step), "stats": report.stats})
    run.check_cancelled()
    run.report(0.9, "measuring the compressed model")
    pruned = pruned or "sparse" in structure.kinds
    after = (measure(model, resolved.family, device, windows, structure=structure, sparsity=pruned,
                     quantized=quantizes or "quantized" in structure.kinds, speed=ev.speed, desc="after",
                     storage_dtype=storage_dtype, tokenizer=tokenizer) if ev.enabled else {})

    passes = run.compute_dtype or model.dtype
    dtypes = {"compute": str(model.dtype).removeprefix("torch."), "saved": str(storage_dtype).removeprefix("torch."),
              "passes": str(passes).removeprefix("torch.")}
    metadata = build_metadata(recipe, resolved, calibration=calibration, device=device, steps=steps_meta,
                              n_windows=None if windows is None else len(windows), structure=structure,
                              before=before, after=after, dtypes=dtypes)
    metadata["architectures"] = metadata["architectures"] or [type(model).__name__]  # a GGUF config names none
    result = Result(model, tokenizer, reports, structure, before, after, metadata)
    if recipe.output.dir:
        run.check_cancelled()
        run.report(0.97, "saving")
        log(f"saving to {recipe.output.dir}")
        _save(result, recipe, storage_dtype, log)
        log(f"saved to {recipe.output.dir}")
    if recipe.export.onnx:
        from .export import export_onnx

        run.report(0.98, "exporting to ONNX")
        result.onnx = export_onnx(recipe.output.dir, recipe.export.onnx, overwrite=recipe.output.overwrite,
                                  speed=recipe.export.speed, log=log)
        log(f"exported to {recipe.export.onnx}")
    if recipe.output.push_to:
        result.push_url = push(result.folder, recipe.output.push_to, private=recipe.output.private, token=token)
        log(f"pushed: {result.push_url}")
    run.report(1.0, "done")
    return result


def _step_progress(progress: Progress | None, index: int, total: int, name: str) -> Progress | None:
    """Maps a step's own progress (0..1) onto the run's share for steps, 0.05..0.9."""
    if progress is None:
        return None
    return lambda fraction, desc="": progress(0.05 + 0.85 * (index + fraction) / total,
                                              desc=f"step {index + 1}/{total} {desc or name}")


def _save(result: Result, recipe: Recipe, storage_dtype: torch.dtype, log: Callable[[str], None]) -> None:
    """Weights (by the writer the structure map calls for), tokenizer, plots, hfcompress.json and the card, staged
    in a temporary folder, then renamed. The model in memory is not changed."""
    metadata, out_dir = result.metadata, recipe.output.dir
    with staged_folder(out_dir, recipe.output.overwrite, recipe.model.id) as staging:
        metadata["loading"] = save_model(result.model, result.tokenizer, staging, result.structure, storage_dtype)
        if result.after:  # the real size on disk, not an estimate
            result.after.update(size_metrics(folder_weights_bytes(staging), result.after["parameters"]))
        plots = {}
        if "sparse" in result.structure.kinds:
            if not have_matplotlib():
                log("no sparsity map in the card: pip install 'hfcompress[plots]' to draw it")
            elif sparsity_map(result.model, staging / SPARSITY_MAP):
                plots["sparsity_map"] = SPARSITY_MAP
        plots.update(_block_plots(result, staging, log))
        if plots:
            metadata["plots"] = plots
        write_metadata(staging, metadata)
        (staging / RECIPE_FILE).write_text(yaml.safe_dump(metadata["recipe"], sort_keys=False), encoding="utf-8")
        (staging / "README.md").write_text(render_card(metadata), encoding="utf-8")
    result.folder = out_dir


def _block_plots(result: Result, folder: Any, log: Callable[[str], None]) -> dict[str, str]:
    """PNGs of the bits per block and the importance scores a step allocated them with, of the scores layer_drop
    chose its drops by, and of the rank kept in every layer a low-rank step factored (file name by plot)."""
    blocks = [name for name, _ in named_blocks(result.model)]
    plots = {}
    for report in result.reports:
        if report.stats.get("scores") and "dropped" in report.stats and have_matplotlib():
            influence = report.stats["score"] == "influence"
            module_scores(report.stats["scores"][0], report.stats["dropped"], folder / DROP_SCORES,
                          "block influence (lower = more redundant)" if influence else
                          "input/output similarity (higher = more redundant)", report.stats["score"])
            plots["layer_drop_scores"] = DROP_SCORES
        if report.stats.get("ranks") and have_matplotlib():
            shares = kept_rank_shares(result.model, report.stats["ranks"])
            if shares:  # empty when a later step removed the blocks
                layer_map(shares, folder / RANK_MAP, f"rank kept per layer ({report.method}; dense = 1)",
                          "rank / full rank")
                plots["rank_map"] = RANK_MAP
        if "block_bits" not in report.stats:
            continue
        if not have_matplotlib():
            log("no bits-per-block chart in the card: pip install 'hfcompress[plots]' to draw it")
            break
        block_bars(dict(zip(blocks, report.stats["block_bits"], strict=True)), folder / BLOCK_BITS,
                   f"bits per block ({report.method})", "bits", from_zero=True)
        plots["block_bits"] = BLOCK_BITS
        if report.stats.get("importance"):
            block_bars(report.stats["importance"], folder / BLOCK_IMPORTANCE,
                       "block importance (higher = more important)", "score")
            plots["block_importance"] = BLOCK_IMPORTANCE
    return plots
