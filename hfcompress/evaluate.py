"""Measurements for the before/after table: perplexity (causal LMs), embedding cosine to the original (text encoders),
size, parameters, sparsity, bits per weight, tokens/s."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .sequential import computing_in, find_linears, named_blocks, weight_matrix
from .structure import Structure


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[bool]:
    """Run `model` on `device`: moved whole when it fits in free GPU memory, else streamed layer by layer from CPU
    memory (yields True then). Back on the CPU afterwards."""
    if device.type != "cuda":
        yield False
    elif stored_bytes(model) < 0.8 * torch.cuda.mem_get_info(device)[0]:
        model.to(device)
        try:
            yield False
        finally:
            model.to("cpu")
            torch.cuda.empty_cache()
    else:
        with streamed(model, device):
            yield True


@contextmanager
def streamed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run `model` with its weights kept in CPU memory and copied to `device` one module at a time (accelerate's
    cpu_offload). Afterwards the original Parameter and buffer objects are put back: accelerate rebuilds them, which
    would untie tied embeddings (the head then counts and saves as a second matrix)."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    slots = [(store, name, tensor) for module in model.modules()
             for store in (module._parameters, module._buffers) for name, tensor in store.items()]
    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_module(model, recurse=True)
        for store, name, tensor in slots:
            store[name] = tensor


QUANTIZATION_PARAMETERS = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape")


def parameter_count(model: nn.Module) -> int:
    """Weights of the model, tied ones once. A layer loaded from the compressed-tensors format counts the out x in
    weights its packed integers stand for (its scales are storage, counted in the size, not parameters)."""
    seen, total = set(), 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or name in QUANTIZATION_PARAMETERS:
                continue
            seen.add(id(param))
            shape = getattr(module, "weight_shape", None) if name == "weight_packed" else None
            total += int(torch.as_tensor(shape).prod()) if shape is not None else param.numel()
    return total


def block_linear_sparsity(model: nn.Module) -> float:
    """Share of exact zeros in the Linear weights of the transformer blocks (what pruning targets)."""
    zeros = total = 0
    for prefix, block in named_blocks(model):
        for layer in find_linears(block, prefix=prefix).values():
            weight = weight_matrix(layer)
            zeros += (weight == 0).sum().item()
            total += weight.numel()
    return zeros / total if total else 0.0


def nominal_bits(model: nn.Module, structure: Structure | None, dtype: torch.dtype | None = None) -> float:
    """Bits per weight of the block Linear weights as their format names them (a quantized layer's bit-width, else
    the bits of `dtype` or of the weight's own dtype), scales excluded: what `avg_bits` counts."""
    quantized = structure.of_kind("quantized") if structure else {}
    bits = total = 0
    for prefix, block in named_blocks(model):
        for name, layer in find_linears(block, prefix=prefix).items():
            weight = weight_matrix(layer)
            width = quantized[name]["bits"] if name in quantized else 8 * (dtype or weight.dtype).itemsize
            bits += width * weight.numel()
            total += weight.numel()
    return bits / total if total else 0.0


def stored_bytes(model: nn.Module, structure: Structure | None = None, dtype: torch.dtype | None = None) -> int:
    """Bytes of tensor data the writer chosen for `structure` stores (file headers aside): every state-dict tensor
    once (tied weights share storage), floating ones in `dtype` when given; a quantized layer's weight as the
    compressed-tensors writer stores it (packed integers, per-group scales in `dtype`, its shape)."""
    quantized = structure.of_kind("quantized") if structure else {}
    packed = {f"{name}.weight": entry for name, entry in quantized.items()}
    seen, total = set(), 0
    ties = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.device.type != "meta" else name
        if key in seen or name in ties:  # the second name of a tied weight (meta tensors share no data pointer)
            continue
        seen.add(key)
        element = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        if name in packed:
            from .formats.compressed_tensors import stored_layer_bytes

            total += stored_layer_bytes(*tensor.shape, packed[name]["bits"], packed[name]["group_size"], element)
        else:
            total += tensor.numel() * element
    return total


def folder_weights_bytes(folder: str | os.PathLike) -> int:
    """Size on disk of the weight files of a saved model folder."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def size_metrics(size_bytes: int, parameters: int) -> dict[str, Any]:
    """Size and true bits per weight (everything stored, scales included, over the parameters)."""
    return {"size_bytes": size_bytes, "bits_per_weight": round(8 * size_bytes / max(1, parameters), 4)}


def quality_metric(family: str, architectures: list[str]) -> str | None:
    """What the evaluation data measures: `perplexity` for causal LMs and for image-text models that generate text
    (LLaVA-style; on the text alone, no image), `embedding_cosine` for text encoders (on text windows) and for
    image-text dual encoders (CLIP; on image-caption pairs), None for vision models (size and sparsity only)."""
    if family == "encoder":
        return "embedding_cosine"
    if family == "vision-language":
        generates = any(a.endswith("ForConditionalGeneration") for a in architectures)
        return "perplexity" if generates else "embedding_cosine"
    return "perplexity" if family == "causal-lm" else None


def measures_pairs(family: str, architectures: list[str]) -> bool:
    """Whether the quality data is image-caption pairs (a dual encoder: CLIP) rather than text windows."""
    return family == "vision-language" and quality_metric(family, architectures) == "embedding_cosine"


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over non-overlapping windows (n, seq_len); NLL summed in fp32."""
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows.split(1), desc=desc, leave=False):
        input_ids = window.to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits.float()      # (1, T, vocab)
        nll = nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += input_ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def mean_final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """An encoder's final hidden states averaged over the tokens (a mean-pooled sentence embedding), (B, hidden)
    fp32, for input_ids (B, seq_len), whether or not the model has a head (a masked-LM or a classifier)."""
    return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1].float().mean(dim=1)


@torch.no_grad()
def window_embeddings(model: nn.Module, windows: torch.Tensor, device: torch.device,
                      desc: str = "embeddings") -> torch.Tensor:
    """`mean_final_hidden` of each window (n, seq_len), one at a time: (n, hidden) fp32 on the CPU."""
    return torch.cat([mean_final_hidden(model, window.to(device)).cpu()
                      for window in tqdm(windows.split(1), desc=desc, leave=False)])


@torch.no_grad()
def pair_embeddings(model: nn.Module, pairs: dict[str, torch.Tensor], device: torch.device,
                    desc: str = "embeddings", batch_size: int = 8) -> torch.Tensor:
    """A dual encoder's (CLIP) image and caption embeddings of processor outputs for n image-caption pairs:
    (2, n, dim) fp32 on the CPU, images first."""
    count, parts = len(pairs["input_ids"]), []
    for start in tqdm(range(0, count, batch_size), desc=desc, leave=False):
        batch = {name: value[start:start + batch_size].to(device) for name, value in pairs.items()}
        out = model(**batch)
        parts.append(torch.stack([out.image_embeds.float(), out.text_embeds.float()]).cpu())
    return torch.cat(parts, dim=1)


def reference_embeddings(model: nn.Module, device: torch.device, data: torch.Tensor | dict[str, torch.Tensor],
                         compute_dtype: torch.dtype | None = None, desc: str = "before") -> torch.Tensor:
    """What `embedding_similarity` compares, with the model on `device` computing in `compute_dtype`: an encoder's
    `window_embeddings` of text windows (n, hidden), or a dual encoder's `pair_embeddings` of image-caption pairs
    (2, n, dim). Taken before compression, it is the reference that `measure(reference=...)` compares with."""
    with on_device(model, device), computing_in(model, compute_dtype):
        if isinstance(data, dict):
            return pair_embeddings(model, data, device, desc=f"embeddings {desc}".strip())
        return window_embeddings(model, data, device, desc=f"embeddings {desc}".strip())


def embedding_similarity(embeddings: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The mean cosine similarity of each embedding to the reference's (the same shape: (n, hidden) or (2, n, dim));
    for image-caption pairs (2, n, dim) also the image-to-caption top-1: the share of images whose own caption is
    the closest of the n captions."""
    metrics = {"embedding_cosine": round(nn.functional.cosine_similarity(embeddings, reference, dim=-1).mean().item(),
                                         6)}
    if embeddings.dim() == 3:
        images, captions = nn.functional.normalize(embeddings, dim=-1).unbind(0)           # (n, dim) each
        closest = (images @ captions.t()).argmax(dim=1)                                     # (n,)
        metrics["image_caption_top1"] = round((closest == torch.arange(len(closest))).float().mean().item(), 6)
    return metrics


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(call: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - start


def pad_token_id(generation_config: Any) -> int | None:
    """The pad id for `generate`: the configured one, else the (first) end-of-sequence id."""
    if generation_config.pad_token_id is not None:
        return generation_config.pad_token_id
    eos = generation_config.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) and eos else eos


SPREAD = 0.05  # tokens/s is published only when the fastest timings agree this closely


def settled(sample: Callable[[], float], least: int = 3,
            tick: Callable[[], Any] = lambda: None) -> tuple[float, float, int]:
    """(median of the `least` fastest, their relative spread, runs) of `sample()` (seconds), after one warm-up run:
    repeated until the `least` fastest lie within `SPREAD` of each other, at most 4 x `least` times. A busy
    machine slows some runs; the fastest ones agree once enough runs are taken, or never. `tick()` after each run
    (outside the timed part), for a progress bar."""
    sample()
    times: list[float] = []
    while True:
        times.append(sample())
        tick()
        fastest = sorted(times)[:least]
        spread = (fastest[-1] - fastest[0]) / fastest[0] if fastest[0] > 0 else math.inf
        if len(times) >= least and (spread <= SPREAD or len(times) >= 4 * least):
            return fastest[len(fastest) // 2], spread, len(times)


def _unsettled(what: str, spread: float, runs: int) -> str:
    gap = "no difference left to time" if math.isinf(spread) else f"they differ by {spread:.0%}"
    return (f"{what} left out: the fastest of {runs} timings did not agree within {SPREAD:.0%} ({gap}), too "
            "unsteady to publish (a busy machine, or runs too short to time)")


def timed_speed(forward: Callable[[], Any], generate: Callable[[int], Any] | None, prompt_tokens: int,
                device: torch.device, new_tokens: int = 32, repeats: int = 3, desc: str = "") -> dict[str, Any]:
    """Prefill tokens/s (`forward()` over a prompt of `prompt_tokens`) and greedy decode tokens/s with a KV cache,
    from t(generate(new_tokens)) - t(generate(1)), so the prompt's own prefill is not counted as decoding. Each
    time is `settled` over at least `repeats` runs; a number whose timings never agree is left out, and
    `speed_note` says why (published numbers are never noise). `generate=None`: prefill only (encoders). Any
    runtime: PyTorch here, ONNX Runtime for exports. A progress bar (`desc`) counts the timings, up to 4 x `repeats`
    of each kind on a busy machine."""
    speed: dict[str, Any] = {}
    notes = []
    with tqdm(desc=f"tokens/s {desc}".strip(), unit=" timings", leave=False) as bar:
        prefill, spread, runs = settled(lambda: _seconds(forward, device), repeats, bar.update)
        if generate is not None:
            many, spread_many, runs_many = settled(lambda: _seconds(lambda: generate(new_tokens), device), repeats,
                                                   bar.update)
            one, spread_one, runs_one = settled(lambda: _seconds(lambda: generate(1), device), repeats, bar.update)
    if spread <= SPREAD:
        speed["prefill_tokens_per_s"] = prompt_tokens / prefill
    else:
        notes.append(_unsettled("prefill tokens/s", spread, runs))
    if generate is None:
        return {**speed, **({"speed_note": notes[0]} if notes else {})}
    # the spread of the difference: both times' uncertainties, in seconds, over what is left of them
    spread = (spread_many * many + spread_one * one) / (many - one) if many > one else math.inf
    if spread <= SPREAD:
        speed["decode_tokens_per_s"] = (new_tokens - 1) / (many - one)
    else:
        notes.append(_unsettled("decode tokens/s", spread, runs_many + runs_one))
    if notes:
        speed["speed_note"] = "; ".join(notes)
    return speed


@torch.no_grad()
def tokens_per_second(model: nn.Module, prompt: torch.Tensor, device: torch.device, new_tokens: int = 32,
                      repeats: int = 3, desc: str = "") -> dict[str, float]:
    """`timed_speed` of `model.generate` from the first 32 tokens of `prompt` (1, T), prefill over all of it."""
    prompt = prompt.to(device)
    pad = pad_token_id(model.generation_config)
    return timed_speed(lambda: model(input_ids=prompt, use_cache=False),
                       lambda n: model.generate(prompt[:, :32], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                pad_token_id=pad),
                       prompt.shape[1], device, new_tokens, repeats, desc)


SAMPLE_PROMPTS = ("The capital of France is", "Write one sentence about the sea.", "Two plus two equals")
SAMPLE_TOKENS = 24


@torch.no_grad()
def greedy_samples(model: nn.Module, tokenizer: Any, device: torch.device,
                   prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> list[dict[str, str]]:
    """Greedy continuations of fixed prompts (through the chat template when the tokenizer has one), so a person
    can judge what compression did to the answers, beside the perplexity."""
    samples, chat = [], bool(getattr(tokenizer, "chat_template", None))
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids.to(device), max_new_tokens=SAMPLE_TOKENS, do_sample=False,
                             pad_token_id=pad_token_id(model.generation_config))
        samples.append({"prompt": prompt, "chat": chat,
                        "text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    return samples


def measure(model: nn.Module, family: str, device: torch.device,
            windows: torch.Tensor | dict[str, torch.Tensor] | None, *,
            structure: Structure | None = None, sparsity: bool = False, quantized: bool = False, speed: bool = True,
            desc: str = "", storage_dtype: torch.dtype | None = None, tokenizer: Any = None,
            compute_dtype: torch.dtype | None = None, reference: torch.Tensor | None = None) -> dict[str, Any]:
    """Every number of the before/after table: size and bits as the writer for `structure` stores the model
    (floating tensors in `storage_dtype`), sparsity when `sparsity` (only where something is pruned), the nominal
    bits of the block Linear weights when `quantized` (only where something is quantized), perplexity
    and tokens/s of the model in memory (which equals the model as it loads: the tests check it), computed in
    `compute_dtype` when given (on cast copies of the weights, which are left as they were), and the greedy answers
    to fixed prompts of a causal LM when given its `tokenizer`. Given the `reference_embeddings` of its uncompressed
    self (a text encoder's of text windows, a dual encoder's of image-caption pairs, `windows` then the processor's
    outputs): `embedding_similarity` to them."""
    parameters = parameter_count(model)
    metrics: dict[str, Any] = {"parameters": parameters,
                               **size_metrics(stored_bytes(model, structure, storage_dtype), parameters)}
    if sparsity:
        metrics["sparsity"] = round(block_linear_sparsity(model), 6)
    if quantized:
        metrics["nominal_bits"] = round(nominal_bits(model, structure, storage_dtype), 4)
    if family != "encoder" and isinstance(windows, torch.Tensor):  # cut only for what measures perplexity
        with on_device(model, device) as streamed, computing_in(model, compute_dtype):
            metrics["perplexity"] = perplexity(model, windows, device, desc=f"perplexity {desc}".strip())
            if speed and not streamed and family == "causal-lm":  # streamed, it would time moving the weights
                metrics.update(tokens_per_second(model, windows[:1, :256], device, desc=desc))
            if tokenizer is not None and family == "causal-lm":
                metrics["samples"] = greedy_samples(model, tokenizer, device)
    if windows is not None and reference is not None:
        metrics.update(embedding_similarity(reference_embeddings(model, device, windows, compute_dtype, desc),
                                            reference))
    return metrics


TABLE_ROWS = [
    ("perplexity", "perplexity", "{:.2f}"),
    ("embedding_cosine", "embedding cosine to the original", "{:.4f}"),
    ("image_caption_top1", "image-to-caption top-1", "{:.1%}"),
    ("size_bytes", "size (MB)", lambda v: f"{v / 1e6:.1f}"),
    ("parameters", "parameters (M)", lambda v: f"{v / 1e6:.2f}"),
    ("sparsity", "sparsity (block Linear weights)", "{:.1%}"),
    ("nominal_bits", "nominal bits (block Linear weights)", "{:.2f}"),
    ("bits_per_weight", "bits per weight", "{:.2f}"),
    ("prefill_tokens_per_s", "prefill tokens/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
]


def comparison_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, before, after) for every metric measured on both sides, and for a speed one side could not settle
    (`not settled` there: the table's note says why)."""
    rows = []
    for key, label, fmt in TABLE_ROWS:
        render = fmt if callable(fmt) else fmt.format
        sides = (before, after)
        if all(key in side for side in sides):
            rows.append((label, render(before[key]), render(after[key])))
        elif key.endswith("tokens_per_s") and any(key in side for side in sides) and \
                all(key in side or "speed_note" in side for side in sides):
            rows.append((label, *(render(side[key]) if key in side else "not settled" for side in sides)))
    return rows


def format_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown table of the comparison, used by the CLI and the model card."""
    lines = ["| metric | before | after |", "|---|---:|---:|"]
    lines += [f"| {label} | {b} | {a} |" for label, b, a in comparison_rows(before, after)]
    notes = [f"{side}: {metrics['speed_note']}." for side, metrics in (("before", before), ("after", after))
             if "speed_note" in metrics]
    return "\n".join(lines + ([""] + notes if notes else []))
