"""Tracing a model to ONNX with transformers' own exporter, and running the graph in ONNX Runtime.

Causal LMs become ONE graph with past inputs: (input_ids, position_ids, the KV cache so far) -> (logits, the cache
with the new positions). Prefill is the same graph on an empty cache (zero positions), decode feeds one token and
the returned cache, so the weights are stored once. Encoders become one graph of their forward. Batch size 1;
sequence and cache lengths are dynamic.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

CACHE_IN, CACHE_OUT = "input.cache.", "output.cache."  # the exporter's names for the cache leaves


def trace(model: torch.nn.Module, family: str, sample: torch.Tensor) -> Any:
    """The ONNX graph (an `onnx_ir.Model`) of `model`, traced on `sample` token ids (1, T) with dynamic shapes."""
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_prefill_decode

    config = OnnxConfig(dynamic=True)
    with torch.no_grad():
        if family == "causal-lm":
            # a multi-token step on a non-empty cache, captured from a real generate(): the traced graph keeps
            # both the query length and the cache length symbolic, so it serves prefill and decode alike
            stages = decompose_prefill_decode(model, {"input_ids": sample, "attention_mask": torch.ones_like(sample)},
                                              multi_token_decode=True)
            step_model, inputs = stages["decode"]
            graph = OnnxExporter().export(step_model, inputs, config).program
            freeze_cache_constants(graph, inputs)
            return graph
        inputs = {"input_ids": sample, "attention_mask": torch.ones_like(sample)}
        return OnnxExporter().export(model, inputs, config).program


def freeze_cache_constants(model: Any, inputs: dict[str, Any]) -> None:
    """Make the cache's non-tensor-state leaves (a sliding-window layer's window size) constants of the graph, so its
    only inputs are ids, positions and the keys and values; the matching outputs go too."""
    import onnx_ir as ir

    graph = model.graph
    for value in list(graph.inputs):
        if not value.name.startswith(CACHE_IN) or value.name.endswith((".keys", ".values")):
            continue
        leaf: Any = inputs
        for part in value.name.removeprefix("input.").split("."):  # cache.layers.0._sliding_window_tensor
            leaf = leaf[int(part)] if part.isdigit() else leaf[part] if isinstance(leaf, dict) else getattr(leaf, part)
        graph.inputs.remove(value)
        value.const_value = ir.tensor(leaf.detach().cpu().numpy(), name=value.name)
        graph.register_initializer(value)
    for output in list(graph.outputs):
        if output.name.startswith(CACHE_OUT) and not output.name.endswith((".keys", ".values")):
            graph.outputs.remove(output)


class OnnxRunner:
    """An exported graph in an ONNX Runtime session (CPU, or CUDA first when asked and available)."""

    def __init__(self, path: str | os.PathLike, family: str, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the same cores PyTorch uses
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        self.family = family
        self.inputs = {spec.name: spec for spec in self.session.get_inputs()}
        self.output_names = [spec.name for spec in self.session.get_outputs()]

    def empty_cache(self) -> dict[str, np.ndarray]:
        """Zero-length cache leaves, shaped as the graph declares them (batch 1, the cache axis 0)."""
        cache = {}
        for name, spec in self.inputs.items():
            if name.startswith(CACHE_IN):
                # (batch, heads, positions, head size): the exporter names even its fixed axes, as digit strings
                shape = [int(dim) if str(dim).isdigit() else 0 for dim in spec.shape]
                shape[0] = 1
                if 0 in shape[1:2] + shape[3:]:
                    raise ValueError(f"cache input {name} has no fixed head count or head size: {spec.shape}")
                cache[name] = np.zeros(shape, dtype=np.float32)
        return cache

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past: int) -> tuple[np.ndarray, dict]:
        """Logits (1, T, V) of `ids` (1, T) after `past` cached positions, and the cache including them."""
        feed = {"input_ids": ids, "position_ids": np.arange(past, past + ids.shape[1])[None], **cache}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
        new_cache = {CACHE_IN + name[len(CACHE_OUT):]: value for name, value in outputs.items()
                     if name.startswith(CACHE_OUT)}
        return outputs["logits"], new_cache

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's main output for `ids` (1, T): logits for a causal LM, the last hidden state for an encoder."""
        ids = ids.cpu().numpy().astype(np.int64)
        if self.family == "causal-lm":
            return torch.from_numpy(self.step(ids, self.empty_cache(), 0)[0])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        feed = {name: value for name, value in feed.items() if name in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0])
