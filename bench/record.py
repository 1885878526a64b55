"""How a benchmark records its run: the machine line, and its rows as bench/results/<name>.json and .md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's name and its widest vector extension, e.g. 'AMD EPYC (AVX2)': the same code runs 2-3x apart in
    speed on CPUs with and without AVX-512 / AMX, so a timing names the kind it ran on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    widest = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                             ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    return f"{name or platform.machine()} ({widest})" if widest else name or platform.machine()


def machine() -> str:
    return f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU"


def write(name: str, meta: dict, rows: list[dict], markdown: list[str]) -> None:
    """bench/results/<name>.json ({meta, rows}) and <name>.md (the markdown lines)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
