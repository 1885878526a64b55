"""Quality moves the right way on real pretrained models (SmolLM2-135M, all-MiniLM-L6-v2), on small fast settings.
The full comparison with recorded numbers lives in bench/."""

import pytest
import torch

import hfcompress
from tests.tiny_models import fingerprint, minilm_folder, reloaded_outputs, same_outputs

FAST = {"calibration": {"n_samples": 16, "seq_len": 256}, "evaluation": {"seq_len": 256, "n_windows": 8,
                                                                          "speed": False, "samples": False}}


@pytest.fixture(scope="module")
def smollm2_results(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("wanda") / "out"
    results = {}
    for key, step, output in [("magnitude", {"method": "magnitude", "sparsity": 0.5}, {}),
                              ("wanda", {"method": "wanda", "sparsity": 0.5}, {"dir": str(out)}),
                              ("wanda-2:4", {"method": "wanda", "pattern": "2:4"}, {}),
                              ("sparsegpt", {"method": "sparsegpt", "sparsity": 0.5}, {}),
                              ("dsnot", {"method": "dsnot", "sparsity": 0.5, "cycles": 20}, {})]:
        results[key] = hfcompress.compress({"model": smollm2, "steps": [step], **FAST, "output": output},
                                           log=lambda line: None)
    return results, out


def test_sparsegpt_and_dsnot_beat_wanda_beats_magnitude_and_unstructured_beats_2_4(smollm2_results):
    results, _ = smollm2_results
    dense = results["wanda"].before["perplexity"]
    ppl = {key: result.after["perplexity"] for key, result in results.items()}
    print(f"SmolLM2-135M perplexity: dense {dense:.2f}, " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    assert 10 < dense < 60
    assert ppl["wanda"] < 3 * dense                 # Wanda 50 %: roughly doubles perplexity on this small model
    assert ppl["magnitude"] > 3 * ppl["wanda"]      # magnitude 50 % is far worse
    assert ppl["wanda"] < ppl["wanda-2:4"] < ppl["magnitude"] * 2
    assert ppl["sparsegpt"] < ppl["wanda"]          # error compensation beats no update at the same sparsity
    assert ppl["dsnot"] < 0.95 * ppl["wanda"]       # refining Wanda's mask by prune-and-grow beats the mask


def test_saved_smollm2_reloads_with_identical_logits_and_reports_its_size(smollm2_results, tmp_path):
    results, out = smollm2_results
    result = results["wanda"]
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert result.after["size_bytes"] == on_disk and 400e6 < on_disk < 700e6  # fp32, tied embeddings: ~538 MB
    expected = fingerprint(result.model)
    for loader, logits in reloaded_outputs(str(out), tmp_path).items():
        assert same_outputs(logits, expected), loader


SENTENCES = ["A man is eating food.", "The cat sits on the warm windowsill.", "Stock markets fell sharply today.",
             "She plays the violin in an orchestra.", "The weather will be sunny tomorrow.",
             "Heavy rain flooded the streets of the old town.", "He repaired the bicycle with a new chain.",
             "Scientists discovered a new species of frog."]


def _embeddings(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state                      # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_encoder_keeps_its_sentence_embeddings():
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    dense = _embeddings(BertModel.from_pretrained(minilm_folder()), tokenizer)
    similarity, measured = {}, {}
    for method in ("magnitude", "wanda"):
        result = hfcompress.compress({"model": minilm_folder(), "steps": [{"method": method, "sparsity": 0.4}],
                                      "calibration": {"n_samples": 16, "seq_len": 128},
                                      "evaluation": {"seq_len": 128, "n_windows": 8}}, log=lambda line: None)
        similarity[method] = (_embeddings(result.model, tokenizer) * dense).sum(-1).mean().item()
        measured[method] = result.after["embedding_cosine"]               # the card's number, on book windows
    print(f"all-MiniLM-L6-v2, 40 % sparsity, cosine to dense: {similarity}; measured on the card: {measured}")
    assert similarity["wanda"] > 0.9
    assert similarity["wanda"] > similarity["magnitude"]
    assert 0.5 < measured["magnitude"] < measured["wanda"] < 1


def stored_block_bytes(folder) -> tuple[int, int]:
    """(bytes the blocks' tensors take in the saved files, bytes they would take in fp16)."""
    from safetensors import safe_open

    block_bytes = block_fp16 = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as weights:
            for key in weights.keys():
                if ".layers." not in key:
                    continue
                tensor = weights.get_tensor(key)
                block_bytes += tensor.numel() * tensor.element_size()
                if key.endswith("weight_shape"):
                    block_fp16 += 2 * int(tensor.prod())        # the weight it stands for, in fp16
                elif not key.endswith("weight_scale") and not key.endswith("weight_packed"):
                    block_fp16 += 2 * tensor.numel()            # norms: stored as they are
    return block_bytes, block_fp16


def test_smollm2_layerwise_3_5_bits_and_a_target_size(smollm2, tmp_path):
    """3.5 bits on average over the blocks stores them in under 0.3x fp16; a target size lands within 2 % under."""
    from hfcompress.evaluate import folder_weights_bytes

    base = {"model": smollm2, **FAST, "evaluation": {"enabled": False}}
    step = {"method": "layerwise_quant", "bits": [4, 2], "score": "zd", "group_size": 64}
    hfcompress.compress({**base, "steps": [{**step, "avg_bits": 3.5}], "output": {"dir": str(tmp_path / "avg")}},
                        log=lambda line: None)
    block_bytes, block_fp16 = stored_block_bytes(tmp_path / "avg")
    print(f"SmolLM2-135M at 3.5 bits (4/2): blocks {block_bytes / block_fp16:.3f}x their fp16 size")
    assert block_bytes < 0.3 * block_fp16
    target = 160 * 10**6                              # fp32 embeddings: 4/2 bits reach 146.7 to 173.2 MB
    hfcompress.compress({**base, "steps": [{**step, "target_size": "160MB"}], "output": {"dir": str(tmp_path / "mb")}},
                        log=lambda line: None)
    assert 0.98 * target <= folder_weights_bytes(tmp_path / "mb") <= target


@pytest.fixture(scope="module")
def smollm2_rtn4(smollm2, tmp_path_factory):
    """SmolLM2-135M after `rtn` 4-bit, groups of 64, saved: (result, folder)."""
    out = tmp_path_factory.mktemp("rtn") / "out"
    return hfcompress.compress({"model": smollm2, "steps": [{"method": "rtn", "bits": 4, "group_size": 64}],
                                **FAST, "output": {"dir": str(out)}}, log=lambda line: None), out


def test_smollm2_rtn_4bit_loads_plainly_with_true_bits_and_small_blocks(smollm2_rtn4, tmp_path):
    import json

    result, out = smollm2_rtn4
    dense, quantized = result.before["perplexity"], result.after["perplexity"]
    print(f"SmolLM2-135M perplexity: dense {dense:.2f}, rtn 4-bit g64 {quantized:.2f}")
    assert dense < quantized < 1.5 * dense

    block_bytes, block_fp16 = stored_block_bytes(out)
    assert block_bytes < 0.3 * block_fp16

    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert result.after["size_bytes"] == on_disk
    assert result.after["bits_per_weight"] == pytest.approx(8 * on_disk / result.after["parameters"], abs=1e-3)
    card = (out / "README.md").read_text()
    assert "pip install compressed-tensors" in card and "base_model_relation: quantized" in card
    assert f"| bits per weight | 32.00 | {result.after['bits_per_weight']:.2f} |" in card
    assert json.loads((out / "hfcompress.json").read_text())["loading"]["format"] == "compressed-tensors"

    expected = fingerprint(result.model)
    for loader, logits in reloaded_outputs(str(out), tmp_path).items():
        assert isinstance(logits, torch.Tensor) and same_outputs(logits, expected), loader


def test_smollm2_gptq_4bit_loses_less_than_rtn(smollm2, smollm2_rtn4):
    result = hfcompress.compress({"model": smollm2, "steps": [{"method": "gptq", "bits": 4, "group_size": 64}],
                                  **FAST, "output": {}}, log=lambda line: None)
    dense, ppl = result.before["perplexity"], {"rtn": smollm2_rtn4[0].after["perplexity"],
                                               "gptq": result.after["perplexity"]}
    print(f"SmolLM2-135M perplexity: dense {dense:.2f}, rtn 4-bit {ppl['rtn']:.2f}, gptq 4-bit {ppl['gptq']:.2f}")
    assert dense < ppl["gptq"] and ppl["gptq"] - dense < 0.8 * (ppl["rtn"] - dense)
