"""Benchmark (GPU): wanda, wanda + dsnot and ecoflap on a Llama-7B-shaped model with random bf16 weights.

    python bench/gpu_llama7b.py                      # one CUDA GPU; about 5 minutes on an H100
    python bench/gpu_llama7b.py --shape tiny --device cpu --n-samples 4 --seq-len 64    # the script's mechanics

The model (32 blocks, hidden 4096, MLP 11008, vocabulary 32000: 6.7 B parameters, 13.5 GB in bf16) stays in CPU
memory, as `hfcompress compress` keeps it; blocks visit the GPU one at a time. Calibration: --n-samples x --seq-len
random token windows (128 x 2048 by default, the GPU default of `hfcompress compress`). Every method starts from
the same weights (refilled from the same seed) and is timed end to end (the transform call, GPU synchronized),
with where the time goes: capturing the first block's inputs, the Hessians (dsnot), the swap search (dsnot) and
ECoFLaP's two stages. Random weights: times and memory only, no quality. Writes bench/results/gpu_llama7b.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import transformers
from timing import seconds_in, synchronize, time_parts

import hfcompress
import hfcompress.methods.dsnot as dsnot_module
import hfcompress.sequential as sequential_module
import hfcompress.statistics as statistics_module
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
          "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=32000)}
RUNS = {"wanda": ("wanda", {"sparsity": 0.6}), "dsnot": ("dsnot", {"sparsity": 0.6, "init": "wanda"}),
        "ecoflap": ("ecoflap", {"sparsity": 0.6})}
PARTS = {"capture": (sequential_module, "capture_stack_inputs"), "hessian": (statistics_module, "add_gram_upper"),
         "swap search": (dsnot_module, "refine_mask")}

def random_model(shape: str) -> transformers.LlamaForCausalLM:
    """The model's modules without running their initializers (minutes at 7 B), weights filled by `refill`."""
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)          # allocated in bf16 at once: no fp32 copy (27 GB at 7 B)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(config)    # its buffers are computed, not loaded
    return model.eval()


@torch.no_grad()
def refill(model: torch.nn.Module, seed: int = 0, pool_size: int = 2**26) -> None:
    """Norms 1, every other weight N(0, 0.02^2) values copied from one seeded pool of `pool_size` draws, each tensor
    from its own offset: a copy of 13.5 GB takes seconds where drawing 6.7 B normals with a CPU generator takes
    minutes of the GPU's time. Random weights serve times and memory, not quality."""
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2 * pool_size, generator=generator) * 0.02).to(torch.bfloat16)
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        flat, offset = param.view(-1), (index * 7919) % pool_size
        for start in range(0, flat.numel(), pool_size):
            piece = flat[start:start + pool_size]
            piece.copy_(pool[offset:offset + piece.numel()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    time_parts(PARTS)
    device = torch.device(args.device)
    start = time.perf_counter()
    model = random_model(args.shape)
    built = time.perf_counter() - start
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.n_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    for run in args.runs.split(","):
        method, options = RUNS[run]
        refill(model)
        seconds_in.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        config = hfcompress.make_config(method, options)
        synchronize()
        start = time.perf_counter()
        report = hfcompress.available_methods()[method].transform(
            model, config, Context(calibration=CalibrationData(ids), device=device))
        synchronize()
        seconds = time.perf_counter() - start
        stats = report.stats
        parts = {part: round(value, 1) for part, value in seconds_in.items()}
        if method == "ecoflap":
            parts |= {"stage 1": stats["stage1_seconds"], "stage 2": stats["stage2_seconds"]}
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append({"run": run, "options": options, "seconds": round(seconds, 1), "parts": parts,
                     "peak_gpu_gib": round(peak, 2) if peak is not None else None})
        print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    parameters = sum(p.numel() for p in model.parameters())
    header = (f"Llama-{args.shape}-shaped random bf16 model ({parameters / 1e9:.2f} B parameters, built in "
              f"{built:.0f} s), {args.n_samples} x {args.seq_len} calibration tokens, {gpu}, torch "
              f"{torch.__version__}, {datetime.date.today()}. Weights in CPU memory, one block on {device} at a time.")
    lines = [header, "", "| run | seconds | where the time goes | peak GPU memory |", "|---|---|---|---|"]
    for row in rows:
        parts = ", ".join(f"{k} {v} s" for k, v in row["parts"].items()) or "-"
        peak = f"{row['peak_gpu_gib']} GiB" if row["peak_gpu_gib"] is not None else "-"
        lines.append(f"| {row['run']} {row['options']} | {row['seconds']} | {parts} | {peak} |")
    os.makedirs(RESULTS, exist_ok=True)
    name = "gpu_llama7b" if args.shape == "7b" and device.type == "cuda" else f"gpu_llama7b_{args.shape}_{device.type}"
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as handle:
        json.dump({"header": header, "rows": rows}, handle, indent=1)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
