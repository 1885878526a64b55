import pytest
import torch

from hfcompress.errors import HfCompressError, InvalidOptionError
from hfcompress.methods.magnitude import MagnitudeConfig
from hfcompress.methods.wanda import WandaConfig, wanda_score
from hfcompress.sparsity import keep_mask, layer_keep_mask, parse_pattern


def test_row_mask_prunes_exactly_the_lowest_share_of_every_row():
    score = torch.rand(16, 40)
    keep = keep_mask(score, 0.5, None)
    assert (keep.sum(1) == 20).all()
    for row in range(16):  # every kept score beats every pruned score of its row
        assert score[row][keep[row]].min() > score[row][~keep[row]].max()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_zeroes_n_of_every_m(n, m):
    score = torch.rand(8, 32)
    keep = keep_mask(score, n / m, (n, m)).reshape(8, 32 // m, m)
    assert ((~keep).sum(-1) == n).all()
    groups = score.reshape(8, 32 // m, m)
    assert (groups.masked_fill(~keep, float("inf")).amin(-1) >= groups.masked_fill(keep, -1).amax(-1)).all()


def test_equal_scores_drop_the_lower_column_first():
    """As the reference Wanda and DSnoT code's stable sort does: ties are common in weights dequantized from a GGUF."""
    assert not keep_mask(torch.ones(3, 1536), 0.6, None)[:, :921].any()
    score = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0]])
    assert keep_mask(score, 0.5, None).tolist() == [[True, False, False, False, False, True, True, True]]
    assert keep_mask(score, 0.5, (2, 4)).tolist() == [[True, False, False, True, False, True, False, True]]


def test_layer_mask_is_global_threshold():
    score = torch.arange(100.0).reshape(10, 10)
    keep = layer_keep_mask(score, 0.3)
    assert keep.sum() == 70 and not keep.flatten()[:30].any()


def test_wanda_score_scales_columns_by_input_norm():
    weight = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    score = wanda_score(weight, torch.tensor([4.0, 1.0]))
    assert torch.equal(score, torch.tensor([[2.0, 2.0], [6.0, 1.0]]))


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "[0, 1)"),
    ({"sparsity": -0.1}, "[0, 1)"),
    ({"pattern": "4:4"}, "0 < N < M"),
    ({"pattern": "5:4"}, "0 < N < M"),
    ({"pattern": "half"}, "unstructured"),
    ({"pattern": "2:4", "sparsity": 0.3}, "contradicts"),
])
def test_bad_pruning_options_are_refused_with_the_valid_choices(kwargs, message):
    with pytest.raises(InvalidOptionError, match=message.replace("[", r"\[").replace(")", r"\)")):
        WandaConfig(**kwargs)


def test_errors_are_value_errors_and_hfcompress_errors():
    with pytest.raises(ValueError):
        MagnitudeConfig(scope="column")
    assert issubclass(InvalidOptionError, HfCompressError)


def test_ratio_follows_pattern():
    assert WandaConfig(pattern="2:4").ratio == 0.5
    assert WandaConfig(pattern="1:4").ratio == 0.25
    assert WandaConfig().ratio == 0.5
    assert parse_pattern("unstructured") is None


def test_sparsegpt_compensates_the_pruning_error_and_keeps_exact_row_sparsity():
    from hfcompress.methods.sparsegpt import block_drop_counts, sparsegpt_prune
    from hfcompress.methods.wanda import wanda_score

    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)                  # correlated inputs (tokens, in)
    weight = torch.randn(32, 64)
    hessian = 2 * x.t() @ x
    keep, updated = sparsegpt_prune(weight, hessian, 0.5, None, block_size=16)
    assert (keep.sum(1) == 32).all() and torch.equal(updated == 0, ~keep)
    wanda_keep = keep_mask(wanda_score(weight, x.pow(2).sum(0)), 0.5, None)

    def error(w):  # ||(W - W_hat) X^T||^2 over the calibration tokens
        return ((weight - w) @ x.t()).pow(2).sum().item()

    assert error(updated) < 0.8 * error(weight * wanda_keep)
    assert block_drop_counts(100, 16, 0.5) == [8, 8, 8, 8, 8, 8, 2] and sum(block_drop_counts(576, 128, 0.7)) == 403
    keep, same = sparsegpt_prune(weight, hessian, 0.0, None)         # nothing to prune: nothing changes
    assert keep.all() and torch.allclose(same, weight)
    keep, _ = sparsegpt_prune(weight, hessian, 0.5, (2, 4), block_size=16)
    assert (keep.reshape(32, 16, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.7])
def test_row_mask_drops_what_a_stable_sort_drops(sparsity):
    """The selection shortcut (k-th value, then ties by column) against its definition, on scores full of ties."""
    generator = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (64, 96), generator=generator).float()  # six distinct values: ties at every cut
    score[3] = 1.0
    score[5, 7] = float("nan")
    k = int(96 * sparsity)
    expected = torch.ones_like(score, dtype=torch.bool).scatter_(1, score.argsort(dim=1, stable=True)[:, :k], False)
    assert torch.equal(keep_mask(score, sparsity, None), expected)
