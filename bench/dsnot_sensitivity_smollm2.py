"""Benchmark: how far DSnoT's result moves when its inputs change in the last bit, per variant, on SmolLM2-135M.

    python bench/dsnot_sensitivity_smollm2.py [--nudges 3]      # about 16 minutes on 2 CPU cores

DSnoT at 60 % on a Wanda mask, refining every layer, per variant (`faithful: true`, the default): once on the model
as it is, then once per nudge with 1 % of the embedding entries (a different random 1 % each time) moved up by one
ulp (`torch.nextafter`), which changes the first block's inputs in their last bit and, through the sequential
passes, every later block's. Same calibration (32 x 512 tokens, seed 0) and evaluation windows. The spread tells how
much of a gap between two implementations of the same rule (hfcompress `faithful` vs the authors' code, whose
statistics round differently) can be rounding alone. Writes bench/results/dsnot_sensitivity_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime

import record
import torch
from dsnot_smollm2 import agreement
from sparsity_vs_llmcompressor import common_parser, masks, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.loading import load_model


def nudge_embeddings(model: torch.nn.Module, seed: int, share: float = 0.01) -> None:
    """One ulp up on `share` of the input embedding's entries (a random choice fixed by `seed`)."""
    weight = model.get_input_embeddings().weight.data
    pick = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed)) < share
    weight[pick] = torch.nextafter(weight[pick], torch.full_like(weight[pick], torch.inf))


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--nudges", type=int, default=3, help="nudged runs per variant, each with its own seed")
    args = parser.parse_args()
    _, _, resolved, calibration, _, windows = prepare(args, llmc=False)
    device, rows = torch.device("cpu"), []
    for faithful in (True, False):
        found = {}
        for nudge in (None, *range(args.nudges)):
            model = load_model(resolved, "float32", device)
            if nudge is not None:
                nudge_embeddings(model, seed=nudge)
            config = hfcompress.make_config("dsnot", {"sparsity": 0.6, "faithful": faithful, "refine": []})
            hfcompress.available_methods()["dsnot"].transform(model, config, Context(calibration=calibration,
                                                                                     device=device))
            found[nudge] = masks(model)
            rows.append({"variant": "faithful" if faithful else "default", "nudge": nudge,
                         "perplexity": perplexity(model, windows, device)})
            if nudge is not None:
                rows[-1]["mask_agreement"] = agreement(found[None], found[nudge])
            print(rows[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"seq_len": args.seq_len, "windows": len(windows)}}
    lines = [f"SmolLM2-135M, wanda + dsnot at 60 %, every layer refined; {meta['machine']}, {meta['date']}.", "",
             "| variant | embeddings | perplexity | x as loaded | masks equal to the as-loaded run's |",
             "|---|---|---:|---:|---:|"]
    loaded = {r["variant"]: r["perplexity"] for r in rows if r["nudge"] is None}
    for r in rows:
        agree = f"{r['mask_agreement']:.2%}" if "mask_agreement" in r else ""
        what = "as loaded" if r["nudge"] is None else f"1 % one ulp up (seed {r['nudge']})"
        lines.append(f"| {r['variant']} | {what} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / loaded[r['variant']]:.3f} | {agree} |")
    record.write("dsnot_sensitivity_smollm2", meta, rows, lines)


if __name__ == "__main__":
    main()
