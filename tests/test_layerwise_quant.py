"""Layer-wise quantization: the allocation, the scores, and bad options refused before loading."""

import pytest
import torch

import hfcompress
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.errors import InvalidOptionError
from hfcompress.evaluate import folder_weights_bytes
from hfcompress.loading import load_model, resolve
from hfcompress.methods.layerwise_quant import allocate_bits, block_importance, size_cost, size_model
from hfcompress.sequential import find_linears, named_blocks, weight_matrix
from tests.tiny_models import fingerprint, reloaded_outputs, same_outputs


def test_allocation_is_exact_monotone_and_as_in_the_paper():
    assert allocate_bits(list(range(30)), (4, 2), 3.5).count(4) == 22      # 22.5 blocks of 30 at 4 bits, rounded down
    assert allocate_bits([0.3, 0.1, 0.2, 0.0], (4, 2), 3.5) == [4, 4, 4, 2]  # three quarters at 4 bits
    assert allocate_bits([3, 1, 2, 0], (8, 4, 2), 6) == [8, 4, 8, 4]        # average exactly 6
    assert allocate_bits([3, 1, 2, 0], (8, 4, 2), 2) == [2] * 4
    assert allocate_bits([3, 1, 2, 0], (8, 4, 2), 8) == [8] * 4
    torch.manual_seed(0)
    for levels, target in [((4, 2), 2.9), ((8, 4, 2), 4.7), ((6, 4, 3, 2), 3.3)]:
        importance = torch.rand(12).tolist()
        bits = allocate_bits(importance, levels, target)
        assert sum(bits) / 12 <= target and set(bits) <= set(levels)
        assert sum(bits) / 12 > target - (min(levels[i] - levels[i + 1] for i in range(len(levels) - 1))) / 12
        ranked = sorted(zip(importance, bits, strict=True))
        assert [b for _, b in ranked] == sorted(b for _, b in ranked)     # more important: never fewer bits


def test_scores_rank_every_block_and_their_variants_reorder_them(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    context = Context(calibration=CalibrationData(torch.randint(0, 30000, (2, 16),
                                                                generator=torch.Generator().manual_seed(0))))

    def scores(**options):
        return block_importance(model, options.pop("score"), context, **options)

    lim = scores(score="lim")
    assert list(lim) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(-1 <= -v <= 1 for v in lim.values())                       # minus a mean cosine
    assert scores(score="reverse") == {k: -v for k, v in lim.items()}
    low, high = scores(score="zd"), scores(score="zd", zd_direction="high")
    assert low == {k: -v for k, v in high.items()} and all(0 < v < 0.5 for v in high.values())
    assert scores(score="random", shuffle_seed=1) == scores(score="random", shuffle_seed=1)
    assert sorted(scores(score="random").values()) == [0.0, 1.0, 2.0]


def test_bad_layerwise_options_are_refused_before_loading(tiny, monkeypatch):
    monkeypatch.setattr("hfcompress.pipeline.load_model", lambda *a, **k: pytest.fail("weights were loaded"))

    def run(**step):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "layerwise_quant", **step}]},
                            log=lambda line: None)

    with pytest.raises(InvalidOptionError, match="two or more bit levels"):
        run(bits=[4], avg_bits=4)
    with pytest.raises(InvalidOptionError, match=r"outside the levels' range \[2, 4\]"):
        run(bits=[4, 2], avg_bits=5)
    with pytest.raises(InvalidOptionError, match="give one of --avg-bits .* or --target-size"):
        run(bits=[4, 2])
    with pytest.raises(InvalidOptionError, match="give one of --avg-bits .* or --target-size"):
        run(bits=[4, 2], avg_bits=3, target_size="1MB")
    with pytest.raises(InvalidOptionError, match="is not valid; write e.g. `100MB`"):
        run(target_size="100 parsecs")
    for target in ("15MB", "15.8MB"):  # the tiny model's files reach 15.675-15.703 MB with 4,2 (fp32 embeddings)
        with pytest.raises(InvalidOptionError, match=r"outside what the levels \[4, 2\] reach: 15\.675 MB \(every "
                                                     r"block at 2 bits\) to 15\.703 MB"):
            run(target_size=target)
    with pytest.raises(InvalidOptionError, match="between 2 and 8"):
        run(bits=[9, 2], avg_bits=3)
    with pytest.raises(InvalidOptionError, match="`lim`, `zd`, `random`, `reverse`"):
        run(avg_bits=3, score="magnitude")
    with pytest.raises(InvalidOptionError, match="layer_bits has 2 entries; the model has 3 blocks"):
        run(layer_bits=[4, 2])
    with pytest.raises(InvalidOptionError, match="does not divide"):
        run(avg_bits=3, group_size=48)


def test_target_size_lands_at_or_under_the_weight_files(tiny, tmp_path):
    model = load_model(resolve(tiny("llama")), "float32")
    config = hfcompress.make_config("layerwise_quant", {"target_size": "1MB"})
    names = [name for name, _ in named_blocks(model)]
    fixed, per_block = size_model(model, config, torch.float32)
    cost = size_cost(fixed, per_block, names)
    step = per_block[names[0]][4] - per_block[names[0]][2]            # one block from 2 to 4 bits
    target = cost([2, 2, 2]) + int(1.5 * step)                       # room for one block at 4 bits, not two
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "layerwise_quant", "target_size":
                                  str(target)}], "output": {"dir": str(tmp_path / "out")}}, log=lambda line: None)
    on_disk = folder_weights_bytes(tmp_path / "out")
    stats = result.reports[0].stats
    assert sorted(stats["block_bits"]) == [2, 2, 4]
    assert target - step < on_disk <= stats["planned_bytes"] <= target
    assert stats["planned_bytes"] - on_disk < 0.01 * on_disk          # the header estimate is close and never short
    quantized = result.structure.of_kind("quantized")                 # every layer at its block's bit-width
    for block, bits in zip(names, stats["block_bits"], strict=True):
        assert {quantized[name]["bits"] for name in find_linears(model.get_submodule(block), prefix=block)} == {bits}
    nominal = sum(stats["block_bits"]) / 3
    assert result.after["nominal_bits"] == pytest.approx(nominal, abs=1e-4) and result.before["nominal_bits"] == 32
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| nominal bits (block Linear weights) | 32.00 | 2.67 |" in card
    for png in ("block_bits.png", "block_importance.png"):
        assert f"]({png})" in card and (tmp_path / "out" / png).stat().st_size > 1000


@pytest.mark.parametrize("first", [{"method": "wanda", "sparsity": 0.5}, {"method": "dsnot", "sparsity": 0.5}])
@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_quantizing_a_pruned_model_keeps_its_zeros(tiny, tmp_path, first, quantizer):
    steps = [first, {"method": "layerwise_quant", "layer_bits": [4, 2, 8], "quantizer": quantizer}]
    result = hfcompress.compress({"model": tiny("llama"), "steps": steps, "output": {"dir": str(tmp_path / "out")},
                                  "calibration": {"n_samples": 4, "seq_len": 32}}, log=lambda line: None)
    for prefix, block in named_blocks(result.model):
        for name, layer in find_linears(block, prefix=prefix).items():
            zeros = (weight_matrix(layer) == 0).sum(1)
            assert (zeros >= weight_matrix(layer).shape[1] // 2).all(), name   # the mask survived, row by row
    assert result.structure.modules["model.layers.0.mlp.up_proj"].keys() >= {"sparse", "quantized"}
    assert result.after["sparsity"] >= 0.5                            # (2-bit rounding adds zeros of its own)
    for loader, reloaded in reloaded_outputs(str(tmp_path / "out"), tmp_path).items():
        assert isinstance(reloaded, torch.Tensor) and same_outputs(reloaded, fingerprint(result.model)), loader


def test_bit_widths_without_serving_kernels_are_warned_about(tiny, tmp_path):
    lines = []
    hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "rtn", "bits": 3}], "output":
                         {"dir": str(tmp_path / "out")}, "evaluation": {"enabled": False}}, log=lines.append)
    assert any(line.startswith("warning: 3-bit layers have no vLLM kernel") for line in lines)
    assert "Note: 3-bit layers have no vLLM kernel" in (tmp_path / "out" / "README.md").read_text()
    lines.clear()
    hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "rtn", "bits": 4}], "evaluation":
                         {"enabled": False}}, log=lines.append)
    assert not any("kernel" in line for line in lines)


def test_importance_command_ranks_the_blocks_and_draws_them(tiny, tmp_path, monkeypatch, capsys):
    from hfcompress.cli import main

    plot = tmp_path / "zd.png"
    assert main(["importance", tiny("llama"), "--score", "zd", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "block", "score"] and len(lines) == 5 and plot.stat().st_size > 1000
    ranked = [float(line.split()[2]) for line in lines[1:4]]
    assert ranked == sorted(ranked, reverse=True)                       # most important first
    assert main(["importance", tiny("llama"), "--n-samples", "2", "--seq-len", "16", "--plot", ""]) == 0
    assert "model.layers.2" in capsys.readouterr().out
    monkeypatch.setattr("hfcompress.importance.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SystemExit) as exit_:                          # the command line: before torch is imported
        main(["importance", tiny("llama"), "--score", "magnitude"])
    assert exit_.value.code == 2
    assert "invalid choice: 'magnitude' (choose from 'lim', 'zd', 'random', 'reverse')" in capsys.readouterr().err
    from hfcompress.errors import InvalidOptionError
    from hfcompress.importance import rank_blocks
    from hfcompress.recipe import ModelSpec

    with pytest.raises(InvalidOptionError, match="valid: `lim`, `zd`, `random`, `reverse`"):  # Python: no weights
        rank_blocks(ModelSpec(id=tiny("llama")), "magnitude")
