"""Writers and loader on tiny models: the remote-code form (low-rank pairs, skipped sub-layers) round-trips exactly
and never loads silently wrong; outputs of format version 1 keep loading and keep their cards."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import hfcompress
from hfcompress.card import render_card
from hfcompress.errors import UnsupportedModelError
from hfcompress.formats import save_model, write_metadata
from hfcompress.loading import load_model, load_tokenizer, resolve
from hfcompress.modules import LowRankLinear, replace_module, skip_sublayer
from hfcompress.structure import Structure, lowrank
from tests.tiny_models import ROOT_DIR, fingerprint, reloaded_outputs, same_outputs

CACHED_GENERATION = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
prompt = torch.arange(1, 9).unsqueeze(0)
runs = [m.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=c, pad_token_id=0)
        for c in (True, False)]
assert torch.equal(*runs), runs
print(type(m).__name__, type(m).__mro__[1].__name__, len(m.model.layers))
"""


def _factorize(layer: torch.nn.Linear) -> LowRankLinear:
    """A full-rank pair from the SVD of the layer: W = (U sqrt(S)) (sqrt(S) V^T)."""
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    pair = LowRankLinear(layer.in_features, layer.out_features, rank=s.numel(), bias=layer.bias is not None)
    with torch.no_grad():
        pair.first.weight.copy_((s.sqrt().unsqueeze(1) * vh).float())
        pair.second.weight.copy_((u * s.sqrt()).float())
    return pair


def test_remote_code_form_round_trips_and_refuses_plain_loading(tiny, tmp_path):
    resolved = resolve(tiny("llama"))
    model = load_model(resolved, "float32")
    dense = fingerprint(model)
    structure = Structure()
    for name in ("model.layers.1.mlp.up_proj", "model.layers.2.self_attn.q_proj"):
        replace_module(model, name, _factorize(model.get_submodule(name)))
        structure.add({name: lowrank(64)}, method="test")
    torch.testing.assert_close(fingerprint(model), dense, rtol=0, atol=1e-4)  # full rank: the same model, nearly
    structure.add(skip_sublayer(model, "model.layers.0", "attention", 0, "self_attn", "input_layernorm"),
                  method="test")
    expected = fingerprint(model)

    out = tmp_path / "out"
    out.mkdir()
    needs = save_model(model, load_tokenizer(resolved), out, structure, torch.float32)
    write_metadata(out, {"structure": structure.to_dict(), "loading": needs})
    assert needs == {"format": "remote-code", "packages": [], "trust_remote_code": True}
    assert (out / "modeling_hfcompress.py").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hfcompress" and config["hfcompress"]["base_architecture"] == "LlamaForCausalLM"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "model.layers.1.mlp.up_proj.first.weight" in keys and "model.layers.1.mlp.up_proj.weight" not in keys
    assert not any(k.startswith(("model.layers.0.self_attn.", "model.layers.0.input_layernorm")) for k in keys)

    reloaded = reloaded_outputs(str(out), tmp_path)
    assert "trust_remote_code=True" in reloaded["transformers"]       # plain loading stops and says what to pass
    assert same_outputs(reloaded["hfcompress"], expected)              # hfcompress.load: no code from the repo runs
    code = ("import sys, torch, transformers\nsys.path.insert(0, '.')\nfrom tests.tiny_models import fingerprint\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, "
            "dtype=torch.float32)\ntorch.save(fingerprint(m), sys.argv[2])")
    run = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "trusted.pt")], capture_output=True,
                         text=True, cwd=ROOT_DIR)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "trusted.pt"), expected)
    run = subprocess.run([sys.executable, "-c", CACHED_GENERATION, str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["HfCompressModel", "LlamaForCausalLM", "3"]

    # compressing it again is refused before any weight loads (its base model is what to compress)
    with pytest.raises(UnsupportedModelError, match="compress its original model"):
        hfcompress.compress({"model": str(out), "steps": [{"method": "rtn"}]}, log=lambda line: None)

    # a re-saved remote-code model stays a remote-code model
    again = hfcompress.load(str(out), dtype=torch.float32)
    again.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "hfcompress"
    assert same_outputs(fingerprint(hfcompress.load(str(tmp_path / "again"), dtype=torch.float32)), expected)


def test_format_version_1_outputs_keep_loading_and_keep_their_cards(tiny, tmp_path):
    out = tmp_path / "v1"
    shutil.copytree(tiny("llama"), out)
    metadata = {"format_version": 1, "hfcompress_version": "0.1.0", "source": "x", "base_model": None,
                "family": "causal-lm", "recipe": {"model": {"id": "x"}, "steps": [{"method": "wanda"}]},
                "steps": [{"method": "wanda", "paper": "https://arxiv.org/abs/2306.11695", "description": "wanda",
                           "modules": {"model.layers.0.mlp.up_proj": {"sparsity": 0.5}}}],
                "metrics": {"before": {}, "after": {}}, "evaluation": {},
                "loading": {"trust_remote_code": False, "packages": []}}
    (out / "hfcompress.json").write_text(json.dumps(metadata))
    assert torch.equal(fingerprint(hfcompress.load(str(out))), fingerprint(load_model(resolve(str(out)))))
    card = render_card(metadata)
    assert "plain transformers `from_pretrained`" in card and "Zeros are stored densely" in card
