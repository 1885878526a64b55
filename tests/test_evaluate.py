"""Measurements: perplexity agrees with transformers' own loss, and streaming a model leaves it intact."""

import math

import torch

from hfcompress.evaluate import parameter_count, perplexity, streamed
from hfcompress.loading import load_model, resolve


def _windows(n=3, seq_len=20):
    return torch.randint(0, 30000, (n, seq_len), generator=torch.Generator().manual_seed(0))


def test_perplexity_is_the_exponent_of_the_mean_token_loss(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    windows = _windows()
    with torch.no_grad():  # every window has the same length, so the mean of per-window mean losses is the mean
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert math.isclose(perplexity(model, windows, torch.device("cpu")), math.exp(sum(losses) / len(losses)),
                        rel_tol=1e-5)


def test_streaming_from_cpu_memory_gives_the_same_logits_and_keeps_tied_weights_tied(tiny):
    """The path a GPU takes for a model larger than its memory, run with the CPU as the execution device."""
    model = load_model(resolve(tiny("llama")), "float32")
    model.lm_head.weight = model.model.embed_tokens.weight
    slots = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    count = parameter_count(model)
    ids = _windows(1)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with streamed(model, torch.device("cpu")):
            assert {p.device.type for p in model.parameters()} == {"meta"}  # weights really are streamed
            assert torch.equal(model(input_ids=ids).logits, reference)
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(slots[name] is tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()])
    assert parameter_count(model) == count
