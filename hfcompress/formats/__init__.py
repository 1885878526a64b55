"""Saved format: an ordinary Hugging Face model folder plus `hfcompress.json`, written by the writer for its changes.

hfcompress.json (format version 2) holds the tool and library versions, the recipe, calibration and evaluation
details, the measured metrics, what loading needs, and the structure map (`hfcompress.structure`): module name in
the saved model -> kind of change. The writer is chosen from that map, never from method names:

    dense.py               nothing but zeros in dense weights: a standard checkpoint of the base architecture;
                           plain `from_pretrained`, no extra package
    compressed_tensors.py  quantized layers: packed integers + per-group scales + `quantization_config`;
                           plain `from_pretrained` once `pip install compressed-tensors`

    remote_code.py         low-rank pairs, skipped attention / MLP sub-layers: the base config with a model type of
                           its own + ONE architecture-agnostic modeling file; `trust_remote_code=True`, or
                           `hfcompress.load`, which runs no code from the repo. Quantized layers among them are
                           packed as compressed-tensors stores them (and loading needs that package too)

`load` reverses every writer, and outputs of format version 1 (dense, written before the map existed) keep
loading.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..structure import Structure
from .folders import METADATA_FILE, check_output_folder, ensure_space, staged_folder

__all__ = ["METADATA_FILE", "FORMAT_VERSION", "check_output_folder", "ensure_space", "staged_folder", "load",
           "read_metadata", "save_model", "structure_of", "write_metadata", "writer_name"]

FORMAT_VERSION = 2


def writer_name(structure: Structure) -> str:
    """The writer that stores this map: `remote-code` for low-rank pairs and skipped sub-layers (with any quantized
    layers packed), `compressed-tensors` when a layer is quantized, else `dense` (removed blocks need none: the
    model is a smaller stock one)."""
    if structure.replacing:  # quantized layers in it are packed as compressed-tensors stores them
        return "remote-code"
    return "compressed-tensors" if "quantized" in structure.kinds else "dense"


def save_model(model: Any, tokenizer: Any, folder: Path, structure: Structure, dtype: Any) -> dict[str, Any]:
    """Write weights (sharded safetensors, floating tensors in `dtype`), config, generation config and tokenizer
    with the writer the map calls for; return what loading needs (`format`, `packages`, `trust_remote_code`)."""
    from ..evaluate import stored_bytes
    from . import compressed_tensors, dense, remote_code

    writer = {"dense": dense, "compressed-tensors": compressed_tensors,
              "remote-code": remote_code}[writer_name(structure)]
    ensure_space(folder, stored_bytes(model, structure, dtype))
    needs = writer.save(model, Path(folder), structure, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return needs


def write_metadata(folder: str | os.PathLike, metadata: dict[str, Any]) -> None:
    with open(Path(folder) / METADATA_FILE, "w", encoding="utf-8") as handle:
        json.dump({"format_version": FORMAT_VERSION, **metadata}, handle, indent=2)
        handle.write("\n")


def read_metadata(path_or_repo: str, **hub_kwargs: Any) -> dict[str, Any] | None:
    """hfcompress.json of a local folder or Hub repo, or None when the model was not made by hfcompress."""
    if os.path.isdir(path_or_repo):
        path = Path(path_or_repo) / METADATA_FILE
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(path_or_repo, METADATA_FILE, **hub_kwargs)
        except EntryNotFoundError:
            return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def structure_of(metadata: dict[str, Any]) -> Structure:
    """The structure map of an hfcompress.json of any format version."""
    if "structure" in metadata:
        return Structure.from_dict(metadata["structure"])
    return Structure.from_steps(metadata.get("steps", []))  # format version 1: sparse entries in each step


def loading_needs(metadata: dict[str, Any]) -> dict[str, Any]:
    """What loading needs, as recorded (format version 1 outputs are dense)."""
    return {"format": "dense", "packages": [], "trust_remote_code": False, **metadata.get("loading", {})}


def check_packages(packages: list[str], where: str) -> None:
    """Fail with the pip command when a package that loading needs is missing or too old."""
    from packaging.requirements import Requirement

    for requirement in map(Requirement, packages):
        module = requirement.name.replace("-", "_")
        installed = None
        if importlib.util.find_spec(module) is not None:
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:  # importable without metadata: take it as it is
                continue
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            found = f"found {installed}" if installed else "it is not installed"
            raise ModelLoadError(f"{where} needs {requirement} ({found}): pip install '{requirement}'")


def load(path_or_repo: str, **kwargs: Any) -> Any:
    """Load any hfcompress output (local folder or Hub repo) as a ready-to-use model.

    Args:
        path_or_repo: output folder or Hub repo id.
        kwargs: passed to `from_pretrained` (e.g. `dtype`, `device_map`, `revision`, `token`).
    """
    from ..loading import model_class, resolve

    path_or_repo = os.fspath(path_or_repo)
    # resolve() turns a missing folder, an unknown or gated repo, or no network into one clear ModelLoadError
    resolved = resolve(path_or_repo, revision=kwargs.get("revision"), token=kwargs.get("token"),
                       trust_remote_code=kwargs.get("trust_remote_code", False))
    metadata = read_metadata(path_or_repo, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs}) or {}
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{path_or_repo} was written by a newer hfcompress (format "
                             f"{metadata['format_version']}); pip install -U hfcompress")
    if loading_needs(metadata)["format"] == "onnx":
        raise ModelLoadError(f"{path_or_repo} is an ONNX export: run model.onnx with onnxruntime (its README shows "
                             "how), or load the folder it was exported from")
    check_packages(loading_needs(metadata)["packages"], path_or_repo)
    return model_class(resolved).from_pretrained(path_or_repo, **kwargs).eval()
