"""Quantize a model with llm-compressor's round-to-nearest (QuantizationModifier, no calibration data); runs inside
llm-compressor's own venv.

    python llmcompressor_rtn.py MODEL_DIR BITS GROUP_SIZE OUT_DIR

Symmetric integer weights, one scale per group of GROUP_SIZE input columns, activations left in 16/32 bits (W4A16
for BITS=4), the Linear layers of the decoder blocks only (lm_head ignored). Saves the compressed checkpoint to
OUT_DIR and prints one JSON line: {"seconds": wall time of oneshot(), "llmcompressor": version}.
"""

import json
import sys
import time

import llmcompressor
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM

model_dir, bits, group_size, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                             "strategy": "group", "group_size": group_size}}
modifier = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["re:.*lm_head"])
start = time.perf_counter()
oneshot(model=model, recipe=modifier)
seconds = time.perf_counter() - start
model.save_pretrained(out_dir, save_compressed=True)
print(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__}))
