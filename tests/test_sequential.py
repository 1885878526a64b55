"""The layer-by-layer engine must see exactly what the whole model computes."""

import pytest
import torch

from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.loading import load_model, resolve
from hfcompress.methods.wanda import WandaConfig, wanda, wanda_score
from hfcompress.sequential import (
    capture_inputs,
    find_block_stacks,
    find_linears,
    hidden_states_of,
    named_blocks,
    run_blocks,
    weight_matrix,
)
from hfcompress.sparsity import keep_mask
from hfcompress.statistics import InputStatistics
from tests.tiny_models import CAUSAL


def _model(folder):
    return load_model(resolve(folder), "float32")


def _batches(n=3, seq_len=24, seed=0):
    return list(torch.randint(0, 30000, (n, seq_len), generator=torch.Generator().manual_seed(seed)).split(1))


@pytest.mark.parametrize("name", CAUSAL)
def test_engine_replays_every_block_input_exactly(tiny, name):
    """Block inputs captured by hooks during a whole-model forward equal what the engine feeds each block."""
    model = _model(tiny(name))
    batches = _batches()
    reference: dict[str, list[torch.Tensor]] = {}
    handles = [block.register_forward_pre_hook(
        lambda m, args, kwargs, n=prefix: reference.setdefault(n, []).append(
            (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        for prefix, block in named_blocks(model)]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()

    seen: dict[str, list[torch.Tensor]] = {}

    given: dict[str, list[torch.Tensor]] = {}

    def process(step):
        handle = step.block.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault(step.name, []).append(
            (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        step.run()
        handle.remove()
        given[step.name] = [hidden_states_of(args, kwargs) for args, kwargs in step.inputs]

    run_blocks(model, batches, "cpu", process, sequential=False)
    assert list(seen) == list(reference) and len(seen) == 3
    for prefix in reference:
        assert len(seen[prefix]) == len(batches)
        for got, inputs, want in zip(seen[prefix], given[prefix], reference[prefix], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert torch.equal(inputs, got)  # the inputs a method is handed are what the block receives


def _whole_model_wanda_masks(model, batches, config):
    """Reference: one forward of the whole dense model with hooks on every Linear, then Wanda masks."""
    layers = {name: layer for prefix, block in named_blocks(model) for name, layer in
              find_linears(block, prefix=prefix).items()}
    with InputStatistics(layers) as stats, torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    return {name: keep_mask(wanda_score(weight_matrix(layer), stats.sq_sum(name)), config.ratio, config.nm)
            for name, layer in layers.items()}


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_sequential_engine_gives_the_same_masks_as_the_whole_model_at_once(tiny, name):
    batches = _batches()
    config = WandaConfig(sparsity=0.5, sequential=False)
    reference = _whole_model_wanda_masks(_model(tiny(name)), batches, config)

    model = _model(tiny(name))
    wanda(model, config, Context(CalibrationData(torch.cat(batches))))
    for layer_name, keep in reference.items():
        layer = dict(model.named_modules())[layer_name]
        assert torch.equal(weight_matrix(layer) != 0, keep), layer_name


def test_sequential_mode_differs_only_after_the_first_block(tiny):
    batches = _batches()
    one_shot, sequential = _model(tiny("llama")), _model(tiny("llama"))
    wanda(one_shot, WandaConfig(sequential=False), Context(CalibrationData(torch.cat(batches))))
    wanda(sequential, WandaConfig(sequential=True), Context(CalibrationData(torch.cat(batches))))
    masks = [{n: (weight_matrix(layer) != 0) for p, b in named_blocks(m)
              for n, layer in find_linears(b, prefix=p).items()}
             for m in (one_shot, sequential)]
    first = [n for n in masks[0] if n.startswith("model.layers.0.")]
    later = [n for n in masks[0] if not n.startswith("model.layers.0.")]
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in first)
    assert not all(torch.equal(masks[0][n], masks[1][n]) for n in later)


def test_finds_every_block_stack_of_a_vision_language_model(tiny):
    model = load_model(resolve(tiny("llava")), "float32")
    names = [name for name, _ in find_block_stacks(model)]
    assert any("vision" in n for n in names) and any("language_model" in n for n in names)


def test_keyword_inputs_equal_across_windows_are_stored_once(tiny):
    """Rotary tables (and masks) are the same for every window of one length: one copy, not one per window."""
    model = _model(tiny("llama"))
    captured = capture_inputs(model, model.model.layers[0], _batches(n=3), torch.device("cpu"))
    first_cos, first_sin = captured[0][1]["position_embeddings"]
    for args, kwargs in captured[1:]:
        cos, sin = kwargs["position_embeddings"]
        assert cos is first_cos and sin is first_sin
        assert not torch.equal(args[0] if args else kwargs["hidden_states"],
                               captured[0][0][0] if captured[0][0] else captured[0][1]["hidden_states"])


def test_captured_inputs_never_alias_model_parameters():
    """DeBERTa hands `rel_embeddings.weight` itself to every block; a captured input must be a copy, or moving the
    embeddings back to the CPU after capture would move the block inputs with them."""
    import transformers

    config = transformers.DebertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, relative_attention=True, max_relative_positions=16,
                                        pos_att_type=["c2p", "p2c"])
    model = transformers.DebertaModel(config).eval()
    batches = list(torch.randint(0, 100, (2, 8)).split(1))
    captured = capture_inputs(model, model.encoder.layer[0], batches, torch.device("cpu"))
    parameters = {id(p) for p in model.parameters()}
    inputs = [t for args, kwargs in captured for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    assert any(t.shape == model.encoder.rel_embeddings.weight.shape for t in inputs)  # it is passed to the block
    assert not any(id(t) in parameters for t in inputs)
