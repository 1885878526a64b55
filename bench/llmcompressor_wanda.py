"""Prune a model with llm-compressor's Wanda on given token windows; runs inside llm-compressor's own venv.

    python llmcompressor_wanda.py MODEL_DIR CALIB.pt SPARSITY OUT.safetensors

Prints one JSON line: {"seconds": wall time of oneshot(), "llmcompressor": version}. The pruned weights go to
OUT.safetensors so that the caller evaluates them with the same code as its own results.
"""

import json
import sys
import time

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

model_dir, calib_file, sparsity, out_file = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
windows = torch.load(calib_file)                                   # (n_samples, seq_len) token ids
n_samples, seq_len = windows.shape
dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
# lm_head must be ignored with the "re:" form: a plain "lm_head" does not match, and pruning the head also prunes
# the tied input embedding. hfcompress prunes only the Linear layers of the decoder blocks; so does this run.
modifier = WandaPruningModifier(sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
start = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=n_samples, max_seq_length=seq_len,
        shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
save_model(model, out_file)
print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__}))
