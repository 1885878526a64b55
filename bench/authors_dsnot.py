"""Run the DSnoT authors' released pruning function (github.com/zyxxmu/DSnoT) on a model folder; used by
bench/dsnot_smollm2.py, which evaluates the result with the same code and windows as hfcompress's runs.

    python bench/authors_dsnot.py AUTHORS_CHECKOUT MODEL_FOLDER CALIBRATION.pt SPARSITY SKIP_LAYER OUT.safetensors \
        [--statistics STATISTICS.pt] [--nudge SEED]

Their code is imported, not copied. Three things are set from outside so that it runs here: their calibration
loader returns our windows, the device is the CPU with fp32 weights, and the decoder layers (which transformers 5
call with rotary `position_embeddings`, something their code does not pass) compute those from the model's own
rotary embedding when missing. Prints one JSON line: seconds, the mask agreement is computed by the caller.
With --statistics, also saves the input statistics each layer was pruned with ({layer name: {"mean", "variance",
"sq_mean"}}, their own accumulations), so that bench/dsnot_same_inputs.py can run hfcompress's rule on them. With
--nudge, the embedding is first nudged in its last bit as bench/dsnot_sensitivity_smollm2.py nudges it for
hfcompress's runs (same seed, same entries). `run_authors` runs this script from the other benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama


def run_authors(checkout: str, folder: str, calibration_file: Path, skip_layer: str, out: Path, *,
                sparsity: float = 0.6, statistics: Path | None = None, nudge: int | None = None) -> dict:
    """This script in a fresh process (their code patches transformers' Llama layer); its JSON line."""
    command = [sys.executable, __file__, checkout, folder, str(calibration_file), str(sparsity), skip_layer, str(out)]
    command += ["--statistics", str(statistics)] if statistics else []
    command += ["--nudge", str(nudge)] if nudge is not None else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the authors' code failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("checkout", "folder", "calibration", "sparsity", "skip_layer", "out"):
        parser.add_argument(name)
    parser.add_argument("--statistics", help="where to save the statistics each layer was pruned with")
    parser.add_argument("--nudge", type=int, help="nudge the embedding first, with this seed")
    args = parser.parse_args()
    sys.path.insert(0, args.checkout)
    import lib.prune as authors

    windows = torch.load(args.calibration)                         # (n_samples, seq_len)
    authors.get_loaders = lambda *args, **kwargs: ([(w.unsqueeze(0), None) for w in windows], None)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    if args.nudge is not None:
        from dsnot_sensitivity_smollm2 import nudge_embeddings

        nudge_embeddings(model, seed=args.nudge)
    model.seqlen, model.hf_device_map = windows.shape[1], {}

    forward = modeling_llama.LlamaDecoderLayer.forward

    def with_rotary(self, hidden_states, *args, position_embeddings=None, position_ids=None, **kwargs):
        if position_embeddings is None:
            position_embeddings = model.model.rotary_emb(hidden_states, position_ids)
        return forward(self, hidden_states, *args, position_embeddings=position_embeddings,
                       position_ids=position_ids, **kwargs)

    modeling_llama.LlamaDecoderLayer.forward = with_rotary
    names = {module: name for name, module in model.named_modules()}
    wrapped = {}                                  # layer name -> their statistics object, the last one made for it

    class Recorded(authors.WrappedGPT):
        def __init__(self, layer, *rest, **options):
            super().__init__(layer, *rest, **options)
            wrapped[names[layer]] = self

    authors.WrappedGPT = Recorded
    # their command-line defaults (main.py), with the initial mask from Wanda
    theirs = SimpleNamespace(nsamples=len(windows), seed=0, sparsity_ratio=float(args.sparsity),
                             initial_method="wanda", max_cycle_time=50, without_DSnoT=False, update_threshold=0.1,
                             pow_of_var_regrowing=1.0, pow_of_var_pruning=1.0, skip_layer=args.skip_layer,
                             skip_sub_layer="no_skip", without_same_sign=True, get_time_overhead=False)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        authors.prune_DSnoT(theirs, model, None, torch.device("cpu"))
    seconds = time.perf_counter() - start
    save_model(model, args.out)
    if args.statistics:   # sum_metric_row: a window's token sum averaged over windows; var: (in, 1)
        torch.save({name: {"mean": w.sum_metric_row.clone(), "variance": w.var.flatten().clone(),
                           "sq_mean": w.scaler_row.clone()} for name, w in wrapped.items()}, args.statistics)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
