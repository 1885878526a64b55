"""Measurements: perplexity agrees with transformers' own loss, an encoder's window embeddings are its mean-pooled
final hidden states whatever head it has, and streaming a model leaves it intact."""

import math

import torch

from hfcompress.evaluate import parameter_count, perplexity, streamed, window_embeddings
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


def test_window_embeddings_are_the_mean_final_hidden_states_with_or_without_a_head(tiny):
    import transformers

    encoder = load_model(resolve(tiny("bert")), "float32")                        # BertModel
    with_head = transformers.BertForMaskedLM(encoder.config).eval()  # no last_hidden_state: hidden_states[-1]
    with_head.bert.load_state_dict(encoder.state_dict(), strict=False)            # no pooler in the masked-LM model
    windows = _windows(3, 16) % encoder.config.vocab_size
    with torch.no_grad():
        expected = torch.stack([encoder(input_ids=w[None]).last_hidden_state[0].mean(0) for w in windows])
    for model in (encoder, with_head):
        assert torch.allclose(window_embeddings(model, windows, torch.device("cpu")), expected, atol=1e-5)


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


def test_speed_is_measured_when_eos_is_a_list_and_there_is_no_pad_token(tiny):
    """Llama-3-Instruct style generation configs: eos_token_id [a, b], no pad_token_id."""
    from hfcompress.evaluate import pad_token_id, tokens_per_second

    model = load_model(resolve(tiny("llama")), "float32")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [1, 2], None
    assert pad_token_id(model.generation_config) == 1
    speed = tokens_per_second(model, _windows(1, 40), torch.device("cpu"), new_tokens=4, repeats=1)
    assert speed["prefill_tokens_per_s"] > 0 and speed.get("decode_tokens_per_s", 1) > 0
    model.generation_config.pad_token_id = 0  # a pad id of 0 is a real id, not "missing"
    assert pad_token_id(model.generation_config) == 0


def test_decode_speed_is_left_out_rather_than_absurd_when_noise_swamps_it(tiny, monkeypatch):
    """A stall while timing the 1-token generation must not turn into billions of tokens/s."""
    import time

    from hfcompress.evaluate import tokens_per_second

    model = load_model(resolve(tiny("llama")), "float32")
    generate = model.generate

    def stalled(*args, **kwargs):
        if kwargs["max_new_tokens"] == 1:
            time.sleep(0.3)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", stalled)
    speed = tokens_per_second(model, _windows(1, 40), torch.device("cpu"), new_tokens=4, repeats=1)
    assert "decode_tokens_per_s" not in speed and speed.get("prefill_tokens_per_s", 1) > 0  # busy machine: unsettled


def test_tokens_per_second_is_published_only_when_the_fastest_timings_agree():
    """Timings that keep drifting (each run 20 % faster than the one before: the fastest three never agree) leave
    the number out and say why, in the metrics and under the table; steady ones are published."""
    import time

    from hfcompress.evaluate import SPREAD, format_table, timed_speed

    cpu = torch.device("cpu")
    drifting = iter(0.03 * 0.8 ** i for i in range(100))
    steady_decode = lambda n: time.sleep(0.005 * n)  # noqa: E731
    speed = timed_speed(lambda: time.sleep(next(drifting)), steady_decode, 64, cpu, new_tokens=8)
    assert "prefill_tokens_per_s" not in speed and speed["decode_tokens_per_s"] > 0
    assert f"did not agree within {SPREAD:.0%}" in speed["speed_note"] and "prefill" in speed["speed_note"]
    table = format_table({"prefill_tokens_per_s": 100.0}, speed)
    assert "| prefill tokens/s | 100 | not settled |" in table and "after: prefill tokens/s left out" in table
    assert "prefill" not in format_table({"prefill_tokens_per_s": 100.0}, {})          # not measured: no row

    steady = timed_speed(lambda: time.sleep(0.01), steady_decode, 64, cpu, new_tokens=8)
    assert "speed_note" not in steady and abs(steady["prefill_tokens_per_s"] - 6400) < 6400 * 0.2
    assert abs(steady["decode_tokens_per_s"] - 200) < 200 * 0.2  # 7 tokens in 35 ms


def test_before_numbers_whose_tokens_per_s_never_settled_are_measured_again(tiny, monkeypatch):
    import hfcompress
    from hfcompress import pipeline

    calls = []
    measure = pipeline.measure

    def unsettled(*args, **kwargs):  # as on a busy machine: the timings never agreed
        calls.append(kwargs["desc"])
        return {**measure(*args, **kwargs), "speed_note": "prefill tokens/s left out: ..."}

    monkeypatch.setattr(pipeline, "measure", unsettled)
    recipe = {"model": tiny("llama"), "steps": [{"method": "magnitude"}],
              "evaluation": {"seq_len": 32, "n_windows": 2, "samples": False}}
    hfcompress.compress(recipe, log=lambda line: None)
    second = hfcompress.compress(recipe, log=lambda line: None)
    assert calls == ["before", "after", "before", "after"] and not second.metadata["evaluation"]["before_cached"]


def test_a_second_run_reads_the_before_numbers_and_a_changed_setting_measures_again(tiny, tmp_path, monkeypatch):
    import hfcompress
    from hfcompress import pipeline

    calls = []
    measure = pipeline.measure
    monkeypatch.setattr(pipeline, "measure", lambda *a, **k: calls.append(k["desc"]) or measure(*a, **k))
    recipe = {"model": tiny("llama"), "steps": [{"method": "magnitude"}],
              "evaluation": {"seq_len": 32, "n_windows": 2, "speed": False}}
    first = hfcompress.compress(recipe, log=lambda line: None)
    lines = []
    second = hfcompress.compress(recipe, log=lines.append)
    assert calls == ["before", "after", "after"] and second.before == first.before
    assert second.metadata["evaluation"]["before_cached"] and any("earlier run" in line for line in lines)
    hfcompress.compress({**recipe, "evaluation": {**recipe["evaluation"], "n_windows": 3}}, log=lambda line: None)
    hfcompress.compress({**recipe, "evaluation": {**recipe["evaluation"], "remeasure": True}}, log=lambda line: None)
    assert calls[3:] == ["before", "after", "before", "after"]
    import shutil

    changed = tmp_path / "changed"  # a copy of the same weights reads them too (by content, not by path) ...
    shutil.copytree(tiny("llama"), changed)
    hfcompress.compress({**recipe, "model": str(changed)}, log=lambda line: None)
    hfcompress.compress({**recipe, "model": str(changed), "steps": [{"method": "magnitude", "sparsity": 0.3}]},
                        log=lambda line: None)
    build = __import__("tests.tiny_models", fromlist=["build"]).build
    build("llama", changed, seed=1)  # ... and other weights in the same place are measured again
    hfcompress.compress({**recipe, "model": str(changed)}, log=lambda line: None)
    assert calls[7:] == ["after", "after", "before", "after"]
    quantized = hfcompress.compress({**recipe, "steps": [{"method": "rtn", "bits": 8}]}, log=lambda line: None)
    assert calls[11:] == ["after"] and quantized.before["perplexity"] == first.before["perplexity"]  # any method
    assert "nominal_bits" in quantized.before and "sparsity" not in quantized.before
    assert "sparsity" in first.before and "nominal_bits" not in first.before


def test_an_encoder_is_measured_by_its_embeddings_cosine_to_the_original_even_with_cached_before_numbers(tiny):
    import hfcompress

    recipe = {"model": tiny("bert"), "evaluation": {"seq_len": 32, "n_windows": 4}}
    lines = []
    results = [hfcompress.compress({**recipe, "steps": [{"method": "magnitude", "sparsity": s}]}, log=lines.append)
               for s in (0.2, 0.2, 0.8)]
    assert any("earlier run" in line for line in lines)                          # the second and third read it
    cosine = [r.after["embedding_cosine"] for r in results]
    assert all(r.before["embedding_cosine"] == 1.0 and "perplexity" not in r.after for r in results)
    assert cosine[0] == cosine[1] and 0 < cosine[2] < cosine[0] < 1             # more pruning, further away


def test_eval_of_a_quantized_output_measures_the_model_as_it_was_saved(tiny, tmp_path):
    import hfcompress
    from hfcompress.pipeline import evaluate_model
    from hfcompress.recipe import EvaluationSpec, ModelSpec

    evaluation = {"seq_len": 32, "n_windows": 2, "speed": False}
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "layerwise_quant", "bits": [8, 4, 2],
                                                                     "layer_bits": [8, 4, 2], "group_size": 32}],
                                  "evaluation": evaluation, "output": {"dir": str(tmp_path / "out")}},
                                 log=lambda line: None)
    metrics = evaluate_model(ModelSpec(id=str(tmp_path / "out")), EvaluationSpec(**evaluation))
    assert metrics["perplexity"] == result.after["perplexity"]  # the same model, from its packed integers
    assert metrics["nominal_bits"] == result.after["nominal_bits"]
    assert metrics["size_bytes"] == result.after["size_bytes"]
