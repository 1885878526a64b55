"""Layer dropping: the scores follow their definitions, the picks follow the scores, every kind of drop reloads in a
fresh process with equal logits and generates the same with and without a KV cache, bad input is refused first."""

import pytest
import torch

import hfcompress
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.errors import InvalidOptionError, UnsupportedModelError
from hfcompress.loading import load_model, resolve
from hfcompress.methods.layer_drop import apply_drops, choose, similarities
from hfcompress.modules import SkippedAttention
from tests.tiny_models import fingerprint, reloaded_outputs, same_outputs

CALIBRATION = {"n_samples": 4, "seq_len": 32}
PROMPT = torch.arange(1, 9).unsqueeze(0)


def _context(seed: int = 0) -> Context:
    ids = torch.randint(1, 1000, (4, 32), generator=torch.Generator().manual_seed(seed))
    return Context(calibration=CalibrationData(ids, {}))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


@torch.no_grad()
def _reference_similarities(model, ids: torch.Tensor) -> dict[str, float]:
    """The definitions, on one plain forward pass: cos(X, X + attention), cos(H, H + mlp), cos(X, block output)."""
    attended = {}
    hooks = [block.self_attn.register_forward_hook(lambda m, a, out, i=i: attended.__setitem__(i, out[0]))
             for i, block in enumerate(model.model.layers)]
    hidden = model(ids, output_hidden_states=True).hidden_states        # embeddings, block 0 out, ..., final norm
    for hook in hooks:
        hook.remove()
    scores = {}
    for i in range(len(model.model.layers) - 1):     # the last hidden state is after the final norm: not Y
        x, y = hidden[i], hidden[i + 1]
        h = x + attended[i]
        scores[f"model.layers.{i}.self_attn"], scores[f"model.layers.{i}.mlp"] = _cos(x, h), _cos(h, y)
        scores[f"model.layers.{i}"] = _cos(x, y)
    last = len(model.model.layers) - 1
    scores[f"model.layers.{last}.self_attn"] = _cos(hidden[last], hidden[last] + attended[last])
    return scores


def test_scores_follow_the_definitions_and_picks_follow_the_scores(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    context = _context()
    reference = _reference_similarities(model, context.calibration.input_ids)
    for drop in ("attention", "mlp", "block"):
        scores = similarities(model, drop, context, [])
        assert len(scores) == 3
        for name in set(scores) & set(reference):
            assert scores[name] == pytest.approx(reference[name], abs=1e-5), name
    joint = similarities(model, "joint", context, [])
    config = hfcompress.make_config("layer_drop", {"drop": "joint", "n": 3})
    picks, rounds = choose(model, config, context)
    ranked = sorted(joint, key=joint.get, reverse=True)
    keep_one = [name for name in ranked if name.endswith("mlp")][-1]    # every MLP may not go: one must stay
    assert len(rounds) == 1 and picks == [name for name in ranked if name != keep_one][:3]


def test_iterative_scores_see_the_earlier_drops(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    context = _context()
    config = hfcompress.make_config("layer_drop", {"drop": "attention", "n": 2, "iterative": True})
    picks, rounds = choose(model, config, context)
    assert len(rounds) == 2 and picks[0] == max(rounds[0], key=rounds[0].get) and picks[0] not in rounds[1]
    dropped = load_model(resolve(tiny("llama")), "float32")
    apply_drops(dropped, picks[:1])                                    # really dropped, then scored as usual
    assert similarities(dropped, "attention", context, []) == pytest.approx(rounds[1], abs=1e-6)
    assert picks[1] == max(rounds[1], key=rounds[1].get)


@pytest.mark.parametrize("step", [{"drop": "attention", "n": 2}, {"drop": "mlp", "n": 1, "iterative": True},
                                  {"drop": "joint", "n": 3}, {"drop": "block", "n": 2, "iterative": True},
                                  {"modules": ["model.layers.0.self_attn", "model.layers.1.mlp"]}])
def test_every_drop_generates_the_same_with_a_cache_and_stores_no_dropped_attention(tiny, step):
    """(Saving and reloading every kind of drop: the round-trip table of test_methods.py.)"""
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "layer_drop", **step}],
                                  "calibration": CALIBRATION, "evaluation": {"enabled": False}},
                                 log=lambda line: None)
    model, stats = result.model, result.reports[0].stats
    assert stats["n"] == len(stats["dropped"]) == step.get("n", 2)
    if step.get("iterative"):
        assert len(stats["scores"]) == stats["n"]
    generate = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(PROMPT, use_cache=True, **generate),
                       model.generate(PROMPT, use_cache=False, **generate))
    attentions = sum(isinstance(block.self_attn, SkippedAttention) for block in model.model.layers)
    before, after = stats["kv_cache_bytes_per_token"]
    assert after == before * (model.config.num_hidden_layers - attentions) / 3   # dropped attention: no KV cache
    out = model(PROMPT, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    stored = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers if layer.is_initialized)
    placeholder = 2 * PROMPT.shape[1] if isinstance(model.model.layers[0].self_attn, SkippedAttention) else 0
    assert stored - placeholder == after // 4 * PROMPT.shape[1] and cache.get_seq_length() == PROMPT.shape[1]


def test_the_card_shows_the_scores(tiny, tmp_path):
    hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "layer_drop", "drop": "joint", "n": 2}],
                         "calibration": CALIBRATION, "evaluation": {"enabled": False},
                         "output": {"dir": str(tmp_path / "out")}}, log=lambda line: None)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "](layer_drop_scores.png)" in card and (tmp_path / "out" / "layer_drop_scores.png").stat().st_size > 1000


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_sub_layer_drops_work_on_each_family(tiny, family):
    config = hfcompress.make_config("layer_drop", {"drop": "joint", "n": 2})
    model = load_model(resolve(tiny(family)), "float32")
    picks, _ = choose(model, config, _context())
    apply_drops(model, picks + ["model.layers.0.self_attn"] if "model.layers.0.self_attn" not in picks else picks)
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(PROMPT, use_cache=True, **generate),
                       model.generate(PROMPT, use_cache=False, **generate))


def test_block_drop_on_an_encoder(tiny, tmp_path):
    result = hfcompress.compress({"model": tiny("bert"), "steps": [{"method": "layer_drop", "drop": "block",
                                                                    "n": 1}], "calibration": CALIBRATION,
                                  "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}},
                                 log=lambda line: None)
    assert result.model.config.num_hidden_layers == 2
    reloaded = reloaded_outputs(str(tmp_path / "out"), tmp_path)
    assert same_outputs(reloaded["transformers"], fingerprint(result.model))
    with pytest.raises(UnsupportedModelError, match="--drop block works on any model"):
        hfcompress.compress({"model": tiny("bert"), "steps": [{"method": "layer_drop", "drop": "attention",
                                                               "n": 1}]}, log=lambda line: None)


def test_bad_drops_are_refused_before_loading(tiny, monkeypatch):
    monkeypatch.setattr("hfcompress.pipeline.load_model", lambda *a, **k: pytest.fail("weights were loaded"))

    def run(**step):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "layer_drop", **step}]},
                            log=lambda line: None)

    with pytest.raises(InvalidOptionError, match="n=3 is too many: the model has 3 attention modules"):
        run(drop="attention", n=3)
    with pytest.raises(InvalidOptionError, match="n=3 is too many: the model has 3 block"):
        run(drop="block", n=3)
    with pytest.raises(InvalidOptionError, match="n=5 is too many"):
        run(drop="joint", n=5)
    with pytest.raises(InvalidOptionError, match="`attention`, `mlp`, `block`, `joint`"):
        run(drop="heads")
    with pytest.raises(InvalidOptionError, match="not a block, attention or MLP of this model"):
        run(modules=["model.layers.7.self_attn"])
    with pytest.raises(InvalidOptionError, match="would remove every attention"):
        run(modules=[f"model.layers.{i}.self_attn" for i in range(3)])
    with pytest.raises(InvalidOptionError, match="use it with --drop block"):
        run(drop="attention", score="influence")
    with pytest.raises(InvalidOptionError, match="n must be at least 1"):
        run(n=0)


def test_a_block_dropped_model_quantizes_and_reloads(tiny, tmp_path):
    """Planning sees the smaller model: layer_bits needs one entry per block left."""
    steps = [{"method": "layer_drop", "drop": "block", "n": 1},
             {"method": "layerwise_quant", "layer_bits": [4, 2], "quantizer": "gptq"}]
    result = hfcompress.compress({"model": tiny("llama"), "steps": steps, "calibration": CALIBRATION,
                                  "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}},
                                 log=lambda line: None)
    assert result.reports[1].stats["block_bits"] == [4, 2] and result.model.config.num_hidden_layers == 2
    for loader, reloaded in reloaded_outputs(str(tmp_path / "out"), tmp_path).items():
        assert isinstance(reloaded, torch.Tensor) and same_outputs(reloaded, fingerprint(result.model)), loader
    with pytest.raises(InvalidOptionError, match="layer_bits has 3 entries; the model has 2 blocks"):
        hfcompress.compress({"model": tiny("llama"), "steps": [steps[0], {**steps[1], "layer_bits": [4, 2, 2]}]},
                            log=lambda line: None)


def test_quantized_dropped_sub_layers_reload_with_remote_code_and_the_package(tiny, tmp_path):
    """Remote-code form with packed integers: both loaders give the in-memory logits; plain loading asks for
    trust_remote_code, and without compressed-tensors every loader asks for it."""
    out = tmp_path / "out"
    steps = [{"method": "layer_drop", "drop": "attention", "n": 1}, {"method": "rtn", "bits": 4}]
    result = hfcompress.compress({"model": tiny("llama"), "steps": steps,
                                  "calibration": CALIBRATION, "evaluation": {"enabled": False},
                                  "output": {"dir": str(out)}}, log=lambda line: None)
    assert result.metadata["loading"] == {"format": "remote-code", "packages": ["compressed-tensors"],
                                          "trust_remote_code": True}
    reloaded = reloaded_outputs(str(out), tmp_path)
    assert "trust_remote_code=True" in reloaded.pop("transformers")
    for loader, logits in reloaded.items():
        assert isinstance(logits, torch.Tensor) and same_outputs(logits, fingerprint(result.model)), loader
    without = reloaded_outputs(str(out), tmp_path, hide=("compressed_tensors",))
    assert "trust_remote_code=True" in without.pop("transformers")
    for loader, message in without.items():
        assert isinstance(message, str) and "pip install" in message and "compressed-tensors" in message, loader
