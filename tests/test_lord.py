"""LoRD: the factors are the best pairs of their rank (error falls with rank, exact at full rank, activation mode
best on the layer's output), one threshold allocates the ranks, outputs shrink and reload, bad input stops first."""

import pytest
import torch

import hfcompress
from hfcompress.errors import InvalidOptionError
from hfcompress.methods.lord import (
    LordConfig,
    allocate,
    factor,
    pair_params,
    relative_errors,
    spectrum,
    whitening,
)
from tests.tiny_models import fingerprint, reloaded_outputs, same_outputs

CALIBRATION = {"n_samples": 4, "seq_len": 32}


def _layer(seed: int = 0, rows: int = 48, columns: int = 32, tokens: int = 256):
    """A weight (rows, columns) with a decaying spectrum and inputs X (tokens, columns) with correlated channels."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, columns, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(columns, columns, generator=generator))
    weight = u @ torch.diag(0.8 ** torch.arange(columns, dtype=torch.float32)) @ v.T
    mixing = torch.randn(columns, columns, generator=generator) * torch.linspace(0.1, 3, columns)
    return weight, torch.randn(tokens, columns, generator=generator) @ mixing


def test_error_falls_with_rank_and_vanishes_at_full_rank():
    weight, x = _layer()
    whiten = whitening(x.T @ x, damp=1e-6)
    for mode_whiten in (None, whiten):
        errors = []
        for rank in range(1, 33):
            first, second = factor(weight, rank, mode_whiten)
            assert first.shape == (rank, 32) and second.shape == (48, rank)
            errors.append(torch.linalg.norm(weight - second @ first).item())
        assert all(later <= earlier + 1e-5 for earlier, later in zip(errors, errors[1:], strict=False))
        assert errors[-1] < 1e-4 * torch.linalg.norm(weight).item()   # full rank: W itself


def test_relative_errors_are_the_errors_of_the_factors():
    weight, x = _layer(1)
    whiten = whitening(x.T @ x, damp=1e-6)
    for mode_whiten in (None, whiten):
        predicted = relative_errors(spectrum(weight, mode_whiten))       # (33,): e[r] for r = 0..32
        assert predicted[0] == pytest.approx(1.0) and predicted[-1] == 0
        scale = weight if mode_whiten is None else weight @ mode_whiten
        for rank in (4, 12, 24):
            first, second = factor(weight, rank, mode_whiten)
            error = weight - second @ first
            measured = torch.linalg.norm(error if mode_whiten is None else error @ mode_whiten) / torch.linalg.norm(
                scale)
            assert measured.item() == pytest.approx(predicted[rank].item(), rel=1e-3)


def test_activation_mode_preserves_the_output_and_svd_the_weight():
    weight, x = _layer(2)
    svd = factor(weight, 8)
    activation = factor(weight, 8, whitening(x.T @ x, damp=1e-6))
    output_error = {name: torch.linalg.norm((weight - second @ first) @ x.T).item()
                    for name, (first, second) in {"svd": svd, "activation": activation}.items()}
    weight_error = {name: torch.linalg.norm(weight - second @ first).item()
                    for name, (first, second) in {"svd": svd, "activation": activation}.items()}
    assert output_error["activation"] < 0.8 * output_error["svd"]
    assert weight_error["svd"] < weight_error["activation"]


def test_one_threshold_allocates_ranks_by_spectrum_within_the_budget():
    steep = relative_errors(0.5 ** torch.arange(64, dtype=torch.float32))     # energy in a few directions
    flat = relative_errors(torch.ones(64))                                     # energy everywhere
    shapes = {"steep": (64, 256), "flat": (64, 256)}
    total = 2 * 64 * 256
    ranks, threshold = allocate({"steep": steep, "flat": flat}, shapes, multiple=8, keep=int(0.4 * total))
    assert sum(pair_params(r, *shapes[n]) for n, r in ranks.items()) <= 0.4 * total
    assert ranks == {"steep": 8, "flat": 32}   # the most rank where the energy is spread; 8 * 320 + 32 * 320 fits
    assert allocate({"steep": steep, "flat": flat}, shapes, multiple=8, keep=int(0.6 * total))[0] == {
        "steep": 8, "flat": None}  # flat would need rank 56 > 51 (break-even): it stays dense
    for name, errors in {"steep": steep, "flat": flat}.items():
        assert errors[ranks[name]] <= threshold                                 # every layer meets the threshold
    assert allocate({"flat": flat}, {"flat": (64, 256)}, 8, tolerance=0.5)[0]["flat"] == 48  # e(48) = 0.5
    square = allocate({"flat": flat}, {"flat": (64, 64)}, 8, tolerance=0.1)[0]
    assert square == {"flat": None}            # rank 64 > 32 = break-even of a 64x64 layer: it stays dense


def test_bad_input_is_refused_before_loading(tiny, monkeypatch):
    for options, message in [({"reduction": 1.0}, "between 0 and 1"), ({"reduction": 0}, "between 0 and 1"),
                             ({"reduction": 0.2, "tolerance": 0.1}, "give one of"),
                             ({"target_params": "lots"}, "`110M` or `1.2B`"),
                             ({"mode": "pca"}, "svd"), ({"rank_multiple": 0}, "rank_multiple")]:
        with pytest.raises(InvalidOptionError, match=message):
            LordConfig(**options) if "mode" not in options else hfcompress.make_config("lord", options)
    monkeypatch.setattr("hfcompress.pipeline.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    for options, message in [({"targets": ["*nothing*"]}, "match no Linear layer"),
                             ({"reduction": 0.95}, "cannot be reached: .* removes at most"),
                             ({"target_params": "1M"}, "cannot be reached"),
                             ({"target_params": "5M"}, "asks for no saving"),
                             ({"rank_multiple": 64}, "no targeted layer gets smaller")]:
        with pytest.raises(InvalidOptionError, match=message):
            hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "lord", **options}]},
                                log=lambda line: None)


def test_svd_mode_needs_no_calibration_and_the_card_shows_the_ranks(tiny, tmp_path):
    lines = []
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "lord", "mode": "svd"}],
                                  "evaluation": {"seq_len": 64, "n_windows": 2, "speed": False, "samples": False},
                                  "output": {"dir": str(tmp_path / "out")}}, log=lines.append)
    assert not any(line.startswith("calibration") for line in lines)
    stats = result.reports[0].stats
    assert stats["reduction"] >= 0.2 and set(stats["ranks"]) == {
        name for name, module in result.model.named_modules() if name.endswith("_proj") and "." in name}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "rank_map.png" in card and (tmp_path / "out" / "rank_map.png").stat().st_size > 1000
    assert "trust_remote_code=True" in card


def test_factors_quantize_and_reload(tiny, tmp_path):
    """lord then gptq: the factors are quantized (rank multiple 16 = group size), stored packed in the remote-code
    form, and load to the same logits with trust_remote_code and with hfcompress.load."""
    out = tmp_path / "out"
    result = hfcompress.compress({"model": tiny("qwen2"), "steps": [
        {"method": "lord", "rank_multiple": 16}, {"method": "gptq", "bits": 4, "group_size": 16}],
        "calibration": CALIBRATION, "evaluation": {"enabled": False}, "output": {"dir": str(out)}},
        log=lambda line: None)
    quantized = result.structure.of_kind("quantized")
    factored = result.structure.of_kind("lowrank")
    assert factored and all(f"{name}.first" in quantized and f"{name}.second" in quantized for name in factored)
    reloaded = reloaded_outputs(str(out), tmp_path)
    assert "trust_remote_code=True" in reloaded.pop("transformers")
    for loader, logits in reloaded.items():
        assert isinstance(logits, torch.Tensor) and same_outputs(logits, fingerprint(result.model)), loader
    with pytest.raises(InvalidOptionError, match="after an earlier step made it quantized"):
        hfcompress.compress({"model": tiny("qwen2"), "steps": [{"method": "rtn", "bits": 4}, {"method": "lord"}]},
                            log=lambda line: None)


def test_factors_take_a_mixed_precision_allocation(tiny, tmp_path):
    """lord then layerwise_quant: the blocks' factors get the bits of their block, and the output reloads."""
    out = tmp_path / "out"
    result = hfcompress.compress({"model": tiny("llama"), "steps": [
        {"method": "lord", "mode": "svd", "rank_multiple": 16},
        {"method": "layerwise_quant", "layer_bits": [8, 4, 2], "group_size": 16}],
        "evaluation": {"enabled": False}, "calibration": CALIBRATION, "output": {"dir": str(out)}},
        log=lambda line: None)
    bits = result.structure.of_kind("quantized")
    for name in result.structure.of_kind("lowrank"):
        block = int(name.split(".")[2])
        assert bits[f"{name}.first"]["bits"] == bits[f"{name}.second"]["bits"] == [8, 4, 2][block], name
    reloaded = reloaded_outputs(str(out), tmp_path)
    assert same_outputs(reloaded["hfcompress"], fingerprint(result.model))
