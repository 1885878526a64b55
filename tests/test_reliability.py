"""Hostile or broken sources: each is one clear line from the command line, before any weight is read, and nothing
is written (no output folder, no code from the source run)."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _truncate(folder):
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _lying_header(folder):
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = next(key for key in header if key != "__metadata__")
    header[name]["data_offsets"][1] += 10 ** 9  # claims a gigabyte more than the file holds
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


def _config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _no_tokenizer(folder):
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab")):
            path.unlink()


def _pickle_only(folder):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _remote_code(folder):
    _config(folder, model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                 "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n")


BROKEN = {
    "truncated safetensors": (_truncate, "is not a valid safetensors file"),
    "safetensors header lying about sizes": (_lying_header, "is not a valid safetensors file"),
    "config.json that is not JSON": (lambda f: (f / "config.json").write_text("{not json"), "not a valid JSON"),
    "unknown architecture": (lambda f: _config(f, model_type="nosuchmodel", architectures=["NoSuchForCausalLM"]),
                             "does not recognize this architecture"),
    "no tokenizer": (_no_tokenizer, "has no usable tokenizer"),
    "pickle-only checkpoint": (_pickle_only, "has only pickle checkpoints (pytorch_model.bin)"),
    "config asking for remote code": (_remote_code, "needs remote code"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_source_is_one_line_before_any_work(case, tiny, tmp_path):
    edit, message = BROKEN[case]
    source = tmp_path / "source"
    shutil.copytree(tiny("llama"), source)
    edit(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    run = subprocess.run([sys.executable, "-m", "hfcompress", "compress", str(source), "--method", "magnitude",
                          "--out", str(tmp_path / "out"), "--no-eval"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and lines[-1].startswith("hfcompress: error: ") and message in lines[-1], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and not (source / "RAN").exists()  # nothing written, no code run
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before     # the source is never touched


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file" * 100)
    run = subprocess.run([sys.executable, "-m", "hfcompress", "compress", str(fake), "--method", "magnitude",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "not a GGUF file" in run.stderr and "Traceback" not in run.stderr


def test_a_pickle_checkpoint_loads_only_when_allowed(tiny, tmp_path):
    import hfcompress

    source = tmp_path / "source"
    shutil.copytree(tiny("llama"), source)
    _pickle_only(source)
    recipe = {"model": {"id": str(source), "allow_pickle": True}, "steps": [{"method": "magnitude"}],
              "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}}
    hfcompress.compress(recipe, log=lambda line: None)
    assert any((tmp_path / "out").glob("*.safetensors"))  # and the output is safetensors again
