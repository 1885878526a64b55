"""Text sources -> token windows, for calibration and for evaluation.

A source is `builtin` (public-domain books shipped in the package: calibration and evaluation use different books),
a local `.txt` / `.jsonl` file, a local folder or id that `datasets.load_dataset` understands.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from .errors import CalibrationError

BUILTIN = "builtin"


def _builtin_text(purpose: str) -> str:
    with resources.files("hfcompress").joinpath(f"data/{purpose}.txt.gz").open("rb") as raw:
        return gzip.decompress(raw.read()).decode("utf-8")


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".txt", ".jsonl", ".json")) or source.count("/") > 1


def hub_dataset_id(source: str) -> str | None:
    """`source` when it names a Hub dataset (not `builtin`, a file or a local dataset folder), else None."""
    if source == BUILTIN or looks_like_path(source) or os.path.isdir(os.path.expanduser(source)):
        return None
    return source


def read_text(source: str, purpose: str = "calibration", *, text_field: str = "text", split: str = "train",
              subset: str | None = None) -> str:
    """All text of `source` joined by blank lines. `purpose` picks the built-in book set: calibration or evaluation.
    `split` and `subset` (the dataset configuration, e.g. `wikitext-2-raw-v1`) apply to `datasets` sources."""
    if source == BUILTIN:
        return _builtin_text(purpose)
    path = os.path.expanduser(source)
    if os.path.isfile(path) and path.endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        texts = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise CalibrationError(f"{source} line {number} is not a JSON object ({error}); expected "
                                               "one JSON object per line") from None
                    if not isinstance(record, dict):
                        raise CalibrationError(f"{source} line {number} is not a JSON object; expected one JSON "
                                               "object per line (JSON Lines)")
                    if text_field not in record:
                        raise CalibrationError(f"{source} line {number} has no field {text_field!r}; fields: "
                                               f"{sorted(record)} (choose one with text_field)")
                    texts.append(str(record[text_field]))
        return "\n\n".join(texts)
    if looks_like_path(source) and not os.path.isdir(path):
        raise CalibrationError(f"{purpose} source {source!r} does not exist; give `builtin`, a .txt or .jsonl file, "
                               "or a `datasets` id")
    return _dataset_text(source, text_field, split, subset, purpose)


DATASET_CHARS = 20_000_000  # read at most this much text from a dataset (streamed, never downloaded whole)


def _dataset_text(source: str, text_field: str, split: str, subset: str | None, purpose: str) -> str:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"reading {source!r} needs the `datasets` package: pip install datasets") from None
    try:
        rows = iter(datasets.load_dataset(source, subset, split=split, streaming=True))
        first = next(rows)
    except Exception as error:  # datasets raises many types for "not found" / offline / bad split / empty
        where = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
        raise CalibrationError(f"could not load dataset {source!r} ({where}): {error} (the {purpose} options "
                               "`subset` and `split` choose them)") from None
    if text_field not in first:
        raise CalibrationError(f"dataset {source!r} has no column {text_field!r}; columns: {sorted(first)}")
    texts, size = [], 0
    for row in itertools.chain([first], rows):
        text = str(row[text_field] or "")
        texts.append(text)
        size += len(text)
        if size >= DATASET_CHARS:
            break
    return "\n\n".join(t for t in texts if t)


def token_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens: windows are cut from running text)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def cut_windows(tokens: torch.Tensor, seq_len: int, count: int | None, *, seed: int | None, what: str,
                options: str = "--n-samples or --seq-len") -> torch.Tensor:
    """(count, seq_len) non-overlapping windows of the stream: the first `count` in order when `seed` is None
    (evaluation), else `count` drawn at random without replacement (calibration). `count=None` takes them all."""
    available = tokens.numel() // seq_len
    if available == 0 or (count is not None and count > available):
        raise CalibrationError(f"{what}: the text has {tokens.numel()} tokens, enough for {available} windows of "
                               f"{seq_len}, but {count} were requested; lower {options}, or give more text")
    windows = tokens[: available * seq_len].reshape(available, seq_len)
    if count is None:
        return windows
    if seed is None:
        return windows[:count]
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]
    return windows[order.sort().values]


@dataclass
class CalibrationData:
    """Calibration windows (n_samples, seq_len) and where they came from (recorded in hfcompress.json)."""

    input_ids: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int = 1) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))


def load_calibration(tokenizer: Any, source: str, n_samples: int, seq_len: int, seed: int,
                     text_field: str = "text", split: str = "train", subset: str | None = None) -> CalibrationData:
    """Read `source`, tokenize it and draw `n_samples` random windows of `seq_len` tokens with `seed`."""
    text = read_text(source, "calibration", text_field=text_field, split=split, subset=subset)
    tokens = token_stream(tokenizer, text)
    ids = cut_windows(tokens, seq_len, n_samples, seed=seed, what=f"calibration source {source!r}")
    info = {"source": source, "n_samples": n_samples, "seq_len": seq_len, "seed": seed, "tokens": ids.numel()}
    if subset:
        info["subset"] = subset
    return CalibrationData(ids, info)
