"""A GGUF file read once: later runs on the same file read its conversion instead of parsing and dequantizing it.

Reading SmolLM2-135M's GGUF costs about 27 s of every run on a 2-core CPU (config 4 s, tokenizer 5 s, licence 4 s,
dequantized weights 14 s); the same model as a Hugging Face folder loads in under a second. The conversion lives in
`$HFCOMPRESS_CACHE/gguf/<SHA-256 of the file>/` (see `cache.cache_dir`), one Hugging Face folder per part:

    tokenizer/   the tokenizer as `save_pretrained` writes it, and the config read from the GGUF
    model/       the dequantized weights in float32 (bit-identical to a fresh dequantization) and the same config;
                 kept only for models up to WEIGHTS_LIMIT bytes, and only with room to spare on the disk
    license.json the file's `general.license`

Each part appears whole or not at all (written beside it, then renamed). A cache that cannot be written (read-only or
full disk) only means the GGUF is read again next time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cache import cache_dir, weights_digest, write_entry

WEIGHTS_LIMIT = 2 << 30  # bytes of float32 weights; larger models are dequantized on every run rather than stored


def conversion_folder(location: str, gguf_file: str) -> Path:
    return cache_dir() / "gguf" / weights_digest(location, gguf_file)


def cached_part(folder: str | Path | None, part: str) -> Path | None:
    """`folder/part` when a complete conversion part is there (for `model` and `tokenizer`), else None."""
    path = Path(folder) / part if folder else None
    return path if path is not None and (path / "config.json").is_file() else None


def store_part(folder: str | Path, part: str, write: Callable[[Path], None]) -> bool:
    """Write `folder/part` through `write(temporary_folder)` and rename it into place; False when it could not be."""
    target = Path(folder) / part
    temporary = target.with_name(f".{part}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        write(temporary)
        os.replace(temporary, target)
        return True
    except OSError:  # includes a target another process has just written
        shutil.rmtree(temporary, ignore_errors=True)
        return False


def store_tokenizer(folder: str | Path, tokenizer: Any, config: Any) -> bool:
    def write(path: Path) -> None:
        tokenizer.save_pretrained(path)
        config.save_pretrained(path)

    return store_part(folder, "tokenizer", write)


def store_weights(folder: str | Path, model: Any, config: Any) -> bool:
    """Keep the dequantized weights when they are float32 (the exact dequantized values), at most WEIGHTS_LIMIT
    bytes, and the disk keeps twice that free afterwards. The config written is the one read from the GGUF, so the
    next run resolves the same config (no `architectures`, no `dtype`) as this one."""
    import torch

    def storage_key(t: torch.Tensor) -> tuple:  # tied weights are one tensor under two names: counted once
        return (t.data_ptr(), t.dtype, t.shape) if t.data_ptr() else (id(t),)

    tensors = list({storage_key(t): t for t in model.state_dict().values()}.values())
    size = sum(t.numel() * t.element_size() for t in tensors)
    if any(t.dtype != torch.float32 for t in tensors if t.is_floating_point()) or size > WEIGHTS_LIMIT:
        return False
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < 3 * size:
            return False
    except OSError:
        return False

    def write(path: Path) -> None:
        model.save_pretrained(path)
        config.save_pretrained(path)  # replaces the model's own config.json

    return store_part(folder, "model", write)


def gguf_license(location: str, gguf_file: str, folder: str | Path | None) -> str | None:
    """The GGUF file's `general.license` (None when it has none), read from the conversion when it is there."""
    kept = Path(folder) / "license.json" if folder else None
    if kept is not None:
        try:
            return json.loads(kept.read_text(encoding="utf-8"))["license"]
        except (OSError, ValueError, KeyError):
            pass
    import gguf

    field_ = gguf.GGUFReader(os.path.join(location, gguf_file)).fields.get("general.license")
    license_ = field_.contents() if field_ is not None else None
    if kept:
        try:
            write_entry(kept, json.dumps({"license": license_}))
        except OSError:
            pass
    return license_
