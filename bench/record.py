"""How a benchmark records its run: the machine line, and its rows as bench/results/<name>.json and .md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU"


def write(name: str, meta: dict, rows: list[dict], markdown: list[str]) -> None:
    """bench/results/<name>.json ({meta, rows}) and <name>.md (the markdown lines)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
