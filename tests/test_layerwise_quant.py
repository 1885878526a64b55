"""Layer-wise quantization: the allocation, the scores, and bad options refused before loading."""

import pytest
import torch

import hfcompress
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.errors import InvalidOptionError
from hfcompress.loading import load_model, resolve
from hfcompress.methods.layerwise_quant import allocate_bits, block_importance


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
        return block_importance(model, hfcompress.make_config("layerwise_quant", {"avg_bits": 3, **options}), context)

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
    with pytest.raises(InvalidOptionError, match="give --avg-bits"):
        run(bits=[4, 2])
    with pytest.raises(InvalidOptionError, match="between 2 and 8"):
        run(bits=[9, 2], avg_bits=3)
    with pytest.raises(InvalidOptionError, match="`lim`, `zd`, `random`, `reverse`"):
        run(avg_bits=3, score="magnitude")
    with pytest.raises(InvalidOptionError, match="layer_bits has 2 entries; the model has 3 blocks"):
        run(layer_bits=[4, 2])
    with pytest.raises(InvalidOptionError, match="does not divide"):
        run(avg_bits=3, group_size=48)
