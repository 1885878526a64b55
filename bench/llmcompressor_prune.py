"""Prune a model with llm-compressor's Wanda or SparseGPT on given token windows; runs inside llm-compressor's own
venv.

    python llmcompressor_prune.py wanda|sparsegpt MODEL_DIR CALIB.pt SPARSITY OUT.safetensors

Prints one JSON line: {"seconds": wall time of oneshot(), "llmcompressor": version}. The pruned weights go to
OUT.safetensors so that the caller evaluates them with the same code as its own results. SparseGPT runs with the
authors' defaults that hfcompress also uses: blocks of 128 columns, dampening 1 % of the mean Hessian diagonal.
"""

import json
import sys
import time

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

method, model_dir, calib_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
sparsity = float(sys.argv[4])
windows = torch.load(calib_file)                                   # (n_samples, seq_len) token ids
n_samples, seq_len = windows.shape
dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
# lm_head must be ignored with the "re:" form: a plain "lm_head" does not match, and pruning the head also prunes
# the tied input embedding. hfcompress prunes only the Linear layers of the decoder blocks; so does this run.
common = {"sparsity": sparsity, "mask_structure": "0:0", "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
modifier = (SparseGPTModifier(**common, block_size=128, dampening_frac=0.01) if method == "sparsegpt"
            else WandaPruningModifier(**common))
start = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=n_samples, max_seq_length=seq_len,
        shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
save_model(model, out_file)
print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__}))
