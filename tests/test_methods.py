"""One table of cases over every registered method, run through the whole pipeline on tiny random models, with the
output reloaded in a fresh process (plain transformers and hfcompress.load) and compared with the in-memory model."""

import pytest
import torch

import hfcompress
from hfcompress.sequential import find_linears, named_blocks, weight_matrix
from tests.tiny_models import CAUSAL, fingerprint, reloaded_outputs

# method -> list of (options, tiny models). Adding a method means adding its row here (a guard test checks).
CASES = {
    "magnitude": [({"sparsity": 0.5}, ["llama", "gpt2", "bert", "clip", "llava"]),
                  ({"pattern": "2:4"}, ["qwen2"]),
                  ({"sparsity": 0.3, "scope": "layer"}, ["opt"])],
    "wanda": [({"sparsity": 0.5}, [*CAUSAL, "bert"]),
              ({"pattern": "2:4"}, ["llama", "gpt2"]),
              ({"pattern": "4:8", "sequential": False}, ["mistral"])],
}
TABLE = [(method, options, model) for method, rows in CASES.items() for options, models in rows for model in models]


def test_every_registered_method_has_a_row():
    builtin = {name for name, spec in hfcompress.available_methods().items()
               if spec.transform.__module__.startswith("hfcompress.")}
    assert builtin == set(CASES)


def _block_rows(model):
    for prefix, block in named_blocks(model):
        for name, layer in find_linears(block, prefix=prefix).items():
            yield name, weight_matrix(layer)


@pytest.mark.parametrize("method,options,model_name", TABLE, ids=[f"{m}-{'-'.join(map(str, o.values()))}-{n}"
                                                                    for m, o, n in TABLE])
def test_method_round_trips_through_the_pipeline(method, options, model_name, tiny, tmp_path):
    out = tmp_path / "out"
    result = hfcompress.compress({
        "model": tiny(model_name),
        "steps": [{"method": method, **options}],
        "calibration": {"n_samples": 4, "seq_len": 32},
        "evaluation": {"seq_len": 64, "n_windows": 2, "speed": False},
        "output": {"dir": str(out)},
    }, log=lambda line: None)
    config = hfcompress.make_config(method, options)

    # measured sparsity: exact per row for row-wise patterns, exact per group for N:M
    nm = config.nm
    for name, weight in _block_rows(result.model):
        zeros = weight == 0
        if nm:
            groups = zeros.reshape(weight.shape[0], -1, nm[1]).sum(-1)
            assert (groups == nm[0]).all(), name
        elif getattr(config, "scope", "row") == "row":
            assert (zeros.sum(1) == int(weight.shape[1] * config.ratio)).all(), name
        else:
            assert zeros.sum() == int(weight.numel() * config.ratio), name
    assert result.reports[0].stats["sparsity"] == pytest.approx(config.ratio, abs=0.02)
    assert result.after["sparsity"] == pytest.approx(config.ratio, abs=0.02)
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

    # fresh processes: plain transformers and hfcompress.load give the in-memory model's outputs exactly
    expected = fingerprint(result.model)
    for loader, reloaded in reloaded_outputs(str(out), tmp_path).items():
        assert torch.equal(reloaded, expected), loader
