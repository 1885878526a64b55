import json

import pytest
import torch

from hfcompress.calibration import cut_windows, load_calibration, read_text
from hfcompress.errors import CalibrationError
from tests.tiny_models import tokenizer


def test_builtin_calibration_and_evaluation_texts_are_different_books():
    calibration, evaluation = read_text("builtin", "calibration"), read_text("builtin", "evaluation")
    assert len(calibration) > 500_000 and len(evaluation) > 200_000
    assert "Time Traveller" in calibration and "Baskerville" in evaluation
    assert evaluation[1000:1200] not in calibration


def test_windows_are_reproducible_and_distinct():
    tok = tokenizer()
    a = load_calibration(tok, "builtin", 8, 64, seed=1)
    b = load_calibration(tok, "builtin", 8, 64, seed=1)
    c = load_calibration(tok, "builtin", 8, 64, seed=2)
    assert a.input_ids.shape == (8, 64) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert len({tuple(row.tolist()) for row in a.input_ids}) == 8
    assert a.info == {"source": "builtin", "n_samples": 8, "seq_len": 64, "seed": 1, "tokens": 512}


def test_local_txt_and_jsonl_sources(tmp_path):
    tok = tokenizer()
    txt = tmp_path / "notes.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert load_calibration(tok, str(txt), 4, 32, seed=0).input_ids.shape == (4, 32)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record {i} says hello to the world"}) for i in range(300)))
    assert load_calibration(tok, str(jsonl), 4, 32, seed=0, text_field="body").input_ids.shape == (4, 32)
    with pytest.raises(CalibrationError, match="no field 'text'"):
        load_calibration(tok, str(jsonl), 4, 32, seed=0)
    array = tmp_path / "array.json"
    array.write_text('["a", "b"]')
    with pytest.raises(CalibrationError, match="line 1 is not a JSON object"):
        load_calibration(tok, str(array), 4, 32, seed=0)


def test_datasets_source_from_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of a tiny local dataset"})
                                                  for i in range(400)))
    data = load_calibration(tokenizer(), str(folder), 4, 32, seed=0)
    assert data.input_ids.shape == (4, 32)


def test_datasets_subset_and_split_are_honoured(tmp_path):
    """A dataset with two configurations (subsets) and train/test splits, declared the Hub way in README.md."""
    folder = tmp_path / "two_subsets"
    for subset in ("small", "large"):
        (folder / subset).mkdir(parents=True)
        for split in ("train", "test"):
            (folder / subset / f"{split}.jsonl").write_text(
                "\n".join(json.dumps({"text": f"{subset} {split} row {i}"}) for i in range(50)))
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
                      f"  - split: test\n    path: {s}/test.jsonl\n" for s in ("small", "large"))
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    assert read_text(str(folder), subset="large", split="test").startswith("large test row 0")
    assert read_text(str(folder), subset="small").startswith("small train row 0")
    with pytest.raises(CalibrationError, match="subset 'medium'"):
        read_text(str(folder), subset="medium")


def test_too_little_text_and_missing_files_are_clear_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(CalibrationError, match="enough for 0 windows of 32.*lower --n-samples or --seq-len"):
        load_calibration(tokenizer(), str(short), 4, 32, seed=0)
    with pytest.raises(CalibrationError, match="enough for 2 windows of 4.*3 were requested"):
        cut_windows(torch.arange(10), 4, 3, seed=0, what="x")
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))


def _processor(tiny, name):
    from hfcompress.loading import load_tokenizer, resolve

    return load_tokenizer(resolve(tiny(name)))


def test_image_caption_pairs_from_an_image_folder(tiny, tmp_path):
    from hfcompress.calibration import load_image_text_calibration
    from tests.tiny_models import image_folder

    folder = image_folder(tmp_path / "images", 6)
    clip = load_image_text_calibration(_processor(tiny, "clip"), folder, 4, 5, seed=0)
    again = load_image_text_calibration(_processor(tiny, "clip"), folder, 4, 5, seed=0)
    other = load_image_text_calibration(_processor(tiny, "clip"), folder, 4, 5, seed=1)
    assert clip.extra["pixel_values"].shape == (4, 3, 32, 32) and clip.input_ids.shape[1] <= 5  # captions cut
    assert torch.equal(clip.input_ids, again.input_ids) and not torch.equal(clip.input_ids, other.input_ids)
    assert clip.info["image_text_pairs"] == 4 and clip.info["tokens"] == int(clip.extra["attention_mask"].sum())
    llava = load_image_text_calibration(_processor(tiny, "llava"), folder, 3, 5, seed=0)
    image_token = _processor(tiny, "llava").image_token_id
    assert ((llava.input_ids == image_token).sum(1) == 16).all()  # never cut: one placeholder per patch feature
    for index, single in enumerate(llava.batches()):               # one pair per batch, its padding left out
        assert single["input_ids"].shape[1] == int(llava.extra["attention_mask"][index].sum())
        assert single["attention_mask"].all() and single["pixel_values"].shape == (1, 3, 32, 32)
    padded = llava.batch(range(3))
    assert padded["input_ids"].shape == llava.input_ids.shape == padded["attention_mask"].shape


def test_image_text_sources_that_cannot_serve_are_clear_errors(tiny, tmp_path):
    from hfcompress.calibration import load_image_text_calibration
    from tests.tiny_models import image_folder

    processor = _processor(tiny, "clip")
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "hello"}\n')
    for source in ("builtin", str(text)):
        with pytest.raises(CalibrationError, match="holds text only.*image folder.*--image-field"):
            load_image_text_calibration(processor, source, 2, 8, seed=0)
    folder = image_folder(tmp_path / "images", 3)
    with pytest.raises(CalibrationError, match="no column 'caption'; columns: \\['image', 'text'\\]"):
        load_image_text_calibration(processor, folder, 2, 8, seed=0, text_field="caption")
    with pytest.raises(CalibrationError, match="has 3 image-caption pairs but 5 were requested"):
        load_image_text_calibration(processor, folder, 5, 8, seed=0)
    with pytest.raises(CalibrationError, match="no image processor"):
        load_image_text_calibration(tokenizer(), folder, 2, 8, seed=0)
