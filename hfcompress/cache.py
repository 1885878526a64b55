"""The "before" numbers of a model, kept between runs: a second run on the same weights, with the same evaluation
windows and settings on the same machine, reads them instead of measuring again.

The key is a SHA-256 over the weights' content (for Hub downloads, the blob names of the Hub cache, which are the
files' own SHA-256; for local files, their bytes), the token windows themselves, every setting `measure` takes, the
machine and the hfcompress version. Entries live in `$HFCOMPRESS_CACHE` (default `~/.cache/hfcompress`) under
`before/`, one JSON file each.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hfcompress"
    return Path(os.environ.get("HFCOMPRESS_CACHE") or default)


def weights_digest(location: str, gguf_file: str | None = None) -> str:
    """SHA-256 naming the weight files' content (the Hub cache names each downloaded blob by its SHA-256 already)."""
    folder = Path(location)
    files = [folder / gguf_file] if gguf_file else sorted(p for p in folder.iterdir()
                                                          if p.name.endswith(WEIGHT_SUFFIXES))
    digest = hashlib.sha256()
    for path in files:
        target = path.resolve()
        digest.update(path.name.encode())
        if path.is_symlink() and target.parent.name == "blobs" and len(target.name) == 64:
            digest.update(target.name.encode())  # the Hub's own SHA-256 of the file
            continue
        stat = target.stat()
        digest.update(file_sha256(str(target), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes, read once per process for a given size and modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def measurement_key(weights: str, windows: Any, settings: dict[str, Any]) -> str:
    """Key of one measurement: weights digest, the windows' token ids (or the evaluation pairs' processor outputs),
    the settings, machine and version."""
    from . import __version__

    digest = hashlib.sha256(weights.encode())
    for tensor in (windows.values() if isinstance(windows, dict) else [] if windows is None else [windows]):
        digest.update(tensor.cpu().numpy().tobytes())   # token windows, or a dual encoder's pairs
    machine = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "version": __version__}
    digest.update(json.dumps({**settings, **machine}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cached_measurement(key: str, measure: Callable[[], dict[str, Any]],
                       keep: Callable[[dict[str, Any]], bool] = lambda metrics: True) -> tuple[dict[str, Any], bool]:
    """(metrics, whether they came from the cache): read the entry `key`, or measure and store it, unless
    `keep(metrics)` is false (a measurement that says more of the moment than of the model: measured again)."""
    path = cache_dir() / "before" / f"{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")), True
    except (OSError, ValueError):
        pass
    metrics = measure()
    if not keep(metrics):
        return metrics, False
    try:
        write_entry(path, json.dumps(metrics))
    except OSError:
        pass  # a read-only home: measure every time
    return metrics, False


def write_entry(path: Path, text: str) -> None:
    """Write a cache file whole or not at all: readers never see half an entry (OSError is the caller's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
