"""Benchmark: how many calibration tokens DSnoT's default variant needs to beat its initial mask (SmolLM2-135M, 60 %).

    python bench/dsnot_calibration_tokens.py [--windows 4x128,16x128,16x512,32x512] [--sparsity 0.6]

The default variant picks the swaps that lower ||(W - What) X||^2 on the calibration tokens, computed from
X^T X; so does SparseGPT's update. With fewer tokens than a layer has inputs (SmolLM2's down_proj reads 1536), X^T X
is rank-deficient and both fit the calibration tokens rather than the text. Each row: the initial method alone and
dsnot on it, end to end through `hfcompress.compress` (the default compute dtype of this machine), perplexity on the
same 16 x 512 held-out tokens of the evaluation book. Writes bench/results/dsnot_calibration_tokens.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime

import record
import torch

import hfcompress

EVALUATION = {"seq_len": 512, "n_windows": 16, "speed": False}


def perplexity(step: dict, n_samples: int, seq_len: int) -> tuple[float, float]:
    """(dense, compressed) perplexity."""
    result = hfcompress.compress({"model": "builtin:smollm2-135m", "steps": [step], "evaluation": EVALUATION,
                                  "calibration": {"n_samples": n_samples, "seq_len": seq_len}},
                                 log=lambda line: None)
    return result.before["perplexity"], result.after["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="4x128,16x128,16x512,32x512", help="calibration settings, N x tokens")
    parser.add_argument("--sparsity", type=float, default=0.6)
    args = parser.parse_args()
    rows = []
    for setting in args.windows.split(","):
        n_samples, seq_len = map(int, setting.split("x"))
        for init in ("wanda", "sparsegpt"):
            dense, alone = perplexity({"method": init, "sparsity": args.sparsity}, n_samples, seq_len)
            _, refined = perplexity({"method": "dsnot", "init": init, "sparsity": args.sparsity}, n_samples, seq_len)
            rows.append({"windows": setting, "tokens": n_samples * seq_len, "init": init,
                         "initial": round(alone, 2), "dsnot": round(refined, 2), "ratio": round(refined / alone, 4)})
            print(rows[-1], flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (builtin)", "date": datetime.date.today().isoformat(),
            "machine": record.machine(), "sparsity": args.sparsity, "evaluation": EVALUATION,
            "dense_perplexity": round(dense, 2), "torch": torch.__version__}
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. {args.sparsity:.0%} unstructured; perplexity on 16 x "
             f"512 held-out tokens of the evaluation book (dense: {dense:.2f}).", "",
             "| calibration | tokens | initial method | perplexity | + dsnot | x initial |",
             "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['windows']} | {r['tokens']} | {r['init']} | {r['initial']:.2f} | {r['dsnot']:.2f} | "
              f"{r['ratio']:.3f} |" for r in rows]
    record.write("dsnot_calibration_tokens", meta, rows, lines)


if __name__ == "__main__":
    main()
