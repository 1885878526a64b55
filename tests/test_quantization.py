"""Quantization maths and storage: the grid, group sizes, and packing that compressed-tensors reads back."""

import pytest
import torch

from hfcompress.errors import InvalidOptionError, UnsupportedModelError
from hfcompress.formats.compressed_tensors import pack_int32
from hfcompress.quantization import dequantize, quantize, resolve_group_size, symmetric_scales


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_is_what_compressed_tensors_unpacks(bits):
    unpack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers").unpack_from_int32
    torch.manual_seed(bits)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 96), dtype=torch.int8)
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-96 * bits // 32))
    assert torch.equal(unpack(packed, bits, torch.Size(q.shape)), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_error_is_at_most_half_a_step(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    scale = symmetric_scales(weight, bits, 32, torch.float32)                       # (16, 4)
    q = quantize(weight, scale, bits)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    error = (dequantize(q, scale) - weight).abs().reshape(16, 4, 32)
    assert (error <= scale.unsqueeze(-1) / 2 + 1e-6).all()
    if bits <= 4:
        assert len(q.unique()) == 2 ** bits                                         # every level in use


def test_scales_are_rounded_to_the_storage_dtype_and_zero_groups_stay_zero():
    weight = torch.randn(4, 64)
    weight[0, :32] = 0
    scale = symmetric_scales(weight, 4, 32, torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float()) and scale[0, 0] == 1
    assert (dequantize(quantize(weight, scale, 4), scale)[0, :32] == 0).all()


def test_group_size_auto_and_explicit():
    assert resolve_group_size({576, 1536}, "auto") == 64         # SmolLM2-135M: 576 takes 64, not 128
    assert resolve_group_size({4096, 11008}, "auto") == 128
    assert resolve_group_size({576}, "96") == 96
    with pytest.raises(InvalidOptionError, match=r"does not divide the targeted widths \[576\].*64"):
        resolve_group_size({576, 1536}, "128")
    with pytest.raises(UnsupportedModelError, match="no power of two"):
        resolve_group_size({24}, "auto")


def test_bad_quantization_options_name_the_valid_ones():
    import hfcompress

    with pytest.raises(InvalidOptionError, match="between 2 and 8"):
        hfcompress.make_config("rtn", {"bits": "9"})
    with pytest.raises(InvalidOptionError, match="one bit-width"):
        hfcompress.make_config("rtn", {"bits": "4,2"})
    with pytest.raises(InvalidOptionError, match="`auto` or a positive number"):
        hfcompress.make_config("rtn", {"group_size": "big"})
    with pytest.raises(InvalidOptionError, match="gptq quantizes every layer to one bit-width"):
        hfcompress.make_config("gptq", {"bits": "4,2"})
    with pytest.raises(InvalidOptionError, match="damp must be > 0"):
        hfcompress.make_config("gptq", {"damp": "0"})


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_stays_on_the_grid_and_halves_the_output_error_of_rtn(act_order):
    from hfcompress.methods.gptq import gptq_quantize

    torch.manual_seed(0)
    x = torch.randn(2048, 128) @ torch.randn(128, 128)                 # correlated inputs (tokens, in)
    x[:, 5] = 0                                                         # a dead input channel
    weight = torch.randn(64, 128)
    q, scale = gptq_quantize(weight, 2 * x.t() @ x, 4, 32, torch.bfloat16, block_size=48, act_order=act_order)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and scale.shape == (64, 4)
    assert torch.equal(scale, scale.to(torch.bfloat16).float()) and (q[:, 5] == 0).all()
    rtn_scale = symmetric_scales(weight, 4, 32, torch.bfloat16)

    def error(w):  # ||(W - W_hat) X^T||^2 over the calibration tokens
        return ((weight - w) @ x.t()).pow(2).sum().item()

    assert error(dequantize(q, scale)) < 0.6 * error(dequantize(quantize(weight, rtn_scale, 4), rtn_scale))
