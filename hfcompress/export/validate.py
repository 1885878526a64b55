"""Is the ONNX graph the model? Checked in ONNX Runtime against PyTorch on the same inputs, as part of every export.

Criterion (the same for every export; quantized layers run as MatMulNBits with float32 arithmetic, accuracy level 0,
so their products differ from PyTorch's only by summation order, as a float MatMul does):
- logits (an encoder: the last hidden state) on fixed prompts: max |onnx - torch| <= RELATIVE_TOLERANCE * max |torch|;
- causal LMs: greedy generation of GREEDY_TOKENS tokens from each prompt, with the KV cache, picks the same tokens.
  The one allowed difference is a near tie: at the first step where the two disagree, PyTorch's scores of both
  picks must be within the logit tolerance; the sequences are compared up to there (after it they legitimately part).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

RELATIVE_TOLERANCE = 1e-3
GREEDY_TOKENS = 16
PROMPT_LENGTHS = (7, 24)


class ValidationError(Exception):
    pass


def prompts(vocab_size: int) -> list[torch.Tensor]:
    """Fixed prompts (1, T) of token ids drawn from their own generator (the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, length), generator=generator) for length in PROMPT_LENGTHS]


def torch_step(model: torch.nn.Module) -> Callable:
    """(ids (1, T) numpy, cache, past) -> (logits (1, T, V) numpy, cache): the model's forward with a DynamicCache,
    the counterpart of `OnnxRunner.step`."""
    from transformers import DynamicCache

    @torch.no_grad()
    def step(ids: np.ndarray, cache: Any, past: int) -> tuple[np.ndarray, Any]:
        out = model(input_ids=torch.from_numpy(ids), cache=cache if past else DynamicCache(),
                    position_ids=torch.arange(past, past + ids.shape[1]).unsqueeze(0), use_cache=True)
        return out.logits.float().numpy(), out.cache

    return step


def greedy(step: Callable, prompt: torch.Tensor, new_tokens: int, empty_cache: Any = None) -> tuple[list, list]:
    """Greedy continuation of `prompt` (1, T) through `step`: the new token ids and the logits (V,) of each pick."""
    ids, cache, past = prompt.numpy().astype(np.int64), empty_cache, 0
    tokens, logits = [], []
    for _ in range(new_tokens):
        step_logits, cache = step(ids, cache, past)
        past += ids.shape[1]
        logits.append(step_logits[0, -1])
        tokens.append(int(step_logits[0, -1].argmax()))
        ids = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens, logits


def agreeing_prefix(reference: tuple[list, list], candidate: list[int], tolerance: float) -> tuple[int, bool]:
    """(how many leading tokens agree, whether a disagreement after them is a near tie within `tolerance`)."""
    tokens, logits = reference
    for index, (expected, got) in enumerate(zip(tokens, candidate, strict=True)):
        if expected != got:
            return index, bool(logits[index][expected] - logits[index][got] <= tolerance)
    return len(tokens), True


@torch.no_grad()
def reference_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def validate(model: torch.nn.Module, runner: Any, family: str) -> dict[str, Any]:
    """Compare the ONNX graph in `runner` with `model`; raise ValidationError when the criterion fails, else return
    what was measured."""
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    worst, scale = 0.0, 0.0
    report: dict[str, Any] = {"criterion": f"max |onnx - torch| <= {RELATIVE_TOLERANCE:g} x max |torch|"
                              + (f"; greedy {GREEDY_TOKENS} tokens equal (near ties excepted)"
                                 if family == "causal-lm" else ""), "prompts": list(PROMPT_LENGTHS)}
    for prompt in prompts(vocab):
        expected, got = reference_output(model, prompt), runner.forward(prompt).float()
        if got.shape != expected.shape:
            raise ValidationError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
        worst = max(worst, (got - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    tolerance = RELATIVE_TOLERANCE * scale
    report.update(max_abs_difference=worst, tolerance=tolerance)
    if not worst <= tolerance:
        raise ValidationError(f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} (tolerance "
                              f"{tolerance:.3g} = {RELATIVE_TOLERANCE:g} x the largest output {scale:.3g})")
    if family == "causal-lm":
        agreed = []
        for prompt in prompts(vocab):
            reference = greedy(torch_step(model), prompt, GREEDY_TOKENS)
            tokens, _ = greedy(runner.step, prompt, GREEDY_TOKENS, runner.empty_cache())
            same, tie = agreeing_prefix(reference, tokens, tolerance)
            if not tie:
                raise ValidationError(f"greedy generation in ONNX Runtime departs from PyTorch's at token {same + 1} "
                                      f"of {GREEDY_TOKENS} ({tokens[same]} instead of {reference[0][same]}), and "
                                      "not at a near tie")
            agreed.append(same)
        report["greedy_tokens_agreeing"] = agreed
    return report


def measure_speed(model: torch.nn.Module, runner: Any, family: str, prompt_tokens: int = 128,
                  new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s, batch 1 on CPU, of ONNX Runtime and of PyTorch, timed the same way: the same
    greedy loop with a KV cache (decode), one forward over `prompt_tokens` (prefill)."""
    from ..evaluate import timed_speed

    prompt = prompts(model.config.get_text_config().vocab_size)[0].repeat(1, prompt_tokens)[:, :prompt_tokens]
    cpu = torch.device("cpu")

    def speed(forward: Callable, step: Callable, empty: Callable) -> dict[str, Any]:
        if family != "causal-lm":  # no decoding: prefill alone
            return timed_speed(lambda: forward(prompt), None, prompt_tokens, cpu, repeats=2)
        return timed_speed(lambda: forward(prompt), lambda n: greedy(step, prompt[:, :32], n, empty()),
                           prompt_tokens, cpu, new_tokens)

    return {"onnxruntime": speed(runner.forward, runner.step, runner.empty_cache),
            "pytorch": speed(lambda ids: reference_output(model, ids), torch_step(model), lambda: None)}
