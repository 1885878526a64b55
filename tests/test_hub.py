"""Push to a loopback Hub server, then load the pushed repo back over HTTP in a fresh process."""

import json
import subprocess
import sys

import pytest

import hfcompress
from hfcompress.errors import PushError
from hfcompress.hub import push
from tests.conftest import ROOT
from tests.tiny_models import fingerprint, reloaded_outputs, same_outputs

TOKEN = "hf_TestTokenThatMustNeverBeWritten"


def _compress(tiny, out, **output):
    return hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "wanda", "sparsity": 0.5}],
                                "calibration": {"n_samples": 4, "seq_len": 32},
                                "evaluation": {"seq_len": 64, "n_windows": 2, "speed": False, "samples": False},
                                "output": {"dir": str(out), **output}}, log=lambda line: None)


def test_push_then_from_pretrained_over_http(hub, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    result = _compress(tiny, out, push_to="alice/tiny-wanda", private=True)
    assert result.push_url.startswith(hub.endpoint)
    repo = hub.repos["alice/tiny-wanda"]
    assert hub.commits == 1 and repo["private"]
    assert set(repo["files"]) == {p.name for p in out.iterdir()}
    assert any(len(data) > 1_000_000 for data in repo["files"].values())  # the weights went through LFS
    for name, data in repo["files"].items():
        assert TOKEN.encode() not in data, name
    assert b'alice/tiny-wanda' in repo["files"]["README.md"]  # the usage snippet names the pushed repo

    fresh = {"PATH": "", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "fresh_home"),
             "HF_HUB_DISABLE_XET": "1"}
    expected = fingerprint(result.model)
    for loader, logits in reloaded_outputs("alice/tiny-wanda", tmp_path, env=fresh).items():
        assert same_outputs(logits, expected), loader


def test_failed_push_keeps_the_folder_and_says_how_to_retry(hub, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail_commits = True
    out = tmp_path / "out"
    with pytest.raises(PushError, match=r"kept in .*retry with: hfcompress push .*out --to alice/fails") as error:
        _compress(tiny, out, push_to="alice/fails")
    assert TOKEN not in str(error.value)
    assert (out / "hfcompress.json").is_file() and any(out.glob("*.safetensors"))

    hub.fail_commits = False  # the printed retry command works
    retry = subprocess.run([sys.executable, "-m", "hfcompress", "push", str(out), "--to", "alice/fails"],
                           capture_output=True, text=True, cwd=ROOT)
    assert retry.returncode == 0, retry.stderr
    assert "hfcompress.json" in hub.repos["alice/fails"]["files"]
    push(out, "alice/second")  # the card was written for alice/fails; the copy pushed elsewhere names its own repo
    assert b'from_pretrained("alice/second")' in hub.repos["alice/second"]["files"]["README.md"]


def test_push_refuses_the_source_repo(tiny, tmp_path):
    out = tmp_path / "out"
    _compress(tiny, out)
    metadata = json.loads((out / "hfcompress.json").read_text())
    metadata["recipe"]["model"]["id"] = "org/base-model"  # as if it had been made from a Hub repo
    (out / "hfcompress.json").write_text(json.dumps(metadata))
    for target in ("org/base-model", "Org/Base-Model"):  # Hub repo ids are case-insensitive
        with pytest.raises(PushError, match="source model"):
            push(str(out), target)
    with pytest.raises(PushError, match="namespace/name"):
        push(str(out), "no-namespace")


def test_unreachable_hub_keeps_the_folder_and_says_how_to_retry(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    _compress(tiny, out)
    with pytest.raises(PushError, match=r"failed \(.*kept in .*retry with: hfcompress push") as error:
        push(str(out), "alice/offline", endpoint="http://127.0.0.1:9")  # nothing listens on the discard port
    assert TOKEN not in str(error.value)


def test_a_push_without_a_token_is_refused_before_compressing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("hfcompress.pipeline.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(PushError, match="needs a Hub token: run `hf auth login` or set HF_TOKEN"):
        _compress(tiny, tmp_path / "out", push_to="alice/no-token")


def test_compressing_an_output_again_keeps_its_base_model(tiny, tmp_path):
    import shutil

    from hfcompress.loading import resolve

    first = tmp_path / "first"
    _compress(tiny, first)
    metadata = json.loads((first / "hfcompress.json").read_text())
    metadata["base_model"] = "org/base-model"  # as if the first run had started from a Hub repo
    (first / "hfcompress.json").write_text(json.dumps(metadata))
    assert resolve(str(first)).base_model == "org/base-model"
    assert type(hfcompress.load(first)).__name__ == "LlamaForCausalLM"  # a pathlib.Path works too
    shutil.copytree(tiny("llama"), tmp_path / "plain")
    assert resolve(str(tmp_path / "plain")).base_model is None


def test_private_push_into_an_existing_public_repo_is_refused(hub, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    _compress(tiny, out)
    push(str(out), "alice/public-one")
    # saved without a push target, the card's usage names a placeholder path: the pushed copy names the repo
    assert b'from_pretrained("alice/public-one")' in hub.repos["alice/public-one"]["files"]["README.md"]
    assert 'from_pretrained("path/to/this/folder")' in (out / "README.md").read_text()
    with pytest.raises(PushError, match="exists and is public") as error:
        push(str(out), "alice/public-one", private=True)
    assert "PushError" not in str(error.value)  # raised as is, not wrapped as a failed upload
    assert hub.commits == 1
