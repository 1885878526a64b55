"""The README.md of an ONNX export: what the graph is, how it was validated, how fast it runs, how to use it."""

from __future__ import annotations

import os
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = "onnx_card.md.j2"

USAGE = '''import numpy as np, onnxruntime as ort
from huggingface_hub import snapshot_download
from transformers import AutoTokenizer

folder = snapshot_download("{repo}")
session = ort.InferenceSession(f"{{folder}}/model.onnx")
tokenizer = AutoTokenizer.from_pretrained(folder)
cache = {{i.name: np.zeros([1, int(i.shape[1]), 0, int(i.shape[3])], np.float32)
         for i in session.get_inputs() if i.name.startswith("input.cache.")}}
names = [o.name for o in session.get_outputs()]
ids, past = tokenizer("The Time Traveller", return_tensors="np")["input_ids"], 0
for _ in range(20):
    positions = np.arange(past, past + ids.shape[1])[None]
    out = dict(zip(names, session.run(names, {{"input_ids": ids, "position_ids": positions, **cache}})))
    cache = {{"input." + k[len("output."):]: v for k, v in out.items() if k.startswith("output.cache.")}}
    past, ids = past + ids.shape[1], out["logits"][:, -1:].argmax(-1)
    print(tokenizer.decode(ids[0]), end="", flush=True)'''

ENCODER_USAGE = '''import onnxruntime as ort
from huggingface_hub import snapshot_download
from transformers import AutoTokenizer

folder = snapshot_download("{repo}")
session = ort.InferenceSession(f"{{folder}}/model.onnx")
inputs = AutoTokenizer.from_pretrained(folder)("A man is eating food.", return_tensors="np")
names = [i.name for i in session.get_inputs()]
hidden = session.run(None, {{k: v for k, v in inputs.items() if k in names}})[0]  # (1, T, H)'''


def _template() -> str:
    packaged = resources.files("hfcompress").joinpath("model_cards", TEMPLATE)
    if packaged.is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE)


def _speed_rows(speed: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(runtime, prefill, decode) cells; "-" where a number was left out (the card then gives the reason)."""
    return [(runtime, f"{values['prefill_tokens_per_s']:.0f}" if "prefill_tokens_per_s" in values else "-",
             f"{values['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in values else "-")
            for runtime, values in speed.items()]


def render_onnx_card(metadata: dict[str, Any], repo_id: str | None = None) -> str:
    """README.md text for an ONNX export described by `metadata` (its hfcompress.json)."""
    from ..evaluate import format_table
    from ..hub import UNPUSHED_REPO

    onnx = metadata["onnx"]
    repo = repo_id or UNPUSHED_REPO
    base = metadata.get("base_model")
    methods = [step["method"] for step in metadata.get("steps", [])]
    kernels = Counter(kind for kind in onnx["kernels"].values())
    fallbacks = [name for name, kind in onnx["kernels"].items() if not kind.startswith("MatMulNBits")]
    metrics = metadata.get("metrics", {})
    evaluation = metadata.get("evaluation") or {}
    name = os.path.basename(str(base or metadata.get("source", "model")).rstrip("/"))
    card_data = ModelCardData(base_model=base, library_name="onnx", license=metadata.get("license"),
                              tags=["onnx", "onnxruntime", "hfcompress", *methods])
    card = ModelCard.from_template(
        card_data, template_path=_template(),
        title=f"{name}{'-' + '-'.join(methods) if methods else ''} (ONNX)",
        version=metadata.get("hfcompress_version", ""), base_model=base, source=metadata.get("source"),
        methods=methods, onnx=onnx, kernels=dict(kernels), fallbacks=fallbacks, inputs=onnx.get("inputs", []),
        speed_rows=_speed_rows(onnx.get("speed", {})),
        speed_notes=[f"{runtime}: {values['speed_note']}." for runtime, values in onnx.get("speed", {}).items()
                     if "speed_note" in values], machine=onnx.get("machine", evaluation.get("machine")),
        date=onnx.get("date", ""),
        table=format_table(metrics["before"], metrics["after"]) if metrics.get("before") else "",
        usage=(USAGE if onnx["family"] == "causal-lm" else ENCODER_USAGE).format(repo=repo))
    return str(card)
