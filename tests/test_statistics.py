"""Shared fp32 statistics: input collectors (one accumulator for layers that read the same tensor), sub-layer probes
through hooks, and the per-token cosine similarity."""

import pytest
import torch

from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.loading import load_model, resolve
from hfcompress.statistics import GramAccumulator, InputStatistics, SubLayerProbes, mean_cosine


def test_layers_reading_one_tensor_share_one_accumulator_and_sums_are_fp32(tiny):
    model = load_model(resolve(tiny("llama")), "bfloat16")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    layers = {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "up": mlp.up_proj,
              "gate": mlp.gate_proj, "down": mlp.down_proj}
    seen = {}
    hook = attention.q_proj.register_forward_hook(lambda m, args, out: seen.setdefault("q", []).append(args[0]))
    batches = torch.randint(0, 30000, (3, 16), generator=torch.Generator().manual_seed(0))
    with InputStatistics(layers, ("sum", "sq_sum", "hessian", "window_averages")) as stats, torch.no_grad():
        for ids in batches.split([1, 2]):                                # one window, then a batch of two
            model(input_ids=ids, use_cache=False)
    hook.remove()
    assert stats.owner["k"] == stats.owner["v"] == stats.owner["q"] == "q"
    assert stats.owner["up"] == stats.owner["gate"] != stats.owner["down"] == "down"
    assert len(stats.values) == 3                                       # computed and held once per input
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["q"]]).float()  # the bf16 activations, in fp32
    assert stats.tokens("k") == 48 and stats.sq_sum("v").dtype == torch.float32
    torch.testing.assert_close(stats.sq_sum("k"), x.pow(2).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.hessian("q"), x.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.variance("q"), x.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    assert stats.windows("q") == 3                                      # the authors' DSnoT averages: per window
    windows = x.reshape(3, 16, -1)
    torch.testing.assert_close(stats.window_variance("q"), windows.var(1, unbiased=False).mean(0), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(stats.window_sum("q"), windows.sum(1).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.window_sq_sum("q"), windows.pow(2).sum(1).mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="was not collected"):
        InputStatistics(layers).__enter__().hessian("q")


def test_sub_layer_probes_see_the_residual_stream_of_each_block(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    block = model.model.layers[1]
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(1))
    results = {}

    def process(step):
        if step.name != "model.layers.1":
            return
        with SubLayerProbes(step.block, step.block.self_attn) as probes:
            step.run()
        results.update(vars(probes))

    Context(CalibrationData(ids)).run_blocks(model, process)
    # the same block by hand: X + attention(norm(X)) is the attention residual, then + MLP(norm(.)) the output
    x = results["block_input"][0]
    with torch.no_grad():
        captured = {}
        handle = block.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
        model(input_ids=ids[:1], use_cache=False)
        handle.remove()
        after_attention = x + block.self_attn(block.input_layernorm(x), **{
            k: captured[k] for k in ("position_embeddings", "attention_mask") if k in captured})[0]
        output = after_attention + block.mlp(block.post_attention_layernorm(after_attention))
    torch.testing.assert_close(results["after_attention"][0], after_attention, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["block_output"][0], output, rtol=1e-5, atol=1e-5)
    assert len(results["block_output"]) == 2                              # one per calibration batch


def test_mean_cosine_averages_over_every_token():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])                         # (batch 1, 2 tokens, hidden 2)
    b = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert mean_cosine([(a, b)]) == pytest.approx(0.5)
    assert mean_cosine([(a, a), (a, b), (a, b), (a, b)]) == pytest.approx(5 / 8)   # 8 tokens, cosines 1,1,1,0,...


def test_gram_accumulator_batches_chunks_and_sums_them_all():
    # a 10-token buffer: chunks that fill it exactly, overflow it, and one wider than it (multiplied at once)
    torch.manual_seed(0)
    chunks = [torch.randn(n, 6) for n in (4, 6, 3, 25, 1)]
    gram = GramAccumulator(batch_tokens=10)
    for chunk in chunks:
        gram.add(chunk)
    x = torch.cat(chunks).double()
    result = gram.result()
    torch.testing.assert_close(result.double(), x.t() @ x, rtol=1e-5, atol=1e-5)
    assert torch.equal(result, result.t()) and result.dtype == torch.float32


def test_gram_accumulator_of_empty_chunks_is_zero():
    gram = GramAccumulator()
    gram.add(torch.zeros(0, 3))
    assert torch.equal(gram.result(), torch.zeros(3, 3))


def test_gram_accumulator_multiplies_in_bf16_only_batches_of_bf16_values():
    # on a CPU with native bf16 a batch flagged bf16 is multiplied in bf16: 1e-3 of the scale off for other values
    torch.manual_seed(0)
    bf16_valued, plain = torch.randn(256, 300).bfloat16().float(), torch.randn(256, 300)
    gram = GramAccumulator()
    gram.add(bf16_valued, bf16_values=True)
    gram.add(plain, bf16_values=False)
    x = torch.cat([bf16_valued, plain]).double()
    exact = x.t() @ x
    assert (gram.result().double() - exact).abs().max() <= 1e-6 * exact.abs().max()
