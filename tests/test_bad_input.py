"""Bad input gets a clear error naming the valid choices, before any weight is loaded."""

import subprocess
import sys

import pytest

import hfcompress
from hfcompress.errors import (
    CalibrationError,
    InvalidOptionError,
    ModelLoadError,
    OutputExistsError,
    UnsupportedModelError,
)
from tests.conftest import ROOT


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the pipeline gets as far as loading weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was noticed")

    monkeypatch.setattr("hfcompress.pipeline.load_model", refuse)


def _run(model, step=None, **sections):
    return hfcompress.compress({"model": model, "steps": [step or {"method": "wanda"}], **sections},
                               log=lambda line: None)


def test_seq_len_beyond_the_context(tiny, no_weights):
    with pytest.raises(InvalidOptionError, match="longer than the model's context \\(256 tokens\\)"):
        _run(tiny("llama"), calibration={"seq_len": 512})


def test_too_few_calibration_tokens(tiny, tmp_path, no_weights):
    text = tmp_path / "tiny.txt"
    text.write_text("a short text " * 20)
    with pytest.raises(CalibrationError, match="requested"):
        _run(tiny("llama"), calibration={"source": str(text), "n_samples": 16, "seq_len": 64})


def test_unsupported_architecture_names_the_supported_families(tiny, no_weights):
    with pytest.raises(UnsupportedModelError, match="`gptq` does not support CLIPModel.*supports: `causal-lm`, "
                                                    "`encoder`"):
        _run(tiny("clip"), {"method": "gptq", "bits": 4})


def test_nonexistent_local_path(no_weights):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _run("./no/such/model")


def test_existing_output_folder(tiny, tmp_path, no_weights):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _run(tiny("llama"), output={"dir": str(tmp_path)})
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "hfcompress", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_gated_and_missing_repos_give_one_clear_line(hub):
    hub.gated.add("org/gated-model")
    for repo, message in [("org/gated-model", "is gated"), ("org/missing-model", "was not found")]:
        result = _cli("compress", repo, "--method", "wanda", "--no-eval")
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_unreachable_hub_gives_one_clear_line():
    result = _cli("compress", "org/some-model", "--method", "wanda", "--no-eval",
                  env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
                       "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert result.returncode == 2
    assert "could not be reached" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cli_unknown_method_and_option(tiny):
    result = _cli("compress", tiny("llama"), "--method", "wandaa")
    valid = ", ".join(f"`{name}`" for name in hfcompress.available_methods())
    assert result.returncode == 2 and f"valid methods: {valid}" in result.stderr
    result = _cli("compress", tiny("llama"), "--method", "magnitude", "--sequential", "true")
    assert result.returncode == 2 and "valid options:" in result.stderr and "`scope`" in result.stderr


def test_full_disk_is_refused_before_writing_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(hfcompress.HfCompressError, match="not enough disk space.*GB are free"):
        _run(tiny("llama"), step={"method": "magnitude"}, evaluation={"enabled": False},
             output={"dir": str(tmp_path / "out")})
    assert list(tmp_path.iterdir()) == []


def test_targets_matching_nothing_name_real_layers(tiny, no_weights):
    with pytest.raises(InvalidOptionError, match="match no Linear layer.*model.layers.0.self_attn.q_proj"):
        _run(tiny("llama"), step={"method": "wanda", "targets": ["mlp.*"]})


def test_push_to_the_hub_repo_behind_the_builtin_model(tmp_path, no_weights):
    with pytest.raises(hfcompress.HfCompressError, match="it is the source model"):
        _run("builtin:smollm2-135m", output={"dir": str(tmp_path / "out"),
                                              "push_to": "huggingfacetb/smollm2-135m-instruct"})


def test_unknown_dtype_missing_recipe_file_and_missing_output_to_load():
    with pytest.raises(InvalidOptionError, match="unknown dtype 'half'; valid: `auto`, `float32`"):
        hfcompress.Recipe.from_dict({"model": {"id": "org/base", "dtype": "half"}, "steps": [{"method": "wanda"}]})
    with pytest.raises(InvalidOptionError, match="recipe file './recipe.yml.bak' does not exist"):
        hfcompress.Recipe.from_yaml("./recipe.yml.bak")
    with pytest.raises(ModelLoadError, match="'./no/such/output' does not exist"):
        hfcompress.load("./no/such/output")


def test_too_many_evaluation_windows_names_the_evaluation_options(tiny, no_weights):
    with pytest.raises(CalibrationError, match="lower --eval-windows or --eval-seq-len"):
        _run(tiny("llama"), evaluation={"n_windows": 100_000})


def test_pattern_that_does_not_divide_the_layers_names_the_ms_that_do(tiny, no_weights):
    with pytest.raises(UnsupportedModelError, match=r"pattern 3:7 needs .* divisible by M=7, but \S+ and \d+ more "
                                                    r"layers take \d+.* inputs; M = 2, 4, .* \(e.g. --pattern 2:4\)"):
        _run(tiny("llama"), step={"method": "magnitude", "pattern": "3:7"})
    with pytest.raises(InvalidOptionError, match=r"pattern 2:5: SparseGPT .* --block-size columns \(128\)"):
        _run(tiny("llama"), step={"method": "sparsegpt", "pattern": "2:5"})


def test_dsnot_options_are_refused_before_loading_with_the_valid_choices(tiny, no_weights):
    for init in ("dsnot", "random"):
        with pytest.raises(InvalidOptionError, match="init.*`wanda`, `magnitude`, `sparsegpt`"):
            _run(tiny("llama"), step={"method": "dsnot", "init": init})
    with pytest.raises(InvalidOptionError, match="cycles must be >= 1, got 0"):
        _run(tiny("llama"), step={"method": "dsnot", "cycles": 0})
    with pytest.raises(UnsupportedModelError, match="pattern 3:7 needs every pruned layer's input width divisible"):
        _run(tiny("llama"), step={"method": "dsnot", "pattern": "3:7"})


def test_seq2seq_moe_and_prequantized_models_are_refused_before_loading(tmp_path, no_weights):
    import transformers

    t5 = transformers.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    mixtral = transformers.MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                         architectures=["MixtralForCausalLM"])
    quantized = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, architectures=["LlamaForCausalLM"],
                                         quantization_config={"quant_method": "gptq", "bits": 4})
    for name, config, message in [("t5", t5, r"\(seq2seq\)"), ("mixtral", mixtral, "mixture-of-experts"),
                                  ("gptq", quantized, "already quantized \\(gptq\\)")]:
        config.save_pretrained(tmp_path / name)
        with pytest.raises(UnsupportedModelError, match=message):
            _run(str(tmp_path / name))


def test_bad_device_names_the_valid_ones():
    from hfcompress.loading import pick_device

    with pytest.raises(ModelLoadError, match="not supported; valid: `auto`, `cpu`"):
        pick_device("mps")


def test_missing_calibration_and_evaluation_files_are_refused_before_the_model_is_looked_up(tmp_path):
    """A mistyped file name is told at once: the model named here does not even exist, and is never looked up."""
    missing = str(tmp_path / "calib.txt")
    with pytest.raises(CalibrationError, match=r"calibration source '.*calib\.txt' does not exist; give `builtin`"):
        _run("./no/such/model", calibration={"source": missing})
    with pytest.raises(CalibrationError, match=r"evaluation source '~/no-such-eval\.jsonl' does not exist"):
        _run("./no/such/model", evaluation={"source": "~/no-such-eval.jsonl"})
    # not checked where it is not read: rtn calibrates on nothing, evaluation can be off
    with pytest.raises(ModelLoadError, match="does not exist"):
        _run("./no/such/model", {"method": "rtn", "bits": 4}, calibration={"source": missing},
             evaluation={"enabled": False, "source": missing})
    result = _cli("compress", "./no/such/model", "--method", "wanda", "--calib", missing, "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "calibration source" in result.stderr and "Traceback" not in result.stderr
