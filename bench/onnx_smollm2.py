"""Benchmark: ONNX export of SmolLM2-135M, dense and compressed, in ONNX Runtime vs PyTorch on this CPU.

    python bench/onnx_smollm2.py [--kinds dense,wanda,block-drop,attention-drop,lord,rtn4] [--n-samples 16]

For each kind the model is compressed with `hfcompress.compress` (no evaluation), exported with
`hfcompress.export.export_onnx` (which validates the graph in ONNX Runtime against PyTorch before writing it), and
the export's own measurements are recorded: ONNX file size, the largest logit difference and its tolerance, greedy
tokens agreeing, and prefill (128-token prompt) / decode (32 tokens after a 32-token prompt) tokens/s of ONNX Runtime
and PyTorch timed by the same greedy loop with a KV cache, batch 1, all threads of this machine. Writes
bench/results/onnx_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time

import torch
from sparsity_vs_llmcompressor import RESULTS, WORK, smollm2_folder

import hfcompress
from hfcompress.export import export_onnx

KINDS = {
    "dense": [],
    "wanda": [{"method": "wanda", "sparsity": 0.5}],
    "block-drop": [{"method": "layer_drop", "drop": "block", "n": 6}],
    "attention-drop": [{"method": "layer_drop", "drop": "attention", "n": 8}],
    "lord": [{"method": "lord", "mode": "svd", "reduction": 0.1}],
    "rtn4": [{"method": "rtn", "bits": 4, "group_size": 64}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    folder, work = smollm2_folder(), WORK / "onnx"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for kind in args.kinds.split(","):
        source = folder
        start = time.perf_counter()
        if KINDS[kind]:
            source = str(work / kind)
            hfcompress.compress({"model": folder, "steps": KINDS[kind], "evaluation": {"enabled": False},
                                 "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
                                 "output": {"dir": source}}, log=lambda line: None)
        compressed = time.perf_counter() - start
        start = time.perf_counter()
        report = export_onnx(source, str(work / f"{kind}-onnx"), log=lambda line: None)
        row = {"kind": kind, "steps": KINDS[kind], "compress_s": round(compressed, 1),
               "export_s": round(time.perf_counter() - start, 1), "onnx_mb": report["size_bytes"] / 1e6,
               "max_abs_difference": report["validation"]["max_abs_difference"],
               "tolerance": report["validation"]["tolerance"],
               "greedy_agreeing": report["validation"]["greedy_tokens_agreeing"], "tied_head": report["tied_head"],
               "native_quantized_layers": sum(k.startswith("MatMulNBits") for k in report["kernels"].values()),
               **{f"{runtime}_{key.removesuffix('_tokens_per_s')}": value
                  for runtime, values in report["speed"].items() for key, value in values.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work / kind, ignore_errors=True)
    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "onnxruntime": __import__("onnxruntime").__version__, "rows": rows}
    (RESULTS / "onnx_smollm2.json").write_text(json.dumps(record, indent=2) + "\n")
    dense = next((row for row in rows if row["kind"] == "dense"), None)
    lines = [f"SmolLM2-135M (fp32 source), ONNX Runtime {record['onnxruntime']} vs PyTorch {record['torch']}, "
             f"{record['machine']}, {record['date']}. Tokens/s: batch 1, the same greedy loop with a KV cache for "
             "both runtimes.", "",
             "| kind | ONNX MB | x dense | max logit diff (tol.) | greedy agree | ORT prefill | PT prefill "
             "| ORT decode | PT decode | ORT/PT decode |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["onnx_mb"] / dense["onnx_mb"] if dense else float("nan")
        lines.append(f"| {row['kind']} | {row['onnx_mb']:.1f} | {ratio:.2f} | {row['max_abs_difference']:.2g} "
                     f"({row['tolerance']:.2g}) | {'/'.join(map(str, row['greedy_agreeing']))} of 16 "
                     f"| {row.get('onnxruntime_prefill', 0):.0f} | {row.get('pytorch_prefill', 0):.0f} "
                     f"| {row.get('onnxruntime_decode', 0):.1f} | {row.get('pytorch_decode', 0):.1f} "
                     f"| {row.get('onnxruntime_decode', 0) / max(row.get('pytorch_decode', 1), 1e-9):.2f} |")
    (RESULTS / "onnx_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
