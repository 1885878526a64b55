"""Quantize a model with llm-compressor: round-to-nearest (QuantizationModifier, no calibration data) or GPTQ
(GPTQModifier on given token windows); runs inside llm-compressor's own venv.

    python llmcompressor_quant.py rtn|gptq MODEL_DIR BITS GROUP_SIZE OUT_DIR [CALIB.pt]

Symmetric integer weights, one scale per group of GROUP_SIZE input columns, activations left in 16/32 bits (W4A16
for BITS=4), the Linear layers of the decoder blocks only (lm_head ignored). GPTQ runs with llm-compressor's
defaults: blocks of 128 columns, dampening 1 % of the mean Hessian diagonal, static activation ordering. Saves the
compressed checkpoint to OUT_DIR and prints one JSON line: {"seconds": wall time of oneshot(), "llmcompressor":
version}.
"""

import json
import sys
import time

import llmcompressor
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM

method, model_dir, out_dir = sys.argv[1], sys.argv[2], sys.argv[5]
bits, group_size = int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                             "strategy": "group", "group_size": group_size}}
calibration = {}
if method == "gptq":
    from datasets import Dataset

    windows = torch.load(sys.argv[6])                                # (n_samples, seq_len) token ids
    calibration = {"dataset": Dataset.from_dict({"input_ids": windows.tolist(),
                                                 "attention_mask": torch.ones_like(windows).tolist()}),
                   "num_calibration_samples": windows.shape[0], "max_seq_length": windows.shape[1],
                   "shuffle_calibration_samples": False}
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["re:.*lm_head"], block_size=128,
                            dampening_frac=0.01)
else:
    modifier = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["re:.*lm_head"])
start = time.perf_counter()
oneshot(model=model, recipe=modifier, **calibration)
seconds = time.perf_counter() - start
model.save_pretrained(out_dir, save_compressed=True)
print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__}))
