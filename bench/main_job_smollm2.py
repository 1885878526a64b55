"""Benchmark: the README's main job end to end, `--compute-dtype float32` vs `auto`, and a second run of it.

    python bench/main_job_smollm2.py            # about 6 minutes on 2 CPU cores

Takes the main command from README.md's quick start as it stands (install excluded) and runs it in fresh processes,
one after the other: (1) with `--compute-dtype float32` and an empty cache (`HFCOMPRESS_CACHE`: the "before"
numbers and the GGUF file's conversion), (2) with `--compute-dtype auto` and another empty cache, (3) `auto` again
with the cache that (2) filled, as a user's second run on the same model would. Wall time per run, the perplexity
before and after, and whether the "before" numbers were read from the cache.
Writes bench/results/main_job_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK, RESULTS = HERE / ".work", HERE / "results"


def main_command() -> list[str]:
    """The `hfcompress compress ...` part of the quick start's first command."""
    readme = (HERE.parent / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    command = shlex.split(first.split("&&")[-1])
    assert command[:2] == ["hfcompress", "compress"], command
    return command


def run(command: list[str], dtype: str, cache: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = command[:command.index("--out")] + ["--out", str(out), "--compute-dtype", dtype]
    env = {**os.environ, "TQDM_DISABLE": "1", "HFCOMPRESS_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hfcompress", *argv[1:]], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"main job failed:\n{done.stderr[-4000:]}")
    metadata = json.loads((out / "hfcompress.json").read_text())
    metrics = metadata["metrics"]
    row = {"compute_dtype": dtype, "seconds": round(seconds, 1),
           "before_cached": metadata["evaluation"]["before_cached"],
           "perplexity_before": metrics["before"]["perplexity"], "perplexity_after": metrics["after"]["perplexity"],
           "speed_notes": [m["speed_note"] for m in metrics.values() if "speed_note" in m]}
    print(row, flush=True)
    return row


def main() -> None:
    import torch

    from hfcompress.loading import compute_dtype, native_bf16
    from hfcompress.resources import usable_cpus

    WORK.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    command = main_command()
    caches = WORK / "main-job-caches"
    shutil.rmtree(caches, ignore_errors=True)
    rows = [run(command, "float32", caches / "a", WORK / "main-job-float32"),
            run(command, "auto", caches / "b", WORK / "main-job-auto"),
            run(command, "auto", caches / "b", WORK / "main-job-auto-again")]
    cpu = torch.device("cpu")
    meta = {"command": shlex.join(command), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores ({usable_cpus()} torch threads), CPU, "
                       f"native bf16: {native_bf16(cpu)} "
                       f"(auto = {str(compute_dtype('auto', cpu)).removeprefix('torch.')})",
            "torch": torch.__version__}
    (RESULTS / "main_job_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    first32, first, second = rows
    lines = [f"`{meta['command']}` end to end (install excluded), {meta['machine']}, {meta['date']}.", "",
             "| run | compute dtype | \"before\" numbers | seconds | perplexity before | after |",
             "|---|---|---|---:|---:|---:|"]
    for label, r in zip(("first", "first", "second"), rows, strict=True):
        lines.append(f"| {label} | {r['compute_dtype']} | {'cached' if r['before_cached'] else 'measured'} | "
                     f"{r['seconds']:.0f} | {r['perplexity_before']:.2f} | {r['perplexity_after']:.2f} |")
    lines += ["", f"`auto` / `float32`, first runs: {first['seconds'] / first32['seconds']:.2f}x the wall time. "
                  f"Second run / first run (`auto`): {second['seconds'] / first['seconds']:.2f}x."]
    notes = sorted({note for r in rows for note in r["speed_notes"]})
    if notes:
        lines += ["", "Tokens/s left out of some tables: " + "; ".join(notes) + "."]
    (RESULTS / "main_job_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
