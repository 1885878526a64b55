"""Benchmark: how far DSnoT's result moves when its inputs change in the last bit, per variant, on SmolLM2-135M.

    python bench/dsnot_sensitivity_smollm2.py [--nudges 3] [--authors bench/.work/DSnoT]   # 25 minutes, 2 cores

DSnoT at 60 % on a Wanda mask, refining every layer, per variant (`faithful: true`, the default): once on the model
as it is, then once per nudge with 1 % of the embedding entries (a different random 1 % each time) moved up by one
ulp (`torch.nextafter`), which changes the first block's inputs in their last bit and, through the sequential
passes, every later block's. Same calibration (32 x 512 tokens, seed 0) and evaluation windows. The spread tells how
much of a gap between two implementations of the same rule can be rounding alone (hfcompress `faithful` summed its
statistics until it took the authors' order of operations; it now matches their code bit for bit). With a checkout
of the authors' code at --authors, their code runs on the same nudged models (bench/authors_dsnot.py --nudge), so
its own spread is measured too, and each nudge gives one more side-by-side pair of `faithful` and theirs on
identical inputs. Writes bench/results/dsnot_sensitivity_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path

import record
import torch
from authors_dsnot import run_authors
from dsnot_smollm2 import agreement
from safetensors.torch import load_model as load_weights
from sparsity_vs_llmcompressor import WORK, common_parser, masks, prepare

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
    parser.add_argument("--authors", default=str(WORK / "DSnoT"), help="checkout of github.com/zyxxmu/DSnoT")
    args = parser.parse_args()
    _, folder, resolved, calibration, calib_file, windows = prepare(args, llmc=False)
    device, rows = torch.device("cpu"), []
    variants = ["faithful", "default"] + (["authors"] * Path(args.authors, "lib", "prune.py").exists())
    found = {}                                                   # (variant, nudge) -> masks
    for variant in variants:
        for nudge in (None, *range(args.nudges)):
            model = load_model(resolved, "float32", device)
            if variant == "authors":
                out_file = WORK / "authors-dsnot-sensitivity.safetensors"
                run_authors(args.authors, folder, calib_file, "no_skip", out_file, nudge=nudge)
                load_weights(model, str(out_file))               # their pruned weights, their nudged embedding
            else:
                if nudge is not None:
                    nudge_embeddings(model, seed=nudge)
                options = {"sparsity": 0.6, "faithful": variant == "faithful", "refine": []}
                hfcompress.available_methods()["dsnot"].transform(
                    model, hfcompress.make_config("dsnot", options), Context(calibration=calibration, device=device))
            found[variant, nudge] = masks(model)
            rows.append({"variant": variant, "nudge": nudge, "perplexity": perplexity(model, windows, device)})
            if nudge is not None:
                rows[-1]["mask_agreement"] = agreement(found[variant, None], found[variant, nudge])
            if variant == "authors":                             # the pair on identical inputs
                rows[-1]["faithful_mask_agreement"] = agreement(found["faithful", nudge], found[variant, nudge])
            print(rows[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"seq_len": args.seq_len, "windows": len(windows)}}
    record.write("dsnot_sensitivity_smollm2", meta, rows, table(rows, meta))


def table(rows: list[dict], meta: dict) -> list[str]:
    """The markdown lines: every run, then each variant's mean and spread and, with the authors' runs, the pairs."""
    name = {"faithful": "hfcompress faithful", "default": "hfcompress default", "authors": "authors' DSnoT"}
    lines = [f"SmolLM2-135M, wanda + dsnot at 60 %, every layer refined; {meta['machine']}, {meta['date']}.", "",
             "| variant | embeddings | perplexity | x as loaded | masks equal to the as-loaded run's |",
             "|---|---|---:|---:|---:|"]
    loaded = {r["variant"]: r["perplexity"] for r in rows if r["nudge"] is None}
    for r in rows:
        agree = f"{r['mask_agreement']:.2%}" if "mask_agreement" in r else ""
        what = "as loaded" if r["nudge"] is None else f"1 % one ulp up (seed {r['nudge']})"
        lines.append(f"| {name[r['variant']]} | {what} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / loaded[r['variant']]:.3f} | {agree} |")
    lines += ["", "| variant | runs | mean perplexity | lowest | highest | spread (highest / lowest) |",
              "|---|---:|---:|---:|---:|---:|"]
    means = {}
    for variant in loaded:
        values = [r["perplexity"] for r in rows if r["variant"] == variant]
        means[variant] = statistics.mean(values)
        lines.append(f"| {name[variant]} | {len(values)} | {means[variant]:.2f} | {min(values):.2f} | "
                     f"{max(values):.2f} | {max(values) / min(values):.3f} |")
    if "authors" in loaded:
        ours = {r["nudge"]: r["perplexity"] for r in rows if r["variant"] == "faithful"}
        lines += ["", "hfcompress `faithful` beside the authors' code on identical (nudged) inputs:", "",
                  "| embeddings | faithful | authors' | faithful / authors' | masks equal |",
                  "|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["variant"] == "authors"):
            what = "as loaded" if r["nudge"] is None else f"seed {r['nudge']}"
            lines.append(f"| {what} | {ours[r['nudge']]:.2f} | {r['perplexity']:.2f} | "
                         f"{ours[r['nudge']] / r['perplexity']:.3f} | {r['faithful_mask_agreement']:.2%} |")
        lines.append(f"| mean | {means['faithful']:.2f} | {means['authors']:.2f} | "
                     f"{means['faithful'] / means['authors']:.3f} | |")
    return lines


if __name__ == "__main__":
    main()
