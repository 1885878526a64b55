"""Saved format: an ordinary Hugging Face model folder plus `hfcompress.json`.

Pruned weights are stored dense with zeros in place, so the folder loads with plain `from_pretrained` and no
hfcompress installed. Everything is written into a temporary sibling folder that is renamed into place at the end,
so an interrupted run never leaves a half-written output (and never touches the source model).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DiskFullError, ModelLoadError, OutputExistsError

METADATA_FILE = "hfcompress.json"
FORMAT_VERSION = 1
MAX_SHARD_SIZE = "2GB"


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool, source: str | None = None) -> None:
    """Refuse an output folder that would destroy something: a file, the source model, the working or home folder,
    or a non-empty folder (only an earlier hfcompress output may be replaced, and only with overwrite)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out_dir)!r} exists and is a file")
    if source and os.path.exists(os.path.expanduser(source)):
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise OutputExistsError(f"output folder {str(out_dir)!r} would overlap the source model {source!r}; "
                                    "the source is never written to: pick another --out")
    if out in (Path.cwd(), Path.home(), *Path.cwd().parents):
        raise OutputExistsError(f"output folder {str(out_dir)!r} is the working or home folder (or above them); "
                                "pick a new folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output folder {str(out_dir)!r} exists and is not empty; pick another --out "
                                    "or pass --overwrite")
        if not (out / METADATA_FILE).is_file():
            raise OutputExistsError(f"--overwrite only replaces an earlier hfcompress output, and {str(out_dir)!r} "
                                    f"has no {METADATA_FILE}; pick another --out")


@contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False, source: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`, on failure it is deleted."""
    check_output_folder(out_dir, overwrite, source)
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the output should get ordinary permissions
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in staging.rglob("*"):  # some writers (safetensors) create owner-only files
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(retired / "old")
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def ensure_space(folder: str | os.PathLike, needed_bytes: int) -> None:
    """Refuse to start writing when the disk cannot hold the output (with 5 % headroom)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.05:
        raise DiskFullError(f"not enough disk space in {str(folder)!r}: the output needs about "
                            f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; free some space or pick "
                            "another --out")


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write weights (sharded safetensors), config, generation config and tokenizer."""
    from ..evaluate import weights_bytes

    ensure_space(folder, weights_bytes(model))
    model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


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


def load(path_or_repo: str, **kwargs: Any) -> torch.nn.Module:
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
    metadata = read_metadata(path_or_repo, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
    if metadata is not None and metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{path_or_repo} was written by a newer hfcompress (format "
                             f"{metadata['format_version']}); pip install -U hfcompress")
    return model_class(resolved).from_pretrained(path_or_repo, **kwargs).eval()
