"""Text sources -> token windows, for calibration and for evaluation; image-text sources -> processor batches.

A source is `builtin` (public-domain books shipped in the package: calibration and evaluation use different books),
a local `.txt` / `.jsonl` file, a local folder or id that `datasets.load_dataset` understands. Vision-language models
calibrate on (image, caption) pairs: a local image folder (images beside a `metadata.jsonl` whose rows name the
`file_name` and hold the caption, the `datasets` imagefolder layout) or a `datasets` id with an image column.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable

import torch

from .errors import CalibrationError
from .recipe import looks_like_path, missing_source

BUILTIN = "builtin"


def _builtin_text(purpose: str) -> str:
    with resources.files("hfcompress").joinpath(f"data/{purpose}.txt.gz").open("rb") as raw:
        return gzip.decompress(raw.read()).decode("utf-8")


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
        raise missing_source(source, purpose)
    return _dataset_text(source, text_field, split, subset, purpose)


DATASET_CHARS = 20_000_000  # read at most this much text from a dataset (streamed, never downloaded whole)


def _dataset_rows(source: str, split: str, subset: str | None, purpose: str) -> tuple[dict, Any]:
    """(first row, the streamed dataset) of a `datasets` source: streamed, never downloaded whole."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"reading {source!r} needs the `datasets` package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(source, subset, split=split, streaming=True)
        first = next(iter(dataset))
    except Exception as error:  # datasets raises many types for "not found" / offline / bad split / empty
        where = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
        raise CalibrationError(f"could not load dataset {source!r} ({where}): {error} (the {purpose} options "
                               "`subset` and `split` choose them)") from None
    return first, dataset


def _check_columns(source: str, first: dict, *fields: str) -> None:
    for name in fields:
        if name not in first:
            raise CalibrationError(f"dataset {source!r} has no column {name!r}; columns: {sorted(first)}")


def _dataset_text(source: str, text_field: str, split: str, subset: str | None, purpose: str) -> str:
    first, dataset = _dataset_rows(source, split, subset, purpose)
    _check_columns(source, first, text_field)
    texts, size = [], 0
    for row in dataset:
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
    """Calibration windows and where they came from (recorded in hfcompress.json).

    Text: `input_ids` (n_samples, seq_len) windows cut from running text. Image-text: `input_ids` (n_samples,
    longest) are the prompts padded to the longest, and `extra` holds the processor's other outputs per sample:
    `attention_mask` (n_samples, longest), `pixel_values` (n_samples, 3, H, W), ...
    """

    input_ids: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def batches(self, batch_size: int = 1) -> list[torch.Tensor | dict[str, torch.Tensor]]:
        """The samples in batches: token tensors (batch, seq_len) for text, processor dicts for image-text."""
        if not self.extra:
            return list(self.input_ids.split(batch_size))
        count = len(self.input_ids)
        return [self.batch(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]

    def batch(self, rows: Iterable[int]) -> dict[str, torch.Tensor]:
        """The image-text samples `rows` as one batch, without the padding columns none of them uses (a single
        sample then carries no padding: its statistics count only real tokens)."""
        rows = list(rows)
        tensors = {"input_ids": self.input_ids[rows], **{k: v[rows] for k, v in self.extra.items()}}
        used = tensors["attention_mask"].bool().any(dim=0)                       # (longest,)
        tokens = tensors["input_ids"].shape
        return {k: v[:, used] if v.shape[:2] == tokens else v for k, v in tensors.items()}


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


def holds_text_only(source: str) -> bool:
    """Whether `source` can give text only (`builtin`, a .txt or .jsonl file): no image-caption pairs."""
    return source == BUILTIN or (os.path.isfile(os.path.expanduser(source)) and source.endswith((".txt", ".jsonl")))


def check_image_text_source(source: str) -> None:
    """Refuse a source that can give text only for an image-text model."""
    if holds_text_only(source):
        raise CalibrationError(f"calibration source {source!r} holds text only; an image-text model calibrates on "
                               "image-caption pairs: give --calib a local image folder with a metadata.jsonl "
                               "(`file_name` and a caption field) or a `datasets` id with image and text columns "
                               "(--image-field, --text-field)")


SHUFFLE_ROWS = 4  # an image-text draw shuffles a buffer of this many rows per requested pair (streamed)


def shuffled_pairs(source: str, n_samples: int, seed: int, text_field: str, image_field: str, split: str,
                   subset: str | None, purpose: str = "calibration") -> Any:
    """The (image, caption) rows of `source` as the streamed shuffle that draws `n_samples` pairs with `seed` sees
    them (a buffer of SHUFFLE_ROWS rows per pair): calibration takes the first `n_samples`, and a dual encoder's
    evaluation the rows after them, which calibration never reads."""
    first, dataset = _dataset_rows(source, split, subset, purpose)
    _check_columns(source, first, image_field, text_field)
    if not hasattr(first[image_field], "convert"):
        raise CalibrationError(f"column {image_field!r} of {source!r} holds {type(first[image_field]).__name__}, "
                               "not images; name the image column with image_field")
    return dataset.shuffle(seed=seed, buffer_size=SHUFFLE_ROWS * n_samples)


def encode_pairs(processor: Any, rows: list[dict], seq_len: int, text_field: str,
                 image_field: str) -> dict[str, torch.Tensor]:
    """(image, caption) rows through the model's processor: `input_ids`, `attention_mask`, `pixel_values`, ... A
    processor with an `image_token` (LLaVA-style models: the image's features replace those tokens) gets the prompt
    "<image>\ncaption"; a dual-encoder's (CLIP) gets the caption alone, cut to `seq_len` tokens."""
    image_token = getattr(processor, "image_token", None)
    captions = [str(row[text_field] or "") for row in rows]
    prompts = [f"{image_token}\n{caption}" for caption in captions] if image_token else captions
    # image placeholder tokens must never be cut off; a dual encoder's captions are cut to seq_len
    cut = {"truncation": not image_token, "max_length": None if image_token else seq_len}
    encoded = dict(processor(text=prompts, images=[row[image_field].convert("RGB") for row in rows],
                             padding=True, return_tensors="pt", **cut))
    encoded.setdefault("attention_mask", torch.ones_like(encoded["input_ids"]))
    return encoded


def check_processor(processor: Any) -> None:
    """Refuse a model whose repo has no image processor: its images could not be prepared."""
    if processor is None or not hasattr(processor, "image_processor"):
        raise CalibrationError("this model's repo has no image processor (preprocessor_config.json), so its images "
                               "cannot be prepared; copy the processor files of the model it came from into it")


def load_image_text_calibration(processor: Any, source: str, n_samples: int, seq_len: int, seed: int,
                                text_field: str = "text", image_field: str = "image", split: str = "train",
                                subset: str | None = None) -> CalibrationData:
    """`n_samples` (image, caption) pairs of `source`, drawn with `seed` from a streamed shuffle (`shuffled_pairs`),
    run through the model's `processor` (`encode_pairs`)."""
    check_processor(processor)
    check_image_text_source(source)
    rows = list(shuffled_pairs(source, n_samples, seed, text_field, image_field, split, subset).take(n_samples))
    if len(rows) < n_samples:
        raise CalibrationError(f"calibration source {source!r} has {len(rows)} image-caption pairs but "
                               f"{n_samples} were requested; lower --n-samples, or give more pairs")
    encoded = encode_pairs(processor, rows, seq_len, text_field, image_field)
    input_ids = encoded.pop("input_ids")
    info = {"source": source, "n_samples": n_samples, "image_text_pairs": n_samples, "seed": seed,
            "text_field": text_field, "image_field": image_field, "tokens": int(encoded["attention_mask"].sum())}
    if subset:
        info["subset"] = subset
    return CalibrationData(input_ids, info, encoded)
