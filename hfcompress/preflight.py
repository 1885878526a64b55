"""Everything checked before any weight is read: the recipe, the source, each step on a weightless copy of the model,
the push target, the defaults that depend on the device, and the memory the run needs. `compress` starts with it;
`hfcompress compress --dry-run` prints it and stops."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .calibration import BUILTIN, check_image_text_source
from .errors import InvalidOptionError, UnsupportedModelError, choices
from .evaluate import measures_pairs
from .formats import read_metadata, structure_of, writer_name
from .formats.compressed_tensors import kernel_warning
from .hub import check_push_target, check_token
from .loading import ResolvedModel, base_architectures, model_skeleton, pick_device, resolve, torch_dtype
from .options import options_text
from .recipe import CalibrationSpec, Recipe
from .registry import Report, calibrating_steps, get_method
from .resources import GiB, check_memory, run_memory
from .sequential import find_linears, named_blocks, weight_matrix
from .structure import Structure


@dataclass
class Preflight:
    """A recipe checked against its model, with the device-dependent defaults filled in."""

    recipe: Recipe
    device: torch.device
    resolved: ResolvedModel
    source: Structure      # the source model's own structure map (an earlier hfcompress output has one)
    planned: Structure     # the map after every step, kinds only
    memory: dict[str, int]  # bytes by part, see `resources.run_memory`


def preflight(recipe: Recipe, token: str | None = None, log: Callable[[str], None] = print) -> Preflight:
    """Check `recipe` without reading a weight; raise the first problem as an HfCompressError."""
    recipe.validate()
    device = pick_device(recipe.model.device)
    resolved = resolve(recipe.model.id, revision=recipe.model.revision,
                       trust_remote_code=recipe.model.trust_remote_code, token=token,
                       allow_pickle=recipe.model.allow_pickle)
    source = source_structure(resolved)  # read once: planning and the run both start from it
    planned = plan(resolved, recipe, source)
    if resolved.family == "vision-language" and calibrating_steps(recipe.steps):
        check_image_text_source(recipe.calibration.source)
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
    for note in calibration_notes(recipe, resolved):
        log(f"note: {note}")
    memory = memory_parts(resolved, recipe, device)
    check_memory(memory)
    return Preflight(recipe, device, resolved, source, planned, memory)


def calibration_notes(recipe: Recipe, resolved: ResolvedModel) -> list[str]:
    """What a run with these calibration windows gets less of than its options suggest (not errors: it runs)."""
    notes, calibration = [], recipe.calibration
    for step in recipe.steps:  # ecoflap's stage 1 reads the first score_windows windows: say when there are fewer
        wanted = getattr(step, "score_windows", 0)
        if wanted > calibration.n_samples:
            notes.append(f"{type(step).method} scores on the {calibration.n_samples} calibration windows there are "
                         f"(score_windows {wanted}; --n-samples {calibration.n_samples})")
    # X^T X sums text tokens: a vision-language model's image patches would not be counted here
    hessian_steps = [step for step in recipe.steps if get_method(type(step).method).uses_hessian(step)]
    if hessian_steps and resolved.family in ("causal-lm", "encoder"):
        tokens = calibration.n_samples * calibration.seq_len
        blocks = list(named_blocks(model_skeleton(resolved)))
        inputs = {}                                            # method -> (widest input it sees, its layer)
        for step in hessian_steps:
            for prefix, block in blocks:
                for name, layer in find_linears(block, getattr(step, "targets", ()), prefix=prefix).items():
                    width = weight_matrix(layer).shape[1]
                    if width > inputs.get(type(step).method, (0, ""))[0]:
                        inputs[type(step).method] = (width, name.removeprefix(prefix + "."))
        short = {method: found for method, found in inputs.items() if tokens < 2 * found[0]}
        if short:
            width, layer = max(short.values(), key=lambda found: found[0])
            fit = ("fewer tokens than inputs, so X^T X is singular and fits those tokens rather than the text"
                   if tokens < width else "under twice as many tokens as inputs, so X^T X fits those tokens more "
                                          "than the text")
            notes.append(f"{' and '.join(short)} solve{'s' if len(short) == 1 else ''} with each layer's input "
                         f"Hessian X^T X, here from {tokens} calibration tokens for inputs up to {width} wide "
                         f"({layer}): {fit}; give at least {2 * width} (--n-samples x --seq-len; in a recipe "
                         "calibration n_samples x seq_len)")
    return notes


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
    if any(spec.check_ref for spec in specs):
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


def calibration_line(calibration: CalibrationSpec, family: str) -> str:
    """What the run calibrates on, as the log and `--dry-run` say it."""
    what = (f"{calibration.n_samples} image-caption pairs" if family == "vision-language"
            else f"{calibration.n_samples} x {calibration.seq_len} tokens")
    return f"calibration: {what} from {calibration.source}"


def memory_parts(resolved: ResolvedModel, recipe: Recipe, device: torch.device) -> dict[str, int]:
    """What the run will hold in CPU memory, by part (see `resources.run_memory`)."""
    text = resolved.config.get_text_config()
    calibrates = calibrating_steps(recipe.steps) > 0
    loaded = torch_dtype(recipe.model.dtype, device)
    weight_bytes = loaded.itemsize if isinstance(loaded, torch.dtype) else (resolved.dtype or torch.float32).itemsize
    evaluates = recipe.evaluation.enabled and resolved.family == "causal-lm"
    return run_memory(sum(p.numel() for p in model_skeleton(resolved).parameters()),
                      getattr(text, "hidden_size", 0) or 0, getattr(text, "vocab_size", 0) or 0,
                      recipe.calibration.n_samples if calibrates else 0, recipe.calibration.seq_len,
                      recipe.evaluation.seq_len if evaluates else 0, weight_bytes,
                      (resolved.dtype or torch.float32).itemsize)


def describe(checked: Preflight) -> str:
    """What a run of `checked` would do, for `--dry-run`: the model, each step and what it changes, the data, the
    output, the memory by part."""
    recipe, resolved = checked.recipe, checked.resolved
    c, ev = recipe.calibration, recipe.evaluation
    calibrates = calibrating_steps(recipe.steps) > 0
    parameters = sum(p.numel() for p in model_skeleton(resolved).parameters())
    lines = [f"model: {recipe.model.id} ({resolved.family}, {parameters / 1e6:.1f} M parameters), on {checked.device}",
             *(f"step {i + 1}: {get_method(type(step).method).name} ({options_text(step)})"
               for i, step in enumerate(recipe.steps)),
             "changes: " + (", ".join(f"{len(checked.planned.of_kind(kind))} modules {kind}"
                                      for kind in sorted(checked.planned.kinds)) or "none"),
             calibration_line(c, resolved.family) if calibrates else "calibration: none needed",
             evaluation_line(recipe, resolved),
             f"output: {recipe.output.dir or '(not saved)'}" + (f", pushed to {recipe.output.push_to}"
                                                              if recipe.output.push_to else "")
             + (f", exported to ONNX in {recipe.export.onnx}" if recipe.export.onnx else ""),
             f"memory: about {sum(checked.memory.values()) / GiB:.2f} GiB ("
             + ", ".join(f"{name} {size / GiB:.2f}" for name, size in checked.memory.items()) + ")"]
    # time: forward passes only (2 FLOPs per parameter and token), two over the calibration tokens per calibrating
    # step, one over the evaluation tokens before and after, at the matmul speed measured here just now
    tokens = 2 * c.n_samples * c.seq_len * calibrating_steps(recipe.steps)
    tokens += 2 * (ev.n_windows or 32) * ev.seq_len if ev.enabled and resolved.family == "causal-lm" else 0
    flops = matmul_speed(checked.device)
    lines.append(f"time: at least {2 * parameters * tokens / flops / 60:.1f} min of forward passes at "
                 f"{flops / 1e9:.0f} GFLOP/s measured here (methods add their own work; loading and saving too)")
    return "\n".join(lines)


def pairs_origin(recipe: Recipe) -> dict[str, Any]:
    """Where a dual encoder's evaluation pairs come from: --eval-source when it is not `builtin`, else the --calib
    source, past the pairs that calibration draws from it when the run calibrates (`after_calibration_pairs`)."""
    c, ev = recipe.calibration, recipe.evaluation
    if ev.source != BUILTIN:
        return {"source": ev.source, "after_calibration_pairs": 0}
    return {"source": c.source, "after_calibration_pairs": c.n_samples if calibrating_steps(recipe.steps) else 0}


def evaluation_line(recipe: Recipe, resolved: ResolvedModel) -> str:
    """What the run measures the model on, as `--dry-run` says it."""
    ev = recipe.evaluation
    if not ev.enabled:
        return "evaluation: off"
    if measures_pairs(resolved.family, base_architectures(resolved.config)):
        origin = pairs_origin(recipe)
        drawn = origin["after_calibration_pairs"]
        after = f" after the {drawn} drawn for calibration" if drawn else ""
        pairs = f"{ev.n_windows or 'all'} image-caption pairs"
        return f"evaluation: {pairs} of {origin['source']}{after}, before and after"
    return f"evaluation: {ev.n_windows} x {ev.seq_len} tokens of {ev.source}, before and after"


def matmul_speed(device: torch.device, size: int = 1024) -> float:
    """float32 FLOP/s of a (size x size) matmul on `device`, best of a few."""
    import time

    a = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
