"""The CUDA path: same masks as on the CPU, and device memory bounded by one block. Skipped without a GPU."""

import pytest
import torch

import hfcompress
from hfcompress.calibration import CalibrationData
from hfcompress.context import Context
from hfcompress.errors import ModelLoadError
from hfcompress.loading import load_model, pick_device, resolve
from hfcompress.sequential import find_linears, named_blocks, weight_matrix

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="sees no GPU"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


def _weights(model):
    return {n: weight_matrix(layer).detach().cpu() for p, b in named_blocks(model) for n, layer in
            find_linears(b, prefix=p).items()}


@needs_gpu
@pytest.mark.parametrize("method,options", [("wanda", {"sequential": False}),
                                            ("dsnot", {"sequential": False, "cycles": 10}),
                                            ("sparsegpt", {"sequential": False}),
                                            ("gptq", {"bits": 4}),
                                            ("ecoflap", {"sequential": False, "order": "zeroth"})])
def test_cuda_and_cpu_give_the_same_result_and_the_model_stays_on_the_cpu(tiny, method, options):
    ids = torch.randint(0, 30000, (4, 32), generator=torch.Generator().manual_seed(0))
    on_cpu, on_gpu = (load_model(resolve(tiny("llama")), "float32") for _ in range(2))
    config, transform = hfcompress.make_config(method, options), hfcompress.available_methods()[method].transform
    transform(on_cpu, config, Context(calibration=CalibrationData(ids), device=torch.device("cpu")))
    transform(on_gpu, config, Context(calibration=CalibrationData(ids), device=torch.device("cuda")))
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    cpu_weights, gpu_weights = _weights(on_cpu), _weights(on_gpu)

    def agree(a, b):  # pruning: the same zeros; quantization: the same values, up to float rounding
        return (a != 0) == (b != 0) if method != "gptq" else (a - b).abs() <= 1e-5 * a.abs().max()

    same = sum(agree(cpu_weights[n], gpu_weights[n]).sum().item() for n in cpu_weights) / sum(
        w.numel() for w in cpu_weights.values())
    assert same > (0.999 if method in ("wanda", "dsnot") else 0.99)  # GPU matmuls round differently
    # (ecoflap: the block scores round differently too, and a share that moves by a weight per row moves a mask)


@needs_gpu
@pytest.mark.parametrize("method,options", [("wanda", {}), ("ecoflap", {"order": "zeroth", "perturb": "block",
                                                                      "score_windows": 1}),
                                            ("ecoflap", {"score_windows": 1})])
def test_peak_gpu_memory_is_about_one_block(tiny, tmp_path, method, options):
    """3.5 GB of weights on the CPU; the GPU holds the embeddings while the first block's inputs are captured, then
    one block at a time, plus the (small) calibration activations. ECoFLaP's stage-1 passes (zeroth order) and its
    backward pass (first order, the default) stream the blocks the same way."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=16,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    outer_bytes = total_bytes - block_bytes * config.num_hidden_layers
    ids = torch.randint(0, 32000, (8, 128))
    torch.cuda.reset_peak_memory_stats()
    config, transform = hfcompress.make_config(method, options), hfcompress.available_methods()[method].transform
    transform(model, config, Context(calibration=CalibrationData(ids), device=torch.device("cuda")))
    peak = torch.cuda.max_memory_allocated()
    print(f"weights {total_bytes / 2**20:.0f} MiB, outside the blocks {outer_bytes / 2**20:.0f} MiB, "
          f"one block {block_bytes / 2**20:.0f} MiB, peak GPU {peak / 2**20:.0f} MiB")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert peak < outer_bytes + 3 * block_bytes < total_bytes / 6
