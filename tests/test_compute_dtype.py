"""The compute dtype: blocks run their calibration passes in it, statistics stay fp32, and weights stay exactly
what they were unless the method changes them."""

import pytest
import torch

import hfcompress
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.loading import compute_dtype, load_model, native_bf16, resolve
from hfcompress.sequential import find_linears, named_blocks, run_blocks
from hfcompress.statistics import InputStatistics


def _batches(n=2, seq_len=16):
    return list(torch.randint(1, 1000, (n, seq_len), generator=torch.Generator().manual_seed(0)).split(1))


def test_statistics_of_bf16_passes_are_fp32_sums_of_the_bf16_activations(tiny):
    """A one-block model computing in bf16: what each Linear receives is bf16, and the accumulated squares are the
    fp32 sums of exactly those values (a statistic accumulated in bf16 would differ)."""
    model = load_model(resolve(tiny("llama")), "float32")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    seen, sums = {}, {}

    def process(step):
        layers = find_linears(step.block, prefix=step.name)
        hooks = [layer.register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(a[0]))
                 for name, layer in layers.items()]
        with InputStatistics(layers, ("sq_sum", "hessian")) as stats:
            step.run()
        for hook in hooks:
            hook.remove()
        sums.update({name: (stats.sq_sum(name), stats.hessian(name)) for name in layers})

    run_blocks(model, _batches(), "cpu", process, compute_dtype=torch.bfloat16)
    for name, inputs in seen.items():
        assert all(x.dtype == torch.bfloat16 for x in inputs), name
        reference = sum(x.float().reshape(-1, x.shape[-1]).pow(2).sum(0) for x in inputs)
        sq_sum, hessian = sums[name]
        assert sq_sum.dtype == hessian.dtype == torch.float32
        assert torch.allclose(sq_sum, reference, rtol=1e-6, atol=0), name
        exact = sum(x.double().reshape(-1, x.shape[-1]).T @ x.double().reshape(-1, x.shape[-1]) for x in inputs)
        assert (hessian - exact).abs().max() <= 1e-6 * exact.abs().max(), name  # fp32 sums of the bf16 values
        lossy = sum(x.reshape(-1, x.shape[-1]).pow(2).sum(0) for x in inputs)        # summed in bf16
        assert not torch.equal(lossy.float(), reference), name                    # the test can tell them apart


def test_bf16_passes_leave_unchanged_weights_bit_identical_and_prune_at_full_precision(tiny):
    model = load_model(resolve(tiny("qwen2")), "float32")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    context = Context(calibration=CalibrationData(torch.cat(_batches(4, 32)), {}), compute_dtype=torch.bfloat16)
    context.run_blocks(model, lambda step: step.run())                   # passes only, nothing changed
    assert all(torch.equal(p, before[name]) and p.dtype == torch.float32 for name, p in model.named_parameters())

    from hfcompress.methods.wanda import WandaConfig, wanda

    wanda(model, WandaConfig(sparsity=0.5), context)
    for prefix, block in named_blocks(model):
        for name, layer in find_linears(block, prefix=prefix).items():
            weight, original = layer.weight, before[f"{name}.weight"]
            kept = weight != 0
            assert weight.dtype == torch.float32 and torch.equal(weight[kept], original[kept]), name  # not rounded
            assert kept.float().mean().item() == pytest.approx(0.5, abs=0.02), name


def test_compute_dtype_option_and_auto_detection(tiny, monkeypatch):
    assert compute_dtype("float32", torch.device("cpu")) == torch.float32
    assert compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    flags = "flags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    monkeypatch.setattr("builtins.open", _fake_cpuinfo(flags))
    assert native_bf16(torch.device("cpu")) and compute_dtype("auto", torch.device("cpu")) == torch.bfloat16
    two_four, half = hfcompress.make_config("wanda", {"pattern": "2:4"}), hfcompress.make_config("wanda", {})
    assert compute_dtype("auto", torch.device("cpu"), [half, hfcompress.make_config("rtn", {})]) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cpu"), [half, two_four]) == torch.float32  # N:M choices: near-ties
    assert compute_dtype("bfloat16", torch.device("cpu"), [two_four]) == torch.bfloat16  # asked for: honoured
    monkeypatch.setattr("builtins.open", _fake_cpuinfo("flags\t\t: fpu sse avx2 avx512f\n"))
    assert not native_bf16(torch.device("cpu")) and compute_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.undo()
    with pytest.raises(hfcompress.HfCompressError, match="valid: `auto`"):
        hfcompress.compress({"model": {"id": tiny("llama"), "compute_dtype": "int8"},
                             "steps": [{"method": "magnitude"}]}, log=lambda line: None)


def _fake_cpuinfo(text: str):
    import io

    real = open

    def fake(path, *args, **kwargs):
        return io.StringIO(text) if path == "/proc/cpuinfo" else real(path, *args, **kwargs)

    return fake


def test_the_card_and_metadata_record_the_compute_dtype(tiny, tmp_path):
    result = hfcompress.compress({"model": {"id": tiny("llama"), "compute_dtype": "bfloat16"},
                                  "steps": [{"method": "wanda", "sparsity": 0.5}],
                                  "calibration": {"n_samples": 4, "seq_len": 32}, "evaluation": {"enabled": False},
                                  "output": {"dir": str(tmp_path / "out")}}, log=lambda line: None)
    assert result.metadata["dtype"] == {"compute": "float32", "saved": "float32", "passes": "bfloat16"}
    assert "calibration passes ran in bfloat16" in (tmp_path / "out" / "README.md").read_text()


def test_hessian_products_in_bf16_only_for_bf16_values():
    """With `bf16_values` a CPU with native bf16 multiplies in bf16 (exact for bf16 numbers); without it the
    products stay fp32, which matters: bf16 products of fp32 data would be off by 1e-3 of the scale."""
    from hfcompress.statistics import add_gram_upper

    x = torch.randn(512, 300, generator=torch.Generator().manual_seed(0))
    for data, flag in ((x.bfloat16().float(), True), (x, False)):
        exact = data.double().T @ data.double()
        gram = torch.triu(add_gram_upper(None, data, bf16_values=flag)).double()
        assert (gram - torch.triu(exact)).abs().max() <= 1e-6 * exact.abs().max(), flag
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # the setting is put back
