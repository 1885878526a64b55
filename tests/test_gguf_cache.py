"""A GGUF file is parsed and dequantized once; later runs read the kept conversion and get the same model."""

import os

import torch

from hfcompress import gguf_cache
from hfcompress.loading import load_model, load_tokenizer, resolve
from hfcompress.metadata import source_license

TEXT = "Hello world.<|im_start|>user\n  Ünïcode, tabs\tand 123 digits<|im_end|>\n"


def _load_everything():
    resolved = resolve("builtin:smollm2-135m")
    return resolved, load_tokenizer(resolved), load_model(resolved, "float32"), source_license(resolved)


def test_a_second_load_reads_the_conversion_and_gets_the_same_model(monkeypatch):
    import gguf

    resolved, tokenizer, model, license_ = _load_everything()
    assert sorted(os.listdir(resolved.converted)) == ["license.json", "model", "tokenizer"]

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    again, tokenizer2, model2, license2 = _load_everything()
    assert again.converted == resolved.converted and again.family == resolved.family == "causal-lm"
    unnamed = {"_name_or_path": ""}
    assert again.config.to_diff_dict() | unnamed == resolved.config.to_diff_dict() | unnamed
    assert license2 == license_ == "apache-2.0"
    assert tokenizer2(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert tokenizer2.chat_template == tokenizer.chat_template
    first, second = model.state_dict(), model2.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # bit-identical


def test_weights_are_not_kept_in_another_dtype_or_beyond_the_limit(monkeypatch, tmp_path):
    resolved = resolve("builtin:smollm2-135m")
    tiny = torch.nn.Linear(4, 4)
    assert not gguf_cache.store_weights(tmp_path, tiny.to(torch.bfloat16), resolved.config)  # not the exact values
    monkeypatch.setattr(gguf_cache, "WEIGHTS_LIMIT", 10)
    assert not gguf_cache.store_weights(tmp_path, torch.nn.Linear(4, 4), resolved.config)
    assert not (tmp_path / "model").exists()


def test_a_cache_that_cannot_be_written_only_costs_time(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HFCOMPRESS_CACHE", str(tmp_path / "file" / "cache"))  # no folder can be made there
    resolved = resolve("builtin:smollm2-135m")
    assert load_tokenizer(resolved)(TEXT).input_ids and source_license(resolved) == "apache-2.0"
    assert not gguf_cache.store_weights(resolved.converted, torch.nn.Linear(4, 4), resolved.config)
    assert not os.path.exists(resolved.converted)
    assert gguf_cache.gguf_license(resolved.location, resolved.gguf_file, None) == "apache-2.0"  # no cache folder


def test_a_part_is_written_whole_or_not_at_all(tmp_path):
    def fails(path):
        (path / "half.json").write_text("{")
        raise OSError("disk full")

    assert not gguf_cache.store_part(tmp_path, "tokenizer", fails)
    assert os.listdir(tmp_path) == []
    assert gguf_cache.cached_part(tmp_path, "tokenizer") is None
