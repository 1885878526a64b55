"""Two tables over every registered method, on tiny random models:

- the round-trip table: the whole pipeline, then the output reloaded in a fresh process (plain transformers and
  hfcompress.load) and compared with the in-memory model, in the loading mode the case declares;
- the per-method invariants (exact sparsity per row, weights on the quantization grid, ...), by kind of change.
"""

import json

import pytest
import torch
from safetensors import safe_open

import hfcompress
from hfcompress.modules import LowRankLinear, SkippedAttention, SkippedMLP
from hfcompress.quantization import SCALE_BUFFER
from hfcompress.sequential import find_linears, named_blocks, weight_matrix
from tests.tiny_models import CAUSAL, fingerprint, reloaded_outputs, same_outputs

# Loading modes: `plain` loads with transformers alone; `package` needs a pip package (and fails without it, with
# the pip command); `remote-code` needs trust_remote_code.
# method -> list of (options, tiny models, loading mode). Adding a method means adding its rows (a guard checks).
CASES = {
    "magnitude": [({"sparsity": 0.5}, ["llama", "gpt2", "bert", "clip", "llava"], "plain"),
                  ({"pattern": "2:4"}, ["qwen2"], "plain"),
                  ({"sparsity": 0.3, "scope": "layer"}, ["opt"], "plain")],
    # mistral, qwen2, qwen3 and phi3 run in other rows (a guard checks that every family runs somewhere)
    "wanda": [({"sparsity": 0.5}, ["llama", "gemma", "gemma2", "gpt2", "opt", "bert"], "plain"),
              ({"pattern": "2:4"}, ["llama", "gpt2"], "plain"),
              ({"pattern": "4:8", "sequential": False}, ["mistral"], "plain")],
    "sparsegpt": [({"sparsity": 0.5}, ["llama", "gpt2", "bert"], "plain"),
                  ({"pattern": "2:4", "block_size": 32}, ["qwen2"], "plain"),
                  ({"sparsity": 0.6, "per_row": False, "sequential": False}, ["opt"], "plain")],
    "dsnot": [({"sparsity": 0.5}, ["llama", "gpt2", "bert"], "plain"),
              ({"pattern": "2:4", "init": "sparsegpt"}, ["qwen2"], "plain"),
              ({"pattern": "4:8", "faithful": True}, ["mistral"], "plain"),
              ({"sparsity": 0.6, "init": "magnitude", "faithful": True, "refine": ["*attn*"]}, ["opt"], "plain"),
              ({"sparsity": 0.5, "estimate": "diagonal", "cycles": 5}, ["phi3"], "plain")],
    "ecoflap": [({"sparsity": 0.5, "score_windows": 2}, ["llama", "gpt2", "bert"], "plain"),
                ({"sparsity": 0.6, "order": "zeroth", "perturb": "block"}, ["qwen3"], "plain")],
    "gptq": [({"bits": 4}, ["llama", "bert"], "package"),
             ({"bits": 3, "group_size": 16, "act_order": True}, ["qwen2"], "package"),
             ({"bits": 8, "block_size": 32}, ["mistral"], "package")],
    "layerwise_quant": [({"bits": [4, 2], "avg_bits": 3}, ["llama", "bert"], "package"),
                        ({"bits": [8, 4, 2], "avg_bits": 6, "score": "zd", "quantizer": "gptq"}, ["qwen2"], "package"),
                        ({"layer_bits": [3, 8, 4]}, ["mistral"], "package")],
    "layer_drop": [({"drop": "attention", "n": 2}, ["llama", "qwen3", "gemma", "gemma2"], "remote-code"),
                   ({"drop": "mlp", "n": 1, "iterative": True}, ["mistral", "phi3"], "remote-code"),
                   ({"drop": "joint", "n": 3}, ["qwen2"], "remote-code"),
                   ({"drop": "block", "n": 1}, ["llama", "bert"], "plain"),
                   ({"drop": "block", "n": 2, "iterative": True, "score": "influence"}, ["qwen3"], "plain")],
    "lord": [({"mode": "activation"}, ["llama", "gpt2", "bert"], "remote-code"),
             ({"mode": "svd", "reduction": 0.3, "rank_multiple": 16}, ["qwen3"], "remote-code"),
             ({"tolerance": 0.5, "sequential": False}, ["mistral"], "remote-code"),
             ({"merge": True, "target_params": "3.99M"}, ["phi3"], "plain")],
    "rtn": [({"bits": 4}, ["llama", "qwen3", "bert", "llava"], "package"),
            ({"bits": 3, "group_size": 16}, ["mistral"], "package"),
            ({"bits": 8, "group_size": 32}, ["phi3"], "package"),
            ({"bits": 2}, ["opt"], "package")],
}
TABLE = [(method, options, model, mode) for method, rows in CASES.items() for options, models, mode in rows
         for model in models]
PACKAGES = dict.fromkeys(("rtn", "gptq", "layerwise_quant"), "compressed_tensors")


def test_every_tiny_family_runs_in_some_row():
    assert set(CAUSAL) | {"bert", "clip", "llava"} <= {model for _, _, model, _ in TABLE}


def test_every_registered_method_has_a_row():
    builtin = {name for name, spec in hfcompress.available_methods().items()
               if spec.transform.__module__.startswith("hfcompress.")}
    assert builtin == set(CASES)


def _block_layers(model):
    for prefix, block in named_blocks(model):
        yield from find_linears(block, prefix=prefix).items()


def _compress(method, options, model_folder, out, samples=False):
    return hfcompress.compress({
        "model": model_folder,
        "steps": [{"method": method, **options}],
        "calibration": {"n_samples": 4, "seq_len": 32},
        "evaluation": {"seq_len": 64, "n_windows": 2, "speed": False, "samples": samples},
        "output": {"dir": str(out)},
    }, log=lambda line: None)


@pytest.mark.parametrize("method,options,model_name,mode", TABLE,
                         ids=[f"{m}-{'-'.join(map(str, o.values()))}-{n}" for m, o, n, _ in TABLE])
def test_method_round_trips_through_the_pipeline(method, options, model_name, mode, tiny, tmp_path):
    out = tmp_path / "out"
    first_options, first_models, _ = CASES[method][0]  # each method's first case also generates the card's answers
    sampled = options == first_options and model_name == first_models[0]
    result = _compress(method, options, tiny(model_name), out, samples=sampled)
    config = hfcompress.make_config(method, options)
    spec = hfcompress.available_methods()[method]
    check_invariants(spec.changes, config, result)
    answers = [sample["text"] for sample in result.after.get("samples", [])]
    assert len(answers) == (3 if sampled and model_name in CAUSAL else 0)  # or the recipe left them out
    if "perplexity" in result.before:
        assert result.after["perplexity"] != result.before["perplexity"]

    # saved folder: safetensors + tokenizer + metadata + card, nothing left in temporary folders
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "hfcompress.json", "README.md", "tokenizer.json"} <= files
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".pt")) for f in files)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging folder was renamed, not left behind
    probe = tmp_path.parent / f"{tmp_path.name}.probe"  # the permissions an ordinary new file gets here
    probe.touch()
    assert {p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()} == {probe.stat().st_mode & 0o777}
    probe.unlink()
    metadata = json.loads((out / "hfcompress.json").read_text())
    structure = metadata["structure"]
    assert metadata["format_version"] == 2 and (structure["modules"] or structure["removed"])
    layers = {name for name, entry in structure["modules"].items() if "dropped" not in entry}
    assert layers <= {name for name, _ in result.model.named_modules()}  # the map names the saved modules

    # fresh processes: plain transformers and hfcompress.load give the in-memory model's outputs exactly (plain
    # loading of a remote-code form stops and says what to pass instead)
    expected = fingerprint(result.model)
    reloaded_by = reloaded_outputs(str(out), tmp_path)
    assert ("trust_remote_code" in reloaded_by) == (mode == "remote-code")
    for loader, reloaded in reloaded_by.items():
        if mode == "remote-code" and loader == "transformers":
            assert isinstance(reloaded, str) and "trust_remote_code=True" in reloaded, reloaded
            continue
        assert isinstance(reloaded, torch.Tensor), f"{loader}: {reloaded}"
        assert same_outputs(reloaded, expected), loader
    if mode == "package":  # without the package, every loader stops and says how to install it
        failures = reloaded_outputs(str(out), tmp_path, hide=(PACKAGES[method],))
        for loader, message in failures.items():
            assert isinstance(message, str) and "pip install" in message and "compressed-tensors" in message, loader


def check_invariants(kind, config, result):
    """What must hold after a step of each kind of change, measured on the model in memory."""
    if kind == "sparse":
        nm = config.nm
        groups = result.reports[0].stats.get("group_sparsity", {})   # per-group ratios (ecoflap)
        for name, layer in _block_layers(result.model):
            zeros = weight_matrix(layer) == 0
            group = next((g for g in groups if name == g or name.startswith(g + ".")), None)
            if group:
                assert (zeros.sum(1) == round(zeros.shape[1] * groups[group])).all(), name
            elif nm:
                assert (zeros.reshape(zeros.shape[0], -1, nm[1]).sum(-1) == nm[0]).all(), name
            elif getattr(config, "scope", "row") == "row" and getattr(config, "per_row", True):
                assert (zeros.sum(1) == int(zeros.shape[1] * config.ratio)).all(), name
            elif getattr(config, "scope", None) == "layer":
                assert zeros.sum() == int(zeros.numel() * config.ratio), name
            else:  # one threshold per block of columns across all rows
                assert zeros.float().mean().item() == pytest.approx(config.ratio, abs=0.01), name
        assert result.reports[0].stats["sparsity"] == pytest.approx(config.ratio, abs=0.02)
        assert result.after["sparsity"] == pytest.approx(config.ratio, abs=0.02)
    elif kind == "quantized":
        quantized = result.structure.of_kind("quantized")
        levels = set(getattr(config, "layer_bits", ()) or config.bits)
        assert quantized and {e["bits"] for e in quantized.values()} <= levels
        for name, layer in _block_layers(result.model):
            bits = quantized[name]["bits"]
            weight, scale = weight_matrix(layer).float(), getattr(layer, SCALE_BUFFER).float()
            q = (weight.reshape(*scale.shape, -1) / scale.unsqueeze(-1)).round()
            assert torch.equal((q * scale.unsqueeze(-1)).reshape(weight.shape), weight), name  # every weight is q * s
            assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1, name
        assert "sparsity" not in result.after  # nothing was pruned: no sparsity row
        # true bits per weight: the stored bytes (packed ints, scales, the unquantized rest) over the parameters
        assert result.after["bits_per_weight"] < result.before["bits_per_weight"]
    elif kind == "dropped":
        stats, blocks = result.reports[0].stats, [block for _, block in named_blocks(result.model)]
        assert stats["n"] == len(stats["dropped"]) == config.n
        skipped = sum(isinstance(module, (SkippedAttention, SkippedMLP)) for block in blocks
                      for module in block.children())
        assert skipped == (0 if config.drop == "block" else config.n)
        assert len(blocks) == 3 - (config.n if config.drop == "block" else 0)
        assert result.after["parameters"] < result.before["parameters"]
        assert result.after["size_bytes"] < result.before["size_bytes"]
    elif kind == "lowrank":
        stats, modules = result.reports[0].stats, dict(result.model.named_modules())
        factored = {name: rank for name, rank in stats["ranks"].items() if rank is not None}
        assert factored and stats["factored"] == len(factored) == len(result.structure.of_kind("lowrank"))
        assert all(rank % config.rank_multiple == 0 for rank in factored.values())
        if config.ratio is not None:
            assert config.ratio <= stats["reduction"] < config.ratio + 0.1
        for name, rank in factored.items():
            if config.merge:  # a stock Linear again, holding a matrix of that rank
                assert type(modules[name]) is not LowRankLinear
                assert torch.linalg.matrix_rank(weight_matrix(modules[name]).double(), rtol=1e-5) <= rank, name
            else:
                assert isinstance(modules[name], LowRankLinear) and modules[name].rank == rank, name
        if config.merge:
            assert result.after["parameters"] == result.before["parameters"]
        else:
            assert result.after["parameters"] < result.before["parameters"]
            assert result.after["size_bytes"] < result.before["size_bytes"]
    else:
        raise AssertionError(f"no invariants for changes of kind {kind!r}: add them here")


def test_stored_size_matches_the_files_and_the_packed_layout(tiny, tmp_path):
    out = tmp_path / "out"
    result = _compress("rtn", {"bits": 4, "group_size": 32}, tiny("llama"), out)
    from hfcompress.evaluate import stored_bytes

    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        tensors = {key: weights.get_tensor(key) for key in weights.keys()}
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored_bytes(result.model, result.structure, torch.float32) == data
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]                 # (64, 128 * 4 / 32)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 16)
    assert tuple(tensors["model.layers.0.mlp.down_proj.weight_scale"].shape) == (64, 4)
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert config["format"] == "pack-quantized" and group["weights"]["num_bits"] == 4
    assert "model.layers.2.self_attn.q_proj" in group["targets"] and not any("lm_head" in t for t in group["targets"])
