import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard

import hfcompress


def test_card_metadata_table_usage_and_recipe(tiny, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny("qwen2"), source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    out = tmp_path / "out"
    result = hfcompress.compress({"model": str(source), "steps": [{"method": "wanda", "sparsity": 0.5}],
                                  "calibration": {"n_samples": 4, "seq_len": 32},
                                  "evaluation": {"seq_len": 64, "n_windows": 2, "speed": True},
                                  "output": {"dir": str(out)}}, log=lambda line: None)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "mit"  # carried over from the base model's card
    assert {"hfcompress", "wanda"} <= set(data["tags"])
    assert "model-index" not in data  # the built-in book is no Hub dataset: no dataset entry
    assert f"{result.after['perplexity']:.2f}" in card.text
    samples = [line for line in card.text.splitlines() if line.startswith("| The capital of France is |")]
    assert len(samples) == 1 and "Greedy answers to fixed prompts" in card.text  # a person can judge the answers
    assert [s["prompt"] for s in result.after["samples"]] == [s["prompt"] for s in result.before["samples"]]
    assert "*The Hound of the Baskervilles*" in card.text
    assert "sequential: true" in card.text and "sequential=True" not in card.text  # steps read like the recipe
    assert (out / "recipe.yaml").is_file()  # the card says to rerun it
    assert "_model_name_or_path" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "hfcompress.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    for row in ("| perplexity |", "| size (MB) |", "| parameters (M) |", "| sparsity (block Linear weights) |",
                "| bits per weight |"):
        assert row in card.text
    for speed in ("prefill tokens/s", "decode tokens/s"):  # a tiny model's milliseconds may be too unsteady to publish
        assert f"| {speed} |" in card.text or f"{speed} left out" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "plain transformers" in card.text
    assert "](sparsity_map.png)" in card.text and (out / "sparsity_map.png").stat().st_size > 1000

    # the card's recipe is the exact recipe (the one in recipe.yaml), and it rebuilds the same steps
    recipe = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert recipe == yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe == json.loads((out / "hfcompress.json").read_text())["recipe"]
    assert hfcompress.Recipe.from_dict(recipe).steps == [hfcompress.make_config("wanda", {"sparsity": 0.5})]


def test_card_for_the_builtin_gguf_names_the_hub_base_model():
    from hfcompress.card import render_card

    metadata = {"family": "causal-lm", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "source": "builtin:smollm2-135m", "steps": [{"method": "magnitude", "paper": "p", "description": "d"}],
                "recipe": {"model": {"id": "builtin:smollm2-135m"}}, "output": {"push_to": "me/smol-mag"}}
    card = ModelCard(render_card(metadata))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'from_pretrained("me/smol-mag")' in card.text
    assert "GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`, dequantized on load" in card.text


def test_a_hub_dataset_gets_a_model_index_that_parses():
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from hfcompress.card import render_card

    metadata = {"family": "causal-lm", "base_model": "HuggingFaceTB/SmolLM2-135M", "source": "x",
                "steps": [{"method": "wanda", "paper": "p", "description": "d"}], "recipe": {"model": {"id": "x"}},
                "evaluation": {"source": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1", "split": "test",
                               "seq_len": 512, "n_windows_used": 4},
                "metrics": {"after": {"perplexity": 20.5}, "before": {"perplexity": 18.0}}}
    card = ModelCard(render_card(metadata))
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert results[0].dataset_type == "Salesforce/wikitext" and results[0].metric_value == 20.5
    assert results[0].dataset_config == "wikitext-2-raw-v1"
    assert "`Salesforce/wikitext` (wikitext-2-raw-v1) text" in card.text
    metadata["evaluation"]["source"] = "./my_eval.jsonl"  # a local file: no dataset entry
    assert "model-index" not in ModelCard(render_card(metadata)).data.to_dict()


def test_an_unpushed_card_says_what_the_placeholder_is_and_a_push_removes_the_note(tmp_path):
    from hfcompress.card import render_card
    from hfcompress.hub import UNPUSHED_NOTE, _files

    metadata = {"family": "causal-lm", "source": "x", "steps": [], "recipe": {"model": {"id": "x"}}}
    (tmp_path / "README.md").write_text(render_card(metadata))
    assert UNPUSHED_NOTE in (tmp_path / "README.md").read_text()
    (readme,) = _files(str(tmp_path), "me/pushed", None)
    assert UNPUSHED_NOTE.encode() not in readme.path_or_fileobj and b'"me/pushed"' in readme.path_or_fileobj


def test_an_encoder_card_shows_its_embedding_cosine_and_claims_no_perplexity_or_speed(tiny, tmp_path):
    out = tmp_path / "out"
    hfcompress.compress({"model": tiny("bert"), "steps": [{"method": "magnitude"}], "output": {"dir": str(out)}},
                        log=lambda line: None)
    card = (out / "README.md").read_text()
    assert "| sparsity (block Linear weights) |" in card and "Size: bytes of the stored weights" in card
    assert "erplexity" not in card and "okens/s" not in card
    assert "| embedding cosine to the original | 1.0000 |" in card and "Embedding cosine: each window's" in card


def test_a_bf16_checkpoint_is_measured_in_fp32_on_cpu_and_saved_in_bf16(tmp_path):
    import torch
    from safetensors import safe_open

    from tests.tiny_models import build

    source = tmp_path / "bf16"
    build("llama", source)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(source)
    out = tmp_path / "out"
    result = hfcompress.compress({"model": str(source), "steps": [{"method": "magnitude"}],
                                  "evaluation": {"seq_len": 64, "n_windows": 2, "speed": False},
                                  "output": {"dir": str(out)}}, log=lambda line: None)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert abs(result.before["size_bytes"] - source_bytes) < 0.01 * source_bytes
    assert abs(result.after["size_bytes"] - source_bytes) < 0.01 * source_bytes
    assert result.before["bits_per_weight"] == 16
    card = (out / "README.md").read_text()
    assert "Computed in float32; the weights are stored in bfloat16" in card
    from hfcompress.pipeline import evaluate_model
    from hfcompress.recipe import EvaluationSpec, ModelSpec

    measured = evaluate_model(ModelSpec(str(source)), EvaluationSpec(seq_len=64, n_windows=2, speed=False))
    assert measured["size_bytes"] == source_bytes and measured["bits_per_weight"] == pytest.approx(16, abs=0.05)


def test_a_card_from_older_metadata_still_warns_about_evaluating_on_calibration_text():
    from hfcompress.card import render_card

    metrics = {"perplexity": 10.0, "size_bytes": 1, "parameters": 1, "sparsity": 0.0, "bits_per_weight": 32.0}
    metadata = {"family": "causal-lm", "source": "org/base", "steps": [{"method": "wanda", "paper": "p",
                                                                        "description": "d"}],
                "recipe": {"model": {"id": "org/base"}}, "metrics": {"before": metrics, "after": metrics},
                "calibration": {"source": "my.txt", "n_samples": 4, "seq_len": 8, "seed": 0},
                "evaluation": {"source": "my.txt", "seq_len": 8, "n_windows_used": 2}}
    assert "(the calibration text itself: optimistic)" in render_card(metadata)
    metadata["evaluation"]["on_calibration_text"] = False
    assert "kept apart from the calibration text" in render_card(metadata)
