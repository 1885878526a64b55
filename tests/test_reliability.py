"""Hostile or broken sources: each is one clear line from the command line, before any weight is read, and nothing
is written (no output folder, no code from the source run)."""

import json
import os
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


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _command(source, out, *extra):
    return [sys.executable, "-m", "hfcompress", "compress", str(source), "--method", "wanda", "--out", str(out),
            "--n-samples", "48", "--seq-len", "128", "--eval-windows", "1", "--eval-seq-len", "32", *extra]


@pytest.mark.parametrize("marker", ["calibration:", "step 1/1", "saving to"])
def test_a_killed_run_leaves_nothing_half_written_and_the_next_run_succeeds(marker, tiny, tmp_path):
    import signal

    source, out = tmp_path / "source", tmp_path / "out"
    shutil.copytree(tiny("llama"), source)
    before = _tree(source)
    for sig in (signal.SIGINT, signal.SIGKILL):
        run = subprocess.Popen(_command(source, out), stderr=subprocess.PIPE, text=True, cwd=ROOT)
        lines = []
        for line in run.stderr:  # the run's own log: stop it right after it says where it is
            lines.append(line)
            if line.startswith(marker):
                run.send_signal(sig)
                break
        rest = run.stderr.read()
        code = run.wait(timeout=300)
        if out.exists():  # it finished before the signal landed: then the output is whole
            assert {"hfcompress.json", "README.md", "model.safetensors"} <= {p.name for p in out.iterdir()}
            shutil.rmtree(out)
        if sig == signal.SIGINT:
            assert code in (0, 130) and "Traceback" not in rest, rest
            assert code == 0 or rest.strip().splitlines()[-1].startswith("hfcompress: interrupted"), rest
            assert not list(tmp_path.glob(".out.*"))  # an interrupted run cleans up after itself
        assert _tree(source) == before
    # after the SIGKILL a staging folder may be left: the next run removes it, and never renames it into place
    finished = subprocess.run(_command(source, out), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert not list(tmp_path.glob(".out.*")) and (out / "hfcompress.json").is_file()
    assert _tree(source) == before


def test_staging_folders_of_killed_runs_are_removed_and_no_others(tmp_path):
    """A run killed the moment after creating its staging folder leaves it empty: the next run still knows whose it
    was (the pid is in its name) and removes it; a live run's folder and another output's folders stay."""
    from hfcompress.formats import staged_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "out"
    abandoned = [tmp_path / f".out.hfcompress-{dead_pid}.{tail}" for tail in ("x1_y", "old-x2")]
    kept = [tmp_path / f".out.hfcompress-{os.getppid()}.alive", tmp_path / f".out.hfcompress-{dead_pid}.old.x3",
            tmp_path / f".out.hfcompress-{dead_pid}.hfcompress-{dead_pid}.x4", tmp_path / ".out.something"]
    for folder in abandoned + kept:
        folder.mkdir()
    with staged_folder(out) as staging:
        (staging / "hfcompress.json").write_text("{}")
    assert (out / "hfcompress.json").is_file()
    assert not any(folder.exists() for folder in abandoned) and all(folder.exists() for folder in kept)


def test_two_runs_on_one_output_folder_one_wins_whole(tiny, tmp_path):
    source, out = tiny("llama"), tmp_path / "out"
    runs = [subprocess.Popen(_command(source, out, "--seed", str(seed)), stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for seed in (1, 2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "hfcompress: error: output folder" in loser and "Traceback" not in loser
    winner_seed = next(seed for (code, _), seed in zip(results, (1, 2), strict=True) if code == 0)
    metadata = json.loads((out / "hfcompress.json").read_text())
    assert metadata["recipe"]["calibration"]["seed"] == winner_seed  # the folder is the winner's, whole
    assert not list(tmp_path.glob(".out.*"))


def test_a_token_never_lands_in_files_logs_or_outputs(hub, tiny, tmp_path):
    """A recognisable token in HF_TOKEN and in the login store; compress (with a push), a failing push, card, eval,
    export and a bad command: neither stdout, stderr nor any file written holds it."""
    token = "hf_SecretTokenXYZ0123456789"
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text(token)  # what `hf auth login` stores
    env = {"PATH": "", "HF_HOME": str(home), "HF_TOKEN": token, "HF_ENDPOINT": hub.endpoint,
           "HF_HUB_DISABLE_XET": "1", "TQDM_DISABLE": "1"}
    out, onnx = tmp_path / "out", tmp_path / "onnx"
    commands = [["compress", tiny("llama"), "--method", "wanda", "--out", str(out), "--n-samples", "4",
                 "--seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32", "--push-to", "alice/secret"],
                ["push", str(out), "--to", "alice/fails"],
                ["card", str(out)], ["eval", str(out), "--eval-windows", "1", "--eval-seq-len", "32"],
                ["export", str(out), "--onnx", str(onnx), "--onnx-speed", "false"],
                ["push", str(out), "--to", "bad id"]]
    printed = []
    for index, command in enumerate(commands):
        hub.fail_commits = index == 1  # the second push fails on the Hub's side
        run = subprocess.run([sys.executable, "-m", "hfcompress", *command], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=600)
        printed += [run.stdout, run.stderr]
        assert run.returncode == (0 if index in (0, 2, 3, 4) else 2), (command, run.stderr)
    assert "alice/secret" in hub.repos and "retry with: hfcompress push" in printed[3]
    assert not any(token in text for text in printed)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != home / "token"]
    assert len(written) > 10 and not any(token.encode() in p.read_bytes() for p in written)
    assert not any(token.encode() in data for repo in hub.repos.values() for data in repo["files"].values())


def test_a_run_that_does_not_fit_in_memory_is_refused_with_the_estimate(tiny, monkeypatch):
    import hfcompress

    monkeypatch.setattr("hfcompress.resources.available_memory", lambda: 2 ** 20)  # 1 MiB free
    monkeypatch.setattr("hfcompress.pipeline.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(hfcompress.HfCompressError, match=r"needs about .* GiB of memory \(the weights .*"
                                                         r"calibration activations .* lower --n-samples"):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "wanda"}],
                             "calibration": {"n_samples": 8, "seq_len": 64}}, log=lambda line: None)


def test_parts_of_the_memory_estimate():
    from hfcompress.resources import run_memory

    parts = run_memory(parameters=10 ** 9, hidden=4096, vocab=32000, n_samples=128, seq_len=2048, eval_seq_len=512,
                       weight_bytes=4, stored_bytes=2)
    assert parts == {"the weights": 4 * 10 ** 9, "the copy written to disk": 2 * 10 ** 9,
                     "calibration activations": 2 * 128 * 2048 * 4096 * 4, "evaluation logits": 2 * 512 * 32000 * 4}


def test_a_disk_that_fills_while_writing_leaves_nothing(tiny, tmp_path, monkeypatch):
    import errno

    import hfcompress
    from hfcompress.errors import DiskFullError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hfcompress.pipeline.render_card", full)  # the weights are written, then the disk is full
    with pytest.raises(DiskFullError, match="the disk filled while writing .*nothing was kept"):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "magnitude"}],
                             "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}},
                            log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_token_given_to_the_api_is_not_recorded(hub, tiny, tmp_path):
    import hfcompress

    token = "hf_ApiTokenXYZ0123456789"
    out = tmp_path / "out"
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "magnitude"}],
                                  "evaluation": {"enabled": False},
                                  "output": {"dir": str(out), "push_to": "alice/api-token"}},
                                 log=lambda line: None, token=token)
    assert hub.committed_with["alice/api-token"] == token  # it was used for the push, and only there
    assert not any(token.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert token not in json.dumps(result.metadata)
    assert not any(token.encode() in data for data in hub.repos["alice/api-token"]["files"].values())
