"""Model card: Hub metadata (ModelCardData) + a Jinja template from model_cards/, filled from hfcompress.json."""

from __future__ import annotations

import os
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .hub import UNPUSHED_NOTE, UNPUSHED_REPO

BUILTIN_TEXT = "builtin"
BUILTIN_DESCRIPTION = ("the built-in evaluation book, *The Hound of the Baskervilles* (A. Conan Doyle, 1902, public "
                       "domain, from Project Gutenberg)")
PIPELINE_TAGS = {"causal-lm": "text-generation", "encoder": "feature-extraction",
                 "vision": "image-feature-extraction", "vision-language": None}
TEMPLATE = "model_card.md.j2"


def template_path() -> str:
    """The card template: packaged inside the wheel, or in the source tree's model_cards/ for editable installs."""
    packaged = resources.files("hfcompress").joinpath("model_cards", TEMPLATE)
    if packaged.is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE)


def _usage(metadata: dict[str, Any], repo: str) -> str:
    from .formats import loading_needs

    needs = loading_needs(metadata)
    where = UNPUSHED_NOTE if repo == UNPUSHED_REPO else ""
    if metadata["family"] == "causal-lm":
        install = "".join(f"# pip install {shlex.quote(package)}\n" for package in needs["packages"])
        trust = ", trust_remote_code=True" if needs["trust_remote_code"] else ""
        return (f'{install}{where}from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{trust})\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
                f'inputs = tokenizer("The Time Traveller", return_tensors="pt")\n'
                f'print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))')
    return f'{where}import hfcompress\n\nmodel = hfcompress.load("{repo}")'


def _compatibility(metadata: dict[str, Any]) -> str:
    """How the output loads, from what the writer recorded (never from method names)."""
    from .formats import loading_needs, structure_of

    needs, kinds = loading_needs(metadata), structure_of(metadata).kinds
    if needs.get("trust_remote_code"):
        return "needs `trust_remote_code=True` (a small modeling file in this repo); or `hfcompress.load`."
    if needs["format"] == "compressed-tensors":
        bits = sorted({entry["bits"] for entry in structure_of(metadata).of_kind("quantized").values()})
        from .formats.compressed_tensors import kernel_warning

        warning = kernel_warning(set(bits))
        runtimes = (" vLLM's compressed-tensors support covers symmetric 4- and 8-bit groups (not tested by "
                    "hfcompress)." if warning is None else f" Note: {warning}.")
        return (f"plain transformers `from_pretrained` after `pip install {_pip(needs['packages'])}`: the "
                f"compressed-tensors pack-quantized format ({'/'.join(map(str, bits))}-bit integers with one scale "
                "per group). Without the package, loading stops with the pip command." + runtimes)
    if needs.get("packages"):
        return f"needs `pip install {_pip(needs['packages'])}`; then plain `from_pretrained`."
    text = ("plain transformers `from_pretrained`, no extra package: a standard checkpoint with the same layout as "
            "the base model, so runtimes that load the base model (e.g. vLLM) load it too.")
    if "sparse" in kinds:
        text += (" Zeros are stored densely: the size on disk and the speed are those of an uncompressed checkpoint "
                 "in the same dtype.")
    return text


def _pip(packages: list[str]) -> str:
    return " ".join(map(shlex.quote, packages))


def _tags(metadata: dict[str, Any], methods: list[str]) -> list[str]:
    from .formats import loading_needs, structure_of

    tags = ["hfcompress", "compressed", *methods]
    if loading_needs(metadata)["format"] == "compressed-tensors":
        bits = sorted({e["bits"] for e in structure_of(metadata).of_kind("quantized").values()}, reverse=True)
        tags += ["compressed-tensors", *(f"{b}-bit" for b in bits)]
    return list(dict.fromkeys(tags))


def _cell(text: str) -> str:
    """Text as one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or "(nothing)"


def _samples(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    pairs = zip(before.get("samples", []), after.get("samples", []), strict=False)
    return [(_cell(b["prompt"]), _cell(b["text"]), _cell(a["text"])) for b, a in pairs if b["prompt"] == a["prompt"]]


def _evaluation_text(evaluation: dict[str, Any]) -> str:
    source = evaluation.get("source", BUILTIN_TEXT)
    if source == BUILTIN_TEXT:
        return BUILTIN_DESCRIPTION
    return f"`{source}`" + (f" ({evaluation['subset']})" if evaluation.get("subset") else "") + " text"


def render_card(metadata: dict[str, Any], repo_id: str | None = None) -> str:
    """The README.md text for a compressed model described by `metadata` (the content of hfcompress.json)."""
    from .formats import structure_of

    repo = repo_id or metadata.get("output", {}).get("push_to") or UNPUSHED_REPO
    methods = [step["method"] for step in metadata["steps"]]
    after = metadata.get("metrics", {}).get("after", {})
    evaluation = metadata.get("evaluation", {})
    eval_results = []
    from .calibration import hub_dataset_id

    dataset = hub_dataset_id(evaluation.get("source", BUILTIN_TEXT))
    if "perplexity" in after and dataset:  # the model-index names Hub datasets only
        eval_results.append(EvalResult(task_type="text-generation", dataset_type=dataset,
                                       dataset_config=evaluation.get("subset"),
                                       dataset_split=evaluation.get("split"),
                                       dataset_name=f"{evaluation['source']} ({evaluation['seq_len']}-token windows)",
                                       metric_type="perplexity", metric_value=round(after["perplexity"], 4)))
    base = metadata.get("base_model") or os.path.basename(str(metadata.get("source", "")).rstrip("/"))
    name = repo.split("/")[-1] if repo_id or metadata.get("output", {}).get("push_to") else None
    card_data = ModelCardData(
        base_model=metadata.get("base_model"),
        base_model_relation="quantized" if "quantized" in structure_of(metadata).kinds else None,
        tags=_tags(metadata, methods),
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(metadata["family"]),
        license=metadata.get("license"),
        model_name=(name or f"{base.split('/')[-1]}-{'-'.join(methods)}") if eval_results else None,
        eval_results=eval_results or None,
    )
    calibration = metadata.get("calibration")
    on_calibration_text = evaluation.get("on_calibration_text")
    if on_calibration_text is None:  # hfcompress.json written before the flag was recorded: compare the sources
        on_calibration_text = (bool(calibration) and evaluation.get("source") not in ("builtin", None)
                               and evaluation.get("source") == calibration.get("source"))
    from .evaluate import SAMPLE_TOKENS, format_table

    before = metadata.get("metrics", {}).get("before", {})
    card = ModelCard.from_template(
        card_data,
        template_path=template_path(),
        title=f"{base.split('/')[-1]} compressed with {' + '.join(methods)}",
        version=metadata.get("hfcompress_version", ""),
        base_model=metadata.get("base_model"),
        source=metadata.get("source"),
        steps=metadata["steps"],
        table=format_table(before, after) if before and after else "",
        speed="decode_tokens_per_s" in after,
        embedding_cosine="embedding_cosine" in after,
        family=metadata["family"],
        evaluation=evaluation,
        eval_text=_evaluation_text(evaluation),
        samples=_samples(before, after),
        sample_tokens=SAMPLE_TOKENS,
        chat=any(sample.get("chat") for sample in before.get("samples", [])),
        calibration=calibration,
        on_calibration_text=on_calibration_text,
        plots=metadata.get("plots"),
        dtype=metadata.get("dtype"),
        gguf_file=metadata.get("gguf_file"),
        usage=_usage(metadata, repo),
        compatibility=_compatibility(metadata),
        recipe_yaml=yaml.safe_dump(metadata["recipe"], sort_keys=False),
    )
    return str(card)
