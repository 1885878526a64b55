"""ECoFLaP: the budget allocation (exact, bounded, monotone), the stage-1 scores on a tiny model (zeroth order agrees
with first order when it perturbs little at a time; the RNG and the weights are left as they were), and the
per-block ratios that stage 2 applies."""

import pytest
import torch

import hfcompress
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.errors import HfCompressError
from hfcompress.loading import load_model, resolve
from hfcompress.methods import ecoflap
from hfcompress.methods.ecoflap import allocate, directional_derivative, model_loss, zeroth_order_scores
from hfcompress.sequential import find_linears, named_blocks, weight_matrix
from hfcompress.streamed import StreamedLoss, streamed_gradient_sums
from tests.tiny_models import image_folder


def _kept(sizes, ratios):
    return sum((1 - r) * n for n, r in zip(sizes, ratios, strict=True))


@pytest.mark.parametrize("sparsity,bound", [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.5, 0.5), (0.3, 0.95)])
def test_allocation_spends_the_budget_exactly_within_the_bound(sparsity, bound):
    sizes = [1000, 3000, 500, 2500, 800]
    scores = [5.0, 1.0, 0.0, 40.0, 2.0]
    ratios = allocate(sizes, scores, sparsity, bound)
    assert _kept(sizes, ratios) == pytest.approx((1 - sparsity) * sum(sizes), rel=1e-9)
    assert all(0 <= r <= bound + 1e-12 for r in ratios)
    assert ratios[2] == pytest.approx(bound)                        # a zero score keeps only the floor
    if bound > sparsity:
        assert ratios[3] <= ratios[0] < ratios[1]                   # higher score per weight, lower sparsity


def test_allocation_is_monotone_in_the_scores_and_uniform_for_scores_proportional_to_size():
    sizes, scores = [1000, 2000, 1500, 500], [3.0, 1.0, 2.0, 4.0]
    before = allocate(sizes, scores, 0.6, 0.75)
    for group in range(4):
        raised = list(scores)
        raised[group] *= 1.5
        after = allocate(sizes, raised, 0.6, 0.75)
        assert after[group] <= before[group] + 1e-12                # more score never means more sparsity
        assert all(after[g] >= before[g] - 1e-12 for g in range(4) if g != group)
    assert allocate(sizes, [float(n) for n in sizes], 0.6, 0.7) == pytest.approx([0.6] * 4)
    full = allocate([10, 10], [1e9, 0.0], 0.2, 0.9)                 # the capped group's surplus flows on
    assert full[0] == 0.0 and _kept([10, 10], full) == pytest.approx(16)


@pytest.fixture(scope="module")
def llama(tiny):
    model = load_model(resolve(tiny("llama")), "float32")
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    return model, windows


def _weights(model):
    return {name: layer.weight.data for prefix, block in named_blocks(model)
            for name, layer in find_linears(block, prefix=prefix).items()}


def test_perturbation_restores_the_weights_and_leaves_the_global_rng_alone(llama):
    model, windows = llama
    weights = _weights(model)
    before = {n: w.clone() for n, w in weights.items()}
    state = torch.random.get_rng_state()
    loss = StreamedLoss(model, list(windows.split(1)), torch.device("cpu"), ecoflap.causal_lm_loss)
    d1 = directional_derivative(weights, 7, 1e-3, lambda: loss(0))
    d2 = directional_derivative(weights, 7, 1e-3, lambda: loss(0))
    assert d1 == d2 and d1 != 0                                      # the same seed, the same direction
    assert all(torch.equal(before[n], w) for n, w in weights.items())  # restored bit for bit
    assert torch.equal(state, torch.random.get_rng_state())


def test_replaying_the_blocks_before_the_perturbed_one_gives_the_whole_model_loss(llama):
    model, windows = llama
    loss = StreamedLoss(model, list(windows.split(1)), torch.device("cpu"), ecoflap.causal_lm_loss)
    loss.record()
    clean = loss(1)
    layers = model.model.layers
    block = layers[2].mlp.down_proj.weight.data
    original = block.clone()
    block.add_(0.05 * torch.randn(block.shape, generator=torch.Generator().manual_seed(3)))
    try:                                   # blocks 0 and 1 replay their recorded outputs; block 2 runs perturbed
        assert loss(1, layers[2]) == pytest.approx(loss(1), rel=1e-6) and loss(1) != pytest.approx(clean)
    finally:
        block.copy_(original)
    assert "forward" not in vars(model.model.layers[0])                 # the replay is undone


def test_zeroth_order_tensor_scores_follow_the_first_order_gradient_norms(llama):
    model, windows = llama
    weights = _weights(model)
    params = {name: layer.weight for prefix, block in named_blocks(model)
              for name, layer in find_linears(block, prefix=prefix).items()}
    first = streamed_gradient_sums(model, list(windows.split(1)), torch.device("cpu"), ecoflap.causal_lm_loss, params)
    assert all(p.requires_grad for p in model.parameters())          # gradient flags as they were
    config = hfcompress.make_config("ecoflap", {"sparsity": 0.5, "order": "zeroth", "perturb": "tensor",
                                                "noise_samples": 2})
    block_of = {name: block for prefix, block in named_blocks(model) for name in find_linears(block, prefix=prefix)}
    streamed = StreamedLoss(model, list(windows.split(1)), torch.device("cpu"), ecoflap.causal_lm_loss)
    zeroth = zeroth_order_scores(weights, {n: [n] for n in weights}, block_of, streamed, config)
    # |z . g| estimates ||g||_2 per tensor, first order sums |g|: ranks agree (Spearman) on most tensors
    names = list(weights)
    a = torch.tensor([first[n] / weights[n].numel() ** 0.5 for n in names]).argsort().argsort().float()
    b = torch.tensor([zeroth[n] for n in names]).argsort().argsort().float()
    rho = 1 - 6 * (a - b).pow(2).sum() / (len(names) * (len(names) ** 2 - 1))
    print(f"rank correlation {rho:.3f}")
    assert rho > 0.6


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "bert", "clip", "llava"])
def test_streamed_gradients_equal_one_backward_pass_of_the_whole_model(tiny, tmp_path, name):
    model = load_model(resolve(tiny(name)), "float32")
    if name in ("clip", "llava"):
        from hfcompress.calibration import load_image_text_calibration
        from hfcompress.loading import load_tokenizer

        calibration = load_image_text_calibration(load_tokenizer(resolve(tiny(name))),
                                                  image_folder(tmp_path / "images", 4), 3, 16, seed=0)
    else:
        calibration = CalibrationData(torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(4)))
    batches = ecoflap.stage1_batches(model, calibration, 3)
    params = {name: layer.weight for prefix, block in named_blocks(model)
              for name, layer in find_linears(block, prefix=prefix).items()}
    loss = model_loss(model)
    streamed = streamed_gradient_sums(model, batches, torch.device("cpu"), loss, params)
    whole = dict.fromkeys(params, 0.0)
    for batch in batches:                                          # plain autograd, the whole model at once
        grads = torch.autograd.grad(loss(model, batch), list(params.values()), allow_unused=True)
        for key, grad in zip(params, grads, strict=True):
            whole[key] += 0.0 if grad is None else grad.abs().sum().item() / len(batches)
    assert streamed.keys() == whole.keys() and sum(v > 0 for v in whole.values()) >= len(whole) - 6
    for key in whole:
        assert streamed[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-12), key


@pytest.mark.parametrize("options", [
    {"sparsity": 0.6, "order": "zeroth"},                            # zeroth order, all weights at once
    {"sparsity": 0.6, "aggregate": "mean"},                          # first order (the default)
    {"sparsity": 0.5, "order": "zeroth", "perturb": "block", "max_sparsity": 0.8, "local": "sparsegpt"},
    {"sparsity": 0.5, "order": "zeroth", "perturb": "tensor", "grouping": "tensor", "score_windows": 2},
])
def test_blocks_are_pruned_at_their_allocated_ratios_and_the_total_is_the_target(tiny, options):
    model = load_model(resolve(tiny("llama")), "float32")
    calibration = CalibrationData(torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(1)))
    config = hfcompress.make_config("ecoflap", options)
    report = hfcompress.available_methods()["ecoflap"].transform(model, config, Context(calibration=calibration))
    layers = {n: weight_matrix(m) for p, b in named_blocks(model) for n, m in find_linears(b, prefix=p).items()}
    zeros = sum(int((w == 0).sum()) for w in layers.values())
    total = sum(w.numel() for w in layers.values())
    assert zeros / total == pytest.approx(config.ratio, abs=0.005)  # tiny rows: rounding per row
    sparsity = report.stats["group_sparsity"]
    assert max(sparsity.values()) <= config.bound + 1e-9 and len(set(sparsity.values())) > 1
    for name, weight in layers.items():                              # every layer at its group's ratio, per row
        group = name if options.get("grouping") == "tensor" else name.rsplit(".", 2)[0]
        expected = round(weight.shape[1] * sparsity[group])             # the nearest count
        assert ((weight == 0).sum(1) == expected).all(), name
    assert report.stats["stage1_forward_passes"] > 0 and report.stats["order"] == options.get("order", "first")


@pytest.mark.parametrize("options,message", [
    ({"sparsity": 0.95}, "max_sparsity"),                            # sparsity + the default bound above 1
    ({"sparsity": 0.5, "max_sparsity": 0.4}, "max_sparsity must be in"),
    ({"sparsity": 0.5, "grouping": "layer"}, "valid: `block`, `tensor`"),
    ({"sparsity": 0.5, "order": "second"}, "valid: `zeroth`, `first`"),
    ({"pattern": "2:4"}, "unstructured"),
    ({"sparsity": 0.5, "order": "zeroth", "perturb": "block", "grouping": "tensor"}, "grouping: block"),
    ({"sparsity": 0.5, "noise_samples": 0}, "noise_samples"),
])
def test_bad_options_are_refused_before_loading(options, message):
    with pytest.raises(HfCompressError, match=message):
        hfcompress.make_config("ecoflap", options)


@pytest.mark.parametrize("order", ["first", "zeroth"])
def test_an_encoder_is_scored_by_its_sentence_embedding_objective(tiny, order):
    model = load_model(resolve(tiny("bert")), "float32")
    calibration = CalibrationData(torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(2)))
    config = hfcompress.make_config("ecoflap", {"sparsity": 0.5, "order": order, "perturb": "block"})
    report = hfcompress.available_methods()["ecoflap"].transform(model, config, Context(calibration=calibration))
    assert report.stats["stage1_forward_passes"] == 2 * (1 if order == "first" else 3)  # one batch, 3 blocks
    assert all(score > 0 for score in report.stats["group_scores"].values())
    single = CalibrationData(torch.randint(0, 1000, (1, 24)))
    with pytest.raises(HfCompressError, match="at least 2"):
        hfcompress.available_methods()["ecoflap"].transform(model, config, Context(calibration=single))


def test_fewer_calibration_windows_than_score_windows_is_said_before_loading(tiny):
    from hfcompress.preflight import preflight

    lines = []
    preflight(hfcompress.Recipe.from_dict({"model": tiny("llama"), "steps": [{"method": "ecoflap"}],
                                           "calibration": {"n_samples": 3, "seq_len": 16}}), log=lines.append)
    assert "note: ecoflap scores on the 3 calibration windows there are (score_windows 8; --n-samples 3)" in lines
