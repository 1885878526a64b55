"""Memory a run needs, estimated from the config before any weight is read, against the memory this process may
use; and the CPU cores it may use, which the number of torch threads follows."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidOptionError

GiB = 2 ** 30
CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> int:
    """Bytes this process can still use: the system's available memory, capped by a cgroup (container) limit."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024  # free pages plus reclaimable caches
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def run_memory(parameters: int, hidden: int, vocab: int, n_samples: int, seq_len: int, eval_seq_len: int,
               weight_bytes: int = 4, stored_bytes: int = 4) -> dict[str, int]:
    """Bytes by part: the weights as loaded; the copy the writer builds in the storage dtype; the block inputs and
    outputs the engine keeps for every calibration token, in float32 (2 x n x T x hidden x 4); one evaluation
    window's logits (T x vocab x 4, twice: logits and their log-softmax)."""
    return {"the weights": parameters * weight_bytes, "the copy written to disk": parameters * stored_bytes,
            "calibration activations": 2 * n_samples * seq_len * hidden * 4,
            "evaluation logits": 2 * eval_seq_len * vocab * 4}


def check_memory(parts: dict[str, int], available: int | None = None) -> int:
    """Refuse a run whose parts add up to more than the memory free here, with the estimate and what to lower."""
    needed = sum(parts.values())
    available = available_memory() if available is None else available
    if needed > available:
        detail = ", ".join(f"{name} {size / GiB:.1f}" for name, size in parts.items())
        raise InvalidOptionError(f"this run needs about {needed / GiB:.1f} GiB of memory ({detail} GiB) and "
                                 f"{available / GiB:.1f} GiB are free: lower --n-samples or --seq-len (calibration), "
                                 "--eval-seq-len, load in --dtype bfloat16, or use a larger machine")
    return needed


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup (container) CPU quota, rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def match_threads(log=None) -> int:
    """Lower torch's thread count to the usable cores (more threads than cores only wait on each other); a count
    the user set through OMP_NUM_THREADS is left alone. Returns the count in use."""
    import torch

    cores = usable_cpus()
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > cores:
        if log is not None:
            log(f"torch threads: {cores} (the cores this process may use; was {torch.get_num_threads()})")
        torch.set_num_threads(cores)
    return torch.get_num_threads()
