"""Benchmark: hfcompress's `faithful` rule on exactly the inputs the DSnoT authors' code pruned each layer with.

    python bench/dsnot_same_inputs.py [--authors bench/.work/DSnoT] [--skip no_skip|mlp]   # about 2 minutes

The authors' code (bench/authors_dsnot.py) prunes SmolLM2-135M at 60 % from a Wanda mask and saves, per layer,
the statistics it pruned with: each input channel's mean (their window-summed form), variance and mean square.
Then, layer by layer, hfcompress's `faithful_refine` runs on the dense weight with those same statistics (the
Wanda mask from them, the error and the orders from them), and its mask is compared with the one the authors'
code left in the layer. This takes out the two codes' passes of the calibration windows through the pruned blocks,
so any mask that still differs differs because of the rule. Beside it, per block: hfcompress's own full `faithful`
run (same windows), how far the statistics its layers were pruned with lie from the authors' (the largest relative
difference of any channel's mean square), and how many of its weights' masks match theirs. Writes
bench/results/dsnot_same_inputs.{json,md} (`_attention` added to the name with `--skip mlp`).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import record
import torch
from authors_dsnot import run_authors
from safetensors.torch import load_file
from sparsity_vs_llmcompressor import WORK, common_parser, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.loading import load_model
from hfcompress.methods import dsnot
from hfcompress.methods.dsnot import faithful_refine
from hfcompress.methods.wanda import wanda_score
from hfcompress.sparsity import keep_mask

SPARSITY = 0.6


def pipeline_run(resolved, calibration, refine: list[str]) -> tuple[dict, dict]:
    """hfcompress `faithful` over the whole model: ({layer: keep mask}, {layer: mean square per window (in,)})."""
    seen, found = {}, {}

    def recording(weight, stats, name, *rest):
        seen[name] = stats.window_sq_sum(name)                    # the authors' scaler_row
        found[name] = result = original(weight, stats, name, *rest)
        return result

    original, dsnot.refine_layer = dsnot.refine_layer, recording
    try:
        model = load_model(resolved, "float32", torch.device("cpu"))
        config = hfcompress.make_config("dsnot", {"sparsity": SPARSITY, "faithful": True, "refine": refine})
        hfcompress.available_methods()["dsnot"].transform(model, config, Context(calibration=calibration,
                                                                                 device=torch.device("cpu")))
    finally:
        dsnot.refine_layer = original
    return {name: keep for name, (keep, _, _) in found.items()}, seen


def first_difference(rows: list[dict]) -> str:
    """Where the two full runs part: the first layer whose masks differ, and how far apart its statistics were."""
    first = next((r for r in rows if r["pipeline_differ"]), None)
    if first is None:
        return "The two full runs chose the same mask in every layer."
    return (f"The full runs first differ in {first['layer']}: {first['pipeline_differ']} weights in "
            f"{first['pipeline_rows_differing']} of its {first['rows']} rows, with statistics "
            f"{first['statistics_difference']:.1e} apart (relative); every layer before it is identical.")


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--authors", default=str(WORK / "DSnoT"), help="checkout of github.com/zyxxmu/DSnoT")
    parser.add_argument("--skip", default="no_skip", choices=["no_skip", "mlp"],
                        help="their --skip_layer: no_skip refines every layer, mlp the attention layers alone")
    args = parser.parse_args()
    _, folder, resolved, calibration, calib_file, _ = prepare(args, llmc=False)
    out_file, stats_file = WORK / f"authors-dsnot-{args.skip}.safetensors", WORK / f"authors-stats-{args.skip}.pt"
    run_authors(args.authors, folder, calib_file, args.skip, out_file, sparsity=SPARSITY, statistics=stats_file)
    theirs, dense = load_file(out_file), load_file(Path(folder, "model.safetensors"))
    own_masks, own_stats = pipeline_run(resolved, calibration, [] if args.skip == "no_skip" else ["*self_attn*"])
    rows = []
    for name, stats in torch.load(stats_file).items():
        if name.split(".")[3] == args.skip:             # "model.layers.i.mlp.up_proj": left on its Wanda mask
            continue
        weight = dense[f"{name}.weight"].float()
        keep = keep_mask(wanda_score(weight, stats["sq_mean"]), SPARSITY, None)
        pruned = weight * keep
        ours, swaps = faithful_refine(weight, pruned, keep, stats["mean"], stats["variance"],
                                      wanda_score(pruned, stats["sq_mean"]))
        their_keep = theirs[f"{name}.weight"] != 0
        same_inputs, full_runs = ours != their_keep, own_masks[name] != their_keep    # (out, in): entries apart
        apart = ((own_stats[name] - stats["sq_mean"]).abs() / stats["sq_mean"]).max().item()
        rows.append({"layer": name, "weights": weight.numel(), "rows": weight.shape[0],
                     "differ": int(same_inputs.sum()), "rows_differing": int(same_inputs.any(1).sum()),
                     "mean_swaps_per_row": round(swaps.float().mean().item(), 3), "statistics_difference": apart,
                     "pipeline_differ": int(full_runs.sum()), "pipeline_rows_differing": int(full_runs.any(1).sum())})
    total, differ = sum(r["weights"] for r in rows), sum(r["differ"] for r in rows)
    meta = {"date": datetime.date.today().isoformat(), "machine": record.machine(), "torch": torch.__version__,
            "sparsity": SPARSITY, "skip_layer": args.skip, "layers": len(rows),
            "identical_share": 1 - differ / total, "layers_identical": sum(r["differ"] == 0 for r in rows),
            "pipeline_identical_share": 1 - sum(r["pipeline_differ"] for r in rows) / total}
    lines = [f"SmolLM2-135M, wanda + DSnoT at {SPARSITY:.0%}, `--skip_layer {args.skip}`; {meta['machine']}, "
             f"{meta['date']}.", "",
             f"On the authors' statistics, hfcompress `faithful` masks are identical to theirs on "
             f"{meta['identical_share']:.4%} of the weights ({meta['layers_identical']} of {len(rows)} layers in "
             f"every weight); the two full runs, each on its own statistics: {meta['pipeline_identical_share']:.2%}.",
             "", first_difference(rows), "",
             "| block | statistics, largest relative difference | masks identical, full runs | "
             "masks identical, same statistics |", "|---:|---:|---:|---:|"]
    for block in sorted({int(r["layer"].split(".")[2]) for r in rows}):
        part = [r for r in rows if int(r["layer"].split(".")[2]) == block]
        weights = sum(r["weights"] for r in part)
        lines.append(f"| {block} | {max(r['statistics_difference'] for r in part):.1e} | "
                     f"{1 - sum(r['pipeline_differ'] for r in part) / weights:.2%} | "
                     f"{1 - sum(r['differ'] for r in part) / weights:.4%} |")
    record.write("dsnot_same_inputs" + ("_attention" if args.skip == "mlp" else ""), meta, rows, lines)
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
