"""ONNX export of a model folder (any hfcompress output, or a plain checkpoint), validated before it is kept.

    export_onnx("out/smollm2-rtn", "out/smollm2-rtn-onnx")

The graph is traced by transformers' own exporter (`transformers.exporters.OnnxExporter`, torch.export + the
torch.onnx dynamo exporter); hfcompress then edits it where the structure map says so: quantized layers become
ONNX Runtime's `MatMulNBits` from the saved integers and scales, and a tied head reads the embedding table instead of
a second copy. Pruned and block-dropped models are stock checkpoints and export as they are; dropped attention/MLP
modules and low-rank pairs export through their modules (plain ops, no custom operators).

Validation is part of the export, on the written files, in ONNX Runtime against PyTorch (see `validate`); a model
that fails it leaves no output folder.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import shutil
from typing import Any, Callable

from ..errors import HfCompressError, UnsupportedModelError

FAMILIES = ("causal-lm", "encoder")
ONNX_FILE = "model.onnx"
PACKAGES = {"onnx": "onnx", "onnx_ir": "onnx-ir", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}


class ExportError(HfCompressError):
    pass


def check_packages() -> None:
    missing = [package for module, package in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if importlib.util.find_spec("transformers.exporters") is None:  # transformers' ONNX exporter, 5.25 tested
        missing.append("transformers>=5.25")
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'hfcompress[onnx]'")


def check_family(family: str, source: str) -> None:
    if family not in FAMILIES:
        raise UnsupportedModelError(f"ONNX export supports {', '.join(FAMILIES)} models; {source!r} is a {family} "
                                    "model")


def check_export(source: str, out: str, overwrite: bool = False) -> Any:
    """Everything that can fail before tracing: packages, the output folder, the source and its architecture.
    Returns the resolved source."""
    from ..formats.folders import check_output_folder
    from ..loading import resolve

    check_packages()
    check_output_folder(out, overwrite, source)
    resolved = resolve(source)
    check_family(resolved.family, source)
    if resolved.kind == "gguf":
        raise UnsupportedModelError(f"{source!r} is a GGUF file: compress or convert it to a model folder first "
                                    "(any hfcompress output is one), then export that folder")
    if resolved.kind == "hub":  # the saved scales are read from the files themselves
        from huggingface_hub import snapshot_download

        resolved.location = snapshot_download(source, revision=resolved.revision, token=resolved.token)
    return resolved


def load_for_export(resolved: Any, metadata: dict[str, Any] | None) -> tuple[Any, dict[str, tuple]]:
    """The model in float32 with each quantized layer holding w = q * s from the saved integers and scales, and for
    each such layer what `quantize_matmuls` needs."""
    import torch

    from ..formats import structure_of
    from ..formats.compressed_tensors import load_unpacked

    quantized = structure_of(metadata).of_kind("quantized") if metadata else {}
    model, integers = load_unpacked(resolved, quantized, torch.float32)
    modules = dict(model.named_modules())
    layers = {name: (modules[name].weight.detach().numpy(), q.numpy(), scale.numpy(), quantized[name]["bits"],
                     quantized[name]["group_size"]) for name, (q, scale) in integers.items()}
    return model, layers


def export_onnx(source: str, out: str, *, overwrite: bool = False, device: str = "cpu", speed: bool = True,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export `source` (a folder or Hub repo) to an ONNX folder `out`, validate it in ONNX Runtime and write its card;
    return the report recorded in the folder's hfcompress.json under `onnx`."""
    resolved = check_export(source, out, overwrite)  # before anything heavy is imported or loaded
    import onnx_ir
    import torch

    from ..formats import read_metadata, write_metadata
    from ..formats.folders import staged_folder
    from ..loading import load_tokenizer
    from ..metadata import library_version
    from .card import render_onnx_card
    from .graphs import OnnxRunner, trace
    from .nbits import quantize_matmuls, tie_head
    from .validate import ValidationError, measure_speed, validate

    family, metadata = resolved.family, read_metadata(resolved.location)
    tokenizer = load_tokenizer(resolved)  # before the heavy work: a folder without one fails here
    log(f"loading {source}")
    model, layers = load_for_export(resolved, metadata)
    log("tracing the graph (transformers' ONNX exporter)")
    graph = trace(model, family, torch.arange(1, 9).unsqueeze(0))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and tie_head(graph)
    try:
        kernels = quantize_matmuls(graph, layers)
    except ValueError as error:
        raise ExportError(f"cannot write native quantized MatMuls: {error}") from None
    with staged_folder(out, overwrite, source) as staging:
        onnx_ir.save(graph, str(staging / ONNX_FILE), external_data=f"{ONNX_FILE}.data")
        model.config.save_pretrained(staging)
        if family == "causal-lm" and model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        runner = OnnxRunner(staging / ONNX_FILE, family, device)
        log("validating in ONNX Runtime against PyTorch")
        try:
            validation = validate(model, runner, family)
        except ValidationError as error:
            raise ExportError(f"the exported graph failed validation, so nothing was written: {error}") from None
        report = {"family": family, "file": ONNX_FILE, "tied_head": tied, "kernels": kernels,
                  "validation": validation,
                  "size_bytes": sum(p.stat().st_size for p in staging.glob(f"{ONNX_FILE}*")),
                  "providers": runner.session.get_providers(), "inputs": list(runner.inputs),
                  "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                  "date": datetime.date.today().isoformat(),
                  "libraries": {name: library_version(name) for name in ("onnxruntime", "onnx", "onnxscript",
                                                                          "transformers", "torch")}}
        if speed:
            log("measuring tokens/s (ONNX Runtime and PyTorch, batch 1)")
            report["speed"] = measure_speed(model, runner, family)
        exported = {**(metadata or {"source": source, "family": family}), "onnx": report,
                    "loading": {"format": "onnx", "packages": ["onnxruntime"], "trust_remote_code": False}}
        write_metadata(staging, exported)
        (staging / "README.md").write_text(render_onnx_card(exported), encoding="utf-8")
        for plot in (metadata or {}).get("plots", {}).values():  # the card shows the source's plots too
            if os.path.isfile(os.path.join(resolved.location, plot)):
                shutil.copy(os.path.join(resolved.location, plot), staging / plot)
    log(json.dumps(report["validation"]))
    return report
