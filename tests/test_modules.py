"""Structural edits on tiny models: removed blocks load as a plain smaller model, skipped sub-layers keep the
residual path and the KV cache right, low-rank factors reproduce the layer."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from hfcompress.loading import load_model, resolve
from hfcompress.modules import LowRankLinear, SkippedAttention, remove_blocks, replace_module, skip_sublayer
from hfcompress.sequential import find_block_stacks
from hfcompress.structure import Structure
from tests.tiny_models import fingerprint, same_outputs

PROMPT = torch.arange(1, 9).unsqueeze(0)


def _generate(model, use_cache):
    return model.generate(PROMPT, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_removing_a_block_gives_a_plain_smaller_model(tiny, tmp_path, name):
    model = load_model(resolve(tiny(name)), "float32")
    structure = Structure()
    structure.add({"model.layers.2.mlp.up_proj": {"sparse": {"sparsity": 0.5}}}, method="earlier")
    renamed, changes = remove_blocks(model, "model.layers", [1])
    structure.add({}, renamed=renamed, config=changes, method="layer_drop")
    assert changes["num_hidden_layers"] == 2 and model.config.num_hidden_layers == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert len(changes["layer_types"]) == 2
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1]
    assert list(structure.modules) == ["model.layers.1.mlp.up_proj"]          # renumbered in the map too
    assert [name for name, _ in find_block_stacks(model)] == ["model.layers"]
    assert torch.equal(_generate(model, True), _generate(model, False))      # the KV cache lines up

    model.save_pretrained(tmp_path / "out")
    code = ("import sys, torch, transformers\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
            "sys.path.insert(0, '.')\nfrom tests.tiny_models import fingerprint\n"
            "assert m.config.num_hidden_layers == 2 and len(m.model.layers) == 2\n"
            "torch.save(fingerprint(m), sys.argv[2])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "logits.pt")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert same_outputs(torch.load(tmp_path / "logits.pt"), fingerprint(model))


def test_removing_a_vision_block_rewrites_the_vision_config_only(tiny):
    model = load_model(resolve(tiny("llava")), "float32")
    stack = next(name for name, _ in find_block_stacks(model) if "vision" in name)
    text_layers = model.config.text_config.num_hidden_layers
    _, changes = remove_blocks(model, stack, [0])
    assert model.config.vision_config.num_hidden_layers == 1 == changes["num_hidden_layers"]
    assert model.config.text_config.num_hidden_layers == text_layers


def test_skipped_sublayers_equal_zeroed_outputs_and_keep_the_cache_right(tiny):
    skipped = load_model(resolve(tiny("llama")), "float32")
    reference = load_model(resolve(tiny("llama")), "float32")
    entries = {**skip_sublayer(skipped, "model.layers.0", "attention", 0, "self_attn", "input_layernorm"),
               **skip_sublayer(skipped, "model.layers.1", "mlp", 1, "mlp", "post_attention_layernorm")}
    assert entries["model.layers.0.self_attn"] == {"dropped": {"part": "attention"}}
    with torch.no_grad():  # the same model with those sub-layers' outputs forced to zero
        reference.model.layers[0].self_attn.o_proj.weight.zero_()
        reference.model.layers[1].mlp.down_proj.weight.zero_()
    torch.testing.assert_close(fingerprint(skipped), fingerprint(reference), rtol=0, atol=1e-5)
    assert isinstance(skipped.model.layers[0].input_layernorm, nn.Identity)
    assert not any("layers.0.self_attn" in n or "layers.0.input_layernorm" in n for n in skipped.state_dict())

    # block 0's attention is skipped, yet generation with a KV cache equals generation without one
    assert torch.equal(_generate(skipped, True), _generate(skipped, False))
    out = skipped(PROMPT, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.layers[0].keys.shape == (1, 1, PROMPT.shape[1], 1)   # a length placeholder only
    assert cache.layers[1].keys.shape[1] == 2 and cache.get_seq_length() == PROMPT.shape[1]
    assert isinstance(skipped.model.layers[0].self_attn, SkippedAttention)
    skipped.config._attn_implementation = "eager"     # one decode step by hand: positions come from the cache
    with torch.no_grad():
        full = skipped(PROMPT, use_cache=False).logits[0, -1]
        first = skipped(PROMPT[:, :-1], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        step = skipped(PROMPT[:, -1:], cache=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    assert [name for name, _ in find_block_stacks(skipped)] == ["model.layers"]


def test_a_full_rank_factor_pair_reproduces_the_layer(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    expected = fingerprint(model)
    layer = model.model.layers[1].mlp.up_proj                                     # (128, 64)
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    pair = LowRankLinear(64, 128, rank=64, bias=False)
    with torch.no_grad():
        pair.first.weight.copy_((s.sqrt().unsqueeze(1) * vh).float())
        pair.second.weight.copy_((u * s.sqrt()).float())
    assert replace_module(model, "model.layers.1.mlp.up_proj", pair) is layer
    torch.testing.assert_close(fingerprint(model), expected, rtol=0, atol=1e-4)
