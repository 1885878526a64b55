"""ONNX export: every kind of change on tiny models, the output run in ONNX Runtime in a fresh process (no torch, no
hfcompress) against the model in PyTorch; native MatMulNBits against float; bad input before any work."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.export import ExportError, export_onnx
from hfcompress.export.nbits import block_scales, kernel_layout, pack_blocks
from hfcompress.formats import read_metadata
from tests.tiny_models import build, fingerprint

pytest.importorskip("onnxruntime")

# Runs the export the way its card says, with onnxruntime and numpy only: logits of ids 1..16 on an empty cache,
# then 4 greedy tokens (an encoder: its last hidden state).
RUN_ONNX = """
import sys, numpy as np, onnxruntime as ort
folder, out = sys.argv[1], sys.argv[2]
assert "torch" not in sys.modules
session = ort.InferenceSession(folder + "/model.onnx")
names, inputs = [o.name for o in session.get_outputs()], {i.name: i for i in session.get_inputs()}
ids = np.arange(1, 17)[None]
if "position_ids" not in inputs:
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    np.save(out, session.run(None, {k: v for k, v in feed.items() if k in inputs})[0])
    sys.exit()
cache = {n: np.zeros([1, int(i.shape[1]), 0, int(i.shape[3])], np.float32) for n, i in inputs.items()
         if n.startswith("input.cache.")}
past, step, tokens = 0, ids, []
for _ in range(5):
    positions = np.arange(past, past + step.shape[1])[None]
    result = dict(zip(names, session.run(names, {"input_ids": step, "position_ids": positions, **cache})))
    if past == 0:
        np.save(out, result["logits"])
    cache = {"input." + k[len("output."):]: v for k, v in result.items() if k.startswith("output.cache.")}
    past, step = past + step.shape[1], result["logits"][:, -1:].argmax(-1)
    tokens.append(int(step[0, 0]))
print(tokens)
"""


def run_in_fresh_process(folder, tmp_path) -> tuple[torch.Tensor, str]:
    out = tmp_path / "onnx_logits.npy"
    done = subprocess.run([sys.executable, "-c", RUN_ONNX, str(folder), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.from_numpy(np.load(out)), done.stdout


def compress(tiny_folder, steps, out):
    return hfcompress.compress({"model": tiny_folder, "steps": steps, "calibration": {"n_samples": 4, "seq_len": 32},
                                "evaluation": {"enabled": False}, "output": {"dir": str(out)}}, log=lambda line: None)


# (tiny model, steps, what the export's report must show)
CASES = {
    "dense-llama": ("llama", [], {}),
    "wanda-bert": ("bert", [{"method": "wanda", "sparsity": 0.5}], {}),
    "rtn4-qwen3": ("qwen3", [{"method": "rtn", "bits": 4, "group_size": 32}], {"MatMulNBits 4-bit, block 32": 21}),
    "gptq3-g16-qwen2": ("qwen2", [{"method": "gptq", "bits": 3, "group_size": 16}],
                        {"MatMulNBits 4-bit, block 16": 21}),
    "mixed-8-4-2-llama": ("llama", [{"method": "layerwise_quant", "bits": [8, 4, 2], "layer_bits": [8, 4, 2],
                                     "group_size": 64}],
                          {"MatMulNBits 8-bit, block 64": 7, "MatMulNBits 4-bit, block 64": 7,
                           "MatMulNBits 2-bit, block 64": 7}),
    "attention-drop-llama": ("llama", [{"method": "layer_drop", "drop": "attention", "n": 2}], {}),
    "mlp-drop-then-rtn-mistral": ("mistral", [{"method": "layer_drop", "drop": "mlp", "n": 1},
                                              {"method": "rtn", "bits": 8, "group_size": 32}],
                                  {"MatMulNBits 8-bit, block 32": 18}),
    "block-drop-qwen3": ("qwen3", [{"method": "layer_drop", "drop": "block", "n": 1}], {}),
    "lord-llama": ("llama", [{"method": "lord", "mode": "svd", "reduction": 0.3}], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_runs_in_onnx_runtime_like_the_model(case, tiny, tmp_path):
    model_name, steps, kernels = CASES[case]
    source = tiny(model_name)
    if steps:
        compress(source, steps, tmp_path / "compressed")
        source = str(tmp_path / "compressed")
    out = tmp_path / "onnx"
    report = export_onnx(source, str(out), speed=False, log=lambda line: None)

    assert {"model.onnx", "model.onnx.data", "README.md", "hfcompress.json", "config.json"} <= {
        p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    counted = {}
    for kind in report["kernels"].values():
        counted[kind] = counted.get(kind, 0) + 1
    assert counted == kernels
    validation = report["validation"]
    assert validation["max_abs_difference"] <= validation["tolerance"]
    metadata = json.loads((out / "hfcompress.json").read_text())
    assert metadata["onnx"]["kernels"] == report["kernels"] and metadata["loading"]["format"] == "onnx"
    assert "## Validation" in (out / "README.md").read_text()

    expected = fingerprint(hfcompress.load(source, dtype=torch.float32))  # the saved model, in PyTorch
    got, printed = run_in_fresh_process(out, tmp_path)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= validation["tolerance"]
    if report["family"] == "causal-lm":
        assert len(json.loads(printed)) == 5


def test_quantized_export_is_smaller_and_a_tied_head_is_stored_once(tmp_path):
    import transformers

    from tests.tiny_models import COMMON, tokenizer

    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    tokenizer().save_pretrained(tmp_path / "tied")
    dense = export_onnx(str(tmp_path / "tied"), str(tmp_path / "dense-onnx"), log=lambda line: None)
    assert dense["tied_head"]
    table = 30522 * 64 * 4
    assert dense["size_bytes"] < 1.5 * table  # the (V, H) table once (blocks are small here), not twice
    assert set(dense["speed"]) == {"onnxruntime", "pytorch"}
    assert "| onnxruntime |" in (tmp_path / "dense-onnx" / "README.md").read_text()
    compress(str(tmp_path / "tied"), [{"method": "rtn", "bits": 4, "group_size": 32}], tmp_path / "rtn")
    export_onnx(str(tmp_path / "rtn"), str(tmp_path / "rtn-onnx"), speed=False, log=lambda line: None)
    data = {name: (tmp_path / name / "model.onnx.data").stat().st_size - table for name in ("dense-onnx", "rtn-onnx")}
    assert data["rtn-onnx"] < 0.3 * data["dense-onnx"]  # the blocks' weights: 4 bits + a scale per 32, vs 32 bits


@pytest.mark.parametrize("bits,group,columns", [(2, 32, 64), (3, 16, 64), (4, 96, 192), (8, 64, 128)])
def test_matmul_nbits_holds_the_integers_exactly(bits, group, columns):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    rows = 24
    q = rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), size=(rows, columns))
    scale = (rng.random((rows, columns // group)) + 0.1).astype(np.float32)
    weight = (q.reshape(rows, -1, group) * scale[..., None]).reshape(rows, columns).astype(np.float32)
    kernel_bits, block = kernel_layout(bits, group, columns)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=columns, N=rows,
                            bits=kernel_bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, columns])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, rows])],
        initializer=[numpy_helper.from_array(pack_blocks(q, kernel_bits, block), "B"),
                     numpy_helper.from_array(block_scales(scale, group, block), "S")])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((5, columns)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"A": a})[0], a @ weight.T, rtol=1e-5, atol=1e-4)


def test_layouts():
    assert kernel_layout(3, 64, 128) == (4, 64)          # 3-bit integers are 4-bit ones
    assert kernel_layout(4, 96, 192) == (4, 32)          # a group of 96: three blocks of 32 repeating its scale
    assert kernel_layout(4, 24, 96) is None              # no power-of-two block >= 16 divides 24: float fallback


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_inverts_the_compressed_tensors_packing(bits):
    from hfcompress.formats.compressed_tensors import pack_int32, unpack_int32

    q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (6, 40), dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, 40), q)


def test_bad_input_fails_before_any_work(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HfCompressError, match="config.json"):
        export_onnx(str(tmp_path / "empty"), str(tmp_path / "a"))
    with pytest.raises(HfCompressError, match="supports causal-lm, encoder"):
        export_onnx(build("clip", tmp_path / "clip"), str(tmp_path / "b"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(HfCompressError, match="exists and is not empty"):
        export_onnx(tiny("llama"), str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"


def test_failed_validation_leaves_nothing(tiny, tmp_path, monkeypatch):
    from hfcompress.export import validate

    monkeypatch.setattr(validate, "RELATIVE_TOLERANCE", -1.0)  # no graph can pass
    with pytest.raises(ExportError, match="failed validation, so nothing was written"):
        export_onnx(tiny("llama"), str(tmp_path / "out"), speed=False, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_and_recipe_export(tiny, tmp_path, capsys):
    from hfcompress.cli import main

    assert main(["export", tiny("gpt2"), "--onnx", str(tmp_path / "cli"), "--onnx-speed", "false"]) == 0
    assert "validated" in capsys.readouterr().out
    assert "speed" not in read_metadata(str(tmp_path / "cli"))["onnx"]   # the flag named as in compress and the recipe
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "magnitude", "sparsity": 0.5}],
                                  "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / "pruned")},
                                  "export": {"onnx": str(tmp_path / "pruned-onnx"), "speed": False}},
                                 log=lambda line: None)
    assert result.onnx["validation"]["greedy_tokens_agreeing"] == [16, 16]
    assert (tmp_path / "pruned-onnx" / "model.onnx").is_file()
    with pytest.raises(HfCompressError, match="is an ONNX export"):
        hfcompress.load(str(tmp_path / "pruned-onnx"))


def test_pushed_export_runs_from_the_hub_with_its_card_snippet(hub, tiny, tmp_path, monkeypatch):
    from hfcompress.hub import push

    token = "hf_TestTokenThatMustNeverBeWritten"
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "onnx"
    export_onnx(tiny("llama"), str(out), speed=False, log=lambda line: None)
    push(out, "alice/tiny-onnx")
    files = hub.repos["alice/tiny-onnx"]["files"]
    assert hub.commits == 1 and set(files) == {p.name for p in out.iterdir()}
    assert not any(token.encode() in data for data in files.values())
    snippet = files["README.md"].decode().split("```python\n")[1].split("```")[0]
    assert 'snapshot_download("alice/tiny-onnx")' in snippet
    fresh = {"PATH": "", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "fresh_home"),
             "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=fresh, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout) > 0  # 20 greedy tokens, decoded


def test_without_the_onnx_packages_the_command_says_what_to_install(tiny, tmp_path):
    from tests.conftest import ROOT

    hide = ("import importlib.machinery, sys\n"
            "class Hide(importlib.machinery.PathFinder):\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        if name.partition('.')[0] in ('onnx', 'onnx_ir', 'onnxscript', 'onnxruntime'):\n"
            "            return None\n"
            "        return importlib.machinery.PathFinder.find_spec(name, path, target)\n"
            "sys.meta_path = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]\n"
            "from hfcompress.cli import main\n"
            f"sys.exit(main(['export', {tiny('llama')!r}, '--onnx', {str(tmp_path / 'out')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "pip install 'hfcompress[onnx]'" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
