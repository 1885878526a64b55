"""One compression run: recipe -> load -> calibrate -> compress (steps in order) -> evaluate -> save -> card -> push.

Everything that can be checked without the weights (method options, output folder, push target, architecture
support, every step on the weightless model as the earlier steps leave it, context length, amount of calibration
text) is checked before the weights are loaded. The steps' reports merge into one structure map, which chooses the
writer and which the measurements and the card read.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml
from transformers import ProcessorMixin

from .cache import cached_measurement, measurement_key, weights_digest
from .calibration import (
    BUILTIN,
    CalibrationData,
    check_processor,
    cut_windows,
    encode_pairs,
    holds_text_only,
    load_calibration,
    load_image_text_calibration,
    read_text,
    shuffled_pairs,
    token_stream,
)
from .card import render_card
from .context import Context, Progress
from .evaluate import (
    embedding_similarity,
    folder_weights_bytes,
    format_table,
    measure,
    measures_pairs,
    quality_metric,
    reference_embeddings,
    size_metrics,
)
from .formats import save_model, staged_folder, write_metadata
from .hub import push
from .loading import (
    ResolvedModel,
    base_architectures,
    compute_dtype,
    load_model,
    load_tokenizer,
    pick_device,
    resolve,
    torch_dtype,
)
from .metadata import build_metadata, evaluates_on_calibration_text
from .options import config_to_dict, options_text
from .plots import block_bars, have_matplotlib, kept_rank_shares, layer_map, module_scores, sparsity_map
from .preflight import calibration_line, pairs_origin, preflight, resolve_defaults, source_structure
from .recipe import EvaluationSpec, ModelSpec, Recipe
from .registry import Report, calibrating_steps, get_method
from .resources import match_threads
from .sequential import named_blocks
from .structure import Structure

SPARSITY_MAP = "sparsity_map.png"
RECIPE_FILE = "recipe.yaml"  # the exact recipe, which the card says to rerun
BLOCK_BITS, BLOCK_IMPORTANCE = "block_bits.png", "block_importance.png"
DROP_SCORES, RANK_MAP, GROUP_SCORES = "layer_drop_scores.png", "rank_map.png", "group_scores.png"


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


def _describe(step: Any, report: Report) -> str:
    """A step for the card, after its method's name: the options that apply to it, then what it measured."""
    stats = ", ".join(f"{k} {_stat_text(v)}" for k, v in report.stats.items() if v is not None)
    return f"{options_text(step)}; measured: {stats}"


def _stat_text(value: Any) -> str:
    """A measured number to 4 significant digits; a map of numbers per module with the module path they all start
    with left out (`{0: 0.499, 1: 0.52, ...}`)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
        names = [str(name) for name in value]
        shared = os.path.commonprefix(names)
        shared = shared[:shared.rfind(".") + 1] if len(names) > 1 else ""
        return "{" + ", ".join(f"{name[len(shared):]}: {v:.3g}" for name, v in zip(names, value.values(),
                                                                                 strict=True)) + "}"
    return str(value)


def evaluation_windows(tokenizer: Any, ev: EvaluationSpec, metric: str | None) -> torch.Tensor | None:
    """The (n_windows, seq_len) evaluation windows of `metric` (`quality_metric`: perplexity or the embedding
    cosine), or None when there is none."""
    if not ev.enabled or metric is None:
        return None
    if isinstance(tokenizer, ProcessorMixin):  # an image-text model's processor: its text tokenizer
        tokenizer = tokenizer.tokenizer
    stream = token_stream(tokenizer, read_text(ev.source, "evaluation", text_field=ev.text_field, split=ev.split,
                                               subset=ev.subset))
    return cut_windows(stream, ev.seq_len, ev.n_windows, seed=None, what=f"evaluation source {ev.source!r}",
                       options="--eval-windows or --eval-seq-len")


def evaluation_pairs(processor: Any, recipe: Recipe, log: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """A dual encoder's (CLIP) evaluation data: the processor's outputs for up to --eval-windows image-caption pairs
    of --eval-source, or by default the pairs of the --calib source that follow the calibration draw in its shuffle
    (never calibrated on; `preflight.pairs_origin`). None, said in the log, where the source holds text only or no
    pair is left."""
    c, ev = recipe.calibration, recipe.evaluation
    origin = pairs_origin(recipe)
    source, skip, own = origin["source"], origin["after_calibration_pairs"], ev.source != BUILTIN
    # past a calibration draw: the calibration source shuffled exactly as that draw shuffles it (buffer and seed)
    draw, seed = (c.n_samples, c.seed) if skip else (ev.n_windows or c.n_samples, 0 if own else c.seed)
    if not ev.enabled:
        return None
    if holds_text_only(source):
        log(f"note: no quality number: a dual encoder is measured on image-caption pairs and {source!r} holds text "
            "only; give --calib (or --eval-source) an image folder or a dataset with images")
        return None
    check_processor(processor)
    split, subset, text_field = (ev.split, ev.subset, ev.text_field) if own else (c.split, c.subset, c.text_field)
    stream = shuffled_pairs(source, draw, seed, text_field, c.image_field, split, subset, "evaluation").skip(skip)
    rows = list(stream.take(ev.n_windows) if ev.n_windows else stream)
    if not rows:
        log(f"note: no quality number: {source!r} has no image-caption pairs beyond the {skip} calibrated on")
        return None
    if ev.n_windows and len(rows) < ev.n_windows:
        log(f"note: evaluating on the {len(rows)} image-caption pairs of {source!r} "
            f"{'after the calibration draw' if skip else 'there are'} (--eval-windows {ev.n_windows})")
    return encode_pairs(processor, rows, c.seq_len, text_field, c.image_field)


def before_key(resolved: ResolvedModel, windows: torch.Tensor | None, settings: dict[str, Any]) -> str | None:
    """The cache key of the "before" numbers, or None when the weights cannot be read locally to name them."""
    location = resolved.location
    try:
        if resolved.kind == "hub":  # the files just loaded are in the Hub cache: no network
            from huggingface_hub import snapshot_download

            location = snapshot_download(resolved.location, revision=resolved.revision, local_files_only=True)
        return measurement_key(weights_digest(location, resolved.gguf_file), windows, settings)
    except Exception:  # any reason not to cache is a reason to measure
        return None


def evaluate_model(model_spec: ModelSpec, ev: EvaluationSpec, token: str | None = None) -> dict[str, Any]:
    """Measure one model (no compression): perplexity, size, parameters, sparsity, bits, tokens/s."""
    match_threads()
    device = pick_device(model_spec.device)
    resolved = resolve(model_spec.id, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code,
                       token=token, allow_pickle=model_spec.allow_pickle)
    ev = resolve_defaults(Recipe(model_spec, evaluation=ev), resolved, device).evaluation
    tokenizer = load_tokenizer(resolved)
    metric = quality_metric(resolved.family, base_architectures(resolved.config))
    # an encoder's measure is its embeddings' cosine to the uncompressed model's: nothing to compare with here
    windows = evaluation_windows(tokenizer, ev, metric if metric == "perplexity" else None)
    structure = source_structure(resolved)
    quantized = structure.of_kind("quantized")
    if quantized and resolved.kind == "local":  # an hfcompress output: measured as it was in memory
        from .formats.compressed_tensors import load_unpacked

        model = load_unpacked(resolved, quantized, torch_dtype(model_spec.dtype, device))[0]
    else:
        model = load_model(resolved, model_spec.dtype, device)
    metrics = measure(model, resolved.family, device, windows, structure=structure, speed=ev.speed,
                      sparsity=True, quantized=bool(quantized), storage_dtype=resolved.dtype or model.dtype,
                      compute_dtype=compute_dtype(model_spec.compute_dtype, device) if ev.dtype == "compute" else None)
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
    checked = preflight(_as_recipe(recipe), token, log)  # everything checked before any weight is read
    match_threads(log)
    recipe, device, resolved, source, planned = (checked.recipe, checked.device, checked.resolved, checked.source,
                                                 checked.planned)
    run = Context(device=device, progress=progress, cancel=cancel,
                  compute_dtype=compute_dtype(recipe.model.compute_dtype, device, recipe.steps))
    tokenizer = load_tokenizer(resolved)

    calibration: CalibrationData | None = None
    c, ev = recipe.calibration, recipe.evaluation
    calibrates = calibrating_steps(recipe.steps) > 0
    if calibrates:
        log(calibration_line(c, resolved.family))
    if calibrates and resolved.family == "vision-language":  # image-caption pairs through the model's processor
        calibration = load_image_text_calibration(tokenizer, c.source, c.n_samples, c.seq_len, c.seed, c.text_field,
                                                  c.image_field, c.split, c.subset)
    elif calibrates:
        calibration = load_calibration(tokenizer, c.source, c.n_samples, c.seq_len, c.seed, c.text_field, c.split,
                                       c.subset)
    if ev.enabled and calibration and evaluates_on_calibration_text(recipe):
        log(f"warning: evaluating on the calibration text {ev.source!r}; perplexity will look optimistic")
    metric = quality_metric(resolved.family, base_architectures(resolved.config))
    pairs = measures_pairs(resolved.family, base_architectures(resolved.config))
    windows = evaluation_pairs(tokenizer, recipe, log) if pairs else evaluation_windows(tokenizer, ev, metric)

    passes_note = f", calibration passes in {str(run.compute_dtype).removeprefix('torch.')}" if calibration else ""
    log(f"loading {recipe.model.id} on cpu (compute device: {device}{passes_note})")
    run.report(0.0, "loading")
    model = load_model(resolved, recipe.model.dtype, device)
    # Saved in the checkpoint's own dtype (a bf16 model computed in fp32 on a CPU is stored in bf16 again).
    storage_dtype = resolved.dtype or model.dtype
    pruned = "sparse" in planned.kinds or any(get_method(type(s).method).changes == "sparse" for s in recipe.steps)
    quantizes = "quantized" in planned.kinds
    run.check_cancelled()
    run.report(0.02, "measuring the model before compression")
    before, before_cached = {}, False
    eval_dtype = run.compute_dtype if ev.dtype == "compute" else None
    samples_by = tokenizer if ev.samples else None     # the tokenizer of the greedy answers, when the card shows them
    if ev.enabled:
        def measure_before() -> dict[str, Any]:  # the cheap sparsity and bits too, so that any method reuses it
            return measure(model, resolved.family, device, windows, structure=source, sparsity=True, quantized=True,
                           speed=ev.speed, desc="before", storage_dtype=storage_dtype,
                           tokenizer=samples_by, compute_dtype=eval_dtype)

        key = None if ev.remeasure else before_key(resolved, windows, {
            "family": resolved.family, "dtype": model.dtype, "storage": storage_dtype, "device": device,
            "structure": source.to_dict(), "speed": ev.speed, "samples": ev.samples,
            "threads": torch.get_num_threads(), "eval_dtype": eval_dtype})
        # tokens/s that never settled (a busy machine) is not kept: the next run times it again
        before, before_cached = (cached_measurement(key, measure_before, keep=lambda m: "speed_note" not in m)
                                 if key else (measure_before(), False))
        kept = {"sparsity": pruned, "nominal_bits": quantizes}   # the rows this run's table has
        before = {name: value for name, value in before.items() if kept.get(name, True)}
        if before_cached:
            log("before: the numbers an earlier run measured on the same weights, windows and settings "
                "(--remeasure to measure again)")
    # an encoder is measured by how close its embeddings stay to the uncompressed model's: these (not cached)
    reference = (reference_embeddings(model, device, windows, eval_dtype)
                 if metric == "embedding_cosine" and windows is not None else None)
    if reference is not None:
        before.update(embedding_similarity(reference, reference))

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
                     storage_dtype=storage_dtype, tokenizer=samples_by, compute_dtype=eval_dtype, reference=reference)
             if ev.enabled else {})

    passes = run.compute_dtype or model.dtype
    dtypes = {"compute": str(model.dtype).removeprefix("torch."), "saved": str(storage_dtype).removeprefix("torch."),
              "passes": str(passes).removeprefix("torch.")}
    metadata = build_metadata(recipe, resolved, calibration=calibration, device=device, steps=steps_meta,
                              n_windows=None if windows is None else len(windows["input_ids"] if pairs else windows),
                              structure=structure,
                              before=before, after=after, dtypes=dtypes)
    metadata["architectures"] = metadata["architectures"] or [type(model).__name__]  # a GGUF config names none
    if metadata.get("evaluation"):
        metadata["evaluation"]["before_cached"] = before_cached
        if pairs and windows is not None:  # a dual encoder's image-caption pairs, for the card
            metadata["evaluation"]["pairs"] = pairs_origin(recipe)
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
    chose its drops by, of the rank kept in every layer a low-rank step factored, and of the block scores a
    pruning step allocated its sparsity by (file name by plot)."""
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
        if report.stats.get("grouping") == "block" and report.stats.get("group_scores") and have_matplotlib():
            block_bars(report.stats["group_scores"], folder / GROUP_SCORES,
                       f"{report.stats['order']}-order loss score per block (higher = pruned less)", "score")
            plots["group_scores"] = GROUP_SCORES
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
