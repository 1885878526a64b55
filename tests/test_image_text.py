"""Image-text models (CLIP, LLaVA) calibrated on image-caption pairs: pruned end to end with ecoflap, wanda,
sparsegpt and dsnot, reloaded in a fresh process with the same outputs, LLaVA measured by the perplexity of text;
refused before loading without image data; CLIP measured by its embeddings' cosine to the original and its
image-to-caption top-1 on pairs held out from calibration."""

import json

import pytest

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.sequential import find_linears, named_blocks, weight_matrix
from tests.test_methods import check_invariants
from tests.tiny_models import fingerprint, image_folder, reloaded_outputs, same_outputs


def _image_text_recipe(model, images, out, method="ecoflap", **options):
    options = {"max_sparsity": 0.7, **options} if method == "ecoflap" else options
    return {"model": model, "steps": [{"method": method, "sparsity": 0.5, **options}],
            "calibration": {"source": images, "n_samples": 4, "seq_len": 16}, "output": {"dir": str(out)}}


def _reloads_the_same(result, out, tmp_path):
    expected = fingerprint(result.model)
    for loader, reloaded in reloaded_outputs(str(out), tmp_path).items():
        assert same_outputs(reloaded, expected), f"{loader}: {reloaded}"


@pytest.mark.parametrize("model_name,options", [("clip", {}), ("clip", {"order": "zeroth", "perturb": "tensor"}),
                                                ("llava", {}), ("llava", {"order": "zeroth", "perturb": "block"})])
def test_image_text_models_are_pruned_on_image_caption_pairs_and_reload(tiny, tmp_path, model_name, options):
    images = image_folder(tmp_path / "images", 6)
    result = hfcompress.compress(_image_text_recipe(tiny(model_name), images, tmp_path / "out", **options),
                                 log=lambda line: None)
    check_invariants("sparse", hfcompress.make_config("ecoflap", {"sparsity": 0.5, **options}), result)
    stats = result.reports[0].stats
    sparsity = stats["group_sparsity"]
    assert any("vision" in g for g in sparsity) and any("vision" not in g for g in sparsity)  # both towers
    assert len(set(sparsity.values())) > 1 and max(sparsity.values()) <= 0.7 + 1e-9
    layers = [weight_matrix(m) for p, b in named_blocks(result.model) for m in find_linears(b, prefix=p).values()]
    zeros = sum(int((w == 0).sum()) for w in layers) / sum(w.numel() for w in layers)
    assert zeros == pytest.approx(0.5, abs=0.01)                     # tiny rows: rounding per row
    scores = stats["group_scores"]
    unused = {"model.vision_tower.encoder.layers.1"} if model_name == "llava" else set()
    assert stats["score_windows"] == 4 and all((scores[g] == 0) == (g in unused) for g in scores)
    assert all(sparsity[g] == pytest.approx(0.7) for g in unused)     # LLaVA reads the features of the block before
    metadata = json.loads((tmp_path / "out" / "hfcompress.json").read_text())
    assert metadata["calibration"]["image_text_pairs"] == 4 and metadata["steps"][0]["stats"]["group_sparsity"]
    assert (tmp_path / "out" / "processor_config.json").exists()     # the processor travels with the model
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Calibration: 4 image-caption pairs from" in card
    if model_name == "llava":  # it generates text: perplexity of the text alone
        assert result.after["perplexity"] != result.before["perplexity"] and "the text alone (no\nimage)" in card
    else:  # a dual encoder: its embeddings against the original's on the 2 pairs calibration did not draw
        assert "perplexity" not in result.after and "erplexity" not in card
        assert result.before["embedding_cosine"] == 1.0 and 0 < result.after["embedding_cosine"] < 1
        assert 0 <= result.after["image_caption_top1"] <= 1 and "image_caption_top1" in result.before
        assert metadata["evaluation"]["n_windows_used"] == 2 and "over 2 image-caption pairs of" in card
        assert "follow the 4 drawn for calibration (never calibrated on)" in card
        assert f"| image-to-caption top-1 | {result.before['image_caption_top1']:.1%} |" in card
    _reloads_the_same(result, tmp_path / "out", tmp_path)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "dsnot"])
@pytest.mark.parametrize("model_name", ["clip", "llava"])
def test_wanda_sparsegpt_and_dsnot_prune_both_towers_on_image_caption_pairs(tiny, tmp_path, method, model_name):
    images = image_folder(tmp_path / "images", 6)
    result = hfcompress.compress(_image_text_recipe(tiny(model_name), images, tmp_path / "out", method),
                                 log=lambda line: None)
    check_invariants("sparse", hfcompress.make_config(method, {"sparsity": 0.5}), result)
    pruned = {p for p, b in named_blocks(result.model) for m in find_linears(b).values()
              if (weight_matrix(m) == 0).float().mean() > 0.49}
    assert any("vision" in p for p in pruned) and any("vision" not in p for p in pruned)
    if method == "dsnot":                                               # the masks were refined, not only Wanda's
        assert result.reports[0].stats["mean_swaps_per_row"] > 0
    _reloads_the_same(result, tmp_path / "out", tmp_path)


def test_an_image_text_model_without_images_is_refused_before_loading(tiny, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before refusing")

    monkeypatch.setattr(hfcompress.pipeline, "load_tokenizer", no_loading)
    text = tmp_path / "captions.jsonl"
    text.write_text('{"text": "a cat"}\n')
    for source in ("builtin", str(text)):
        with pytest.raises(HfCompressError, match="holds text only; an image-text model calibrates on image-caption"):
            hfcompress.compress(_image_text_recipe(tiny("llava"), source, tmp_path / "o"), log=lambda line: None)


def test_the_cli_takes_an_image_folder_and_says_what_it_calibrates_on(tiny, tmp_path, capsys):
    from hfcompress.cli import main

    images = image_folder(tmp_path / "images", 4)
    code = main(["compress", tiny("llava"), "--method", "ecoflap", "--sparsity", "0.5", "--calib", images,
                 "--image-field", "image", "--n-samples", "4", "--dry-run"])
    assert code == 0 and "calibration: 4 image-caption pairs from " + images in capsys.readouterr().out
    code = main(["compress", tiny("clip"), "--method", "wanda", "--calib", images, "--n-samples", "3",
                 "--eval-windows", "8", "--dry-run"])  # a dual encoder is measured on the pairs after those
    assert code == 0 and f"evaluation: 8 image-caption pairs of {images} after the 3 drawn for calibration, before" \
        in capsys.readouterr().out


def test_clip_is_evaluated_on_the_pairs_after_the_calibration_draw_or_says_why_not(tiny, tmp_path):
    from hfcompress.calibration import encode_pairs, load_image_text_calibration, shuffled_pairs
    from hfcompress.loading import load_tokenizer, resolve
    from hfcompress.pipeline import evaluation_pairs
    from hfcompress.preflight import pairs_origin
    from hfcompress.recipe import Recipe

    images = image_folder(tmp_path / "images", 9)
    processor = load_tokenizer(resolve(tiny("clip")))
    recipe = Recipe.from_dict({**_image_text_recipe(tiny("clip"), images, tmp_path / "o", "wanda"),
                               "evaluation": {"n_windows": 3}})
    every = list(shuffled_pairs(images, 4, 0, "text", "image", "train", None))        # the draw's order, all 9
    calibration = load_image_text_calibration(processor, images, 4, 16, 0)
    assert calibration.input_ids.equal(encode_pairs(processor, every[:4], 16, "text", "image")["input_ids"])
    pairs = evaluation_pairs(processor, recipe, log=print)
    expected = encode_pairs(processor, every[4:7], 16, "text", "image")
    assert pairs_origin(recipe) == {"source": images, "after_calibration_pairs": 4}
    assert pairs["input_ids"].equal(expected["input_ids"]) and pairs["pixel_values"].equal(expected["pixel_values"])
    assert not {r["text"] for r in every[:4]} & {r["text"] for r in every[4:7]}     # captions differ: disjoint pairs

    uncalibrated = Recipe.from_dict({**recipe.to_dict(), "steps": [{"method": "rtn", "bits": 4}]})
    pairs = evaluation_pairs(processor, uncalibrated, log=print)  # nothing drawn: the shuffle's first 3
    assert pairs_origin(uncalibrated)["after_calibration_pairs"] == 0 and pairs["input_ids"].equal(
        encode_pairs(processor, list(shuffled_pairs(images, 3, 0, "text", "image", "train", None).take(3)), 16,
                     "text", "image")["input_ids"])

    lines = []
    text_only = Recipe.from_dict({"model": tiny("clip"), "steps": [{"method": "rtn", "bits": 4}]})
    assert evaluation_pairs(processor, text_only, log=lines.append) is None
    assert "no quality number" in lines[-1] and "'builtin' holds text only" in lines[-1]
    few = Recipe.from_dict({**_image_text_recipe(tiny("clip"), images, tmp_path / "o", "wanda"),
                            "calibration": {"source": images, "n_samples": 9}})
    assert evaluation_pairs(processor, few, log=lines.append) is None and "beyond the 9" in lines[-1]
