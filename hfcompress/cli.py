"""The `hfcompress` command line. Method flags are generated from the methods' config dataclasses.

    hfcompress compress builtin:smollm2-135m --method wanda --sparsity 0.5 --out out/smollm2-wanda
    hfcompress compress --recipe recipe.yaml --n-samples 64
    hfcompress compress builtin:smollm2-135m --method gptq --bits 4 --dry-run
    hfcompress eval out/smollm2-wanda
    hfcompress export out/smollm2-wanda --onnx out/smollm2-wanda-onnx
    hfcompress push out/smollm2-wanda --to me/smollm2-wanda --private
    hfcompress card out/smollm2-wanda
    hfcompress importance builtin:smollm2-135m --score lim --plot importance.png
    hfcompress methods
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from .configs.layerwise_quant import LayerwiseQuantConfig
from .errors import HfCompressError, InvalidOptionError, choices
from .options import FALSE_WORDS, TRUE_WORDS, config_fields, field_types, from_values, option_choices
from .recipe import (
    CalibrationSpec,
    EvaluationSpec,
    ExportSpec,
    ModelSpec,
    OutputSpec,
    Recipe,
    default_name,
    unused_folder,
)
from .registry import available_methods, methods_table

EXAMPLES = """examples:
  hfcompress compress builtin:smollm2-135m --method wanda --sparsity 0.5 --out out/smollm2-wanda
  hfcompress compress HuggingFaceTB/SmolLM2-135M --method wanda --pattern 2:4 --out out/smollm2-24
  hfcompress compress --recipe recipe.yaml --out out/x --overwrite
  hfcompress compress ./my-model --method magnitude --sparsity 0.3 --out out/m --push-to me/m --private
  hfcompress compress builtin:smollm2-135m --method rtn --bits 4 --group-size 64 --dry-run
  hfcompress export out/smollm2-wanda --onnx out/smollm2-wanda-onnx

Calibration defaults adapt to the device: 128 windows of 2048 tokens on GPU, 32 of 512 on CPU (a 135M model then
compresses in a few minutes on a laptop CPU)."""

# (section, field) -> CLI flag, for the recipe sections; method fields use --field-name.
SECTION_FLAGS = {
    ("model", "revision"): "--revision", ("model", "dtype"): "--dtype", ("model", "device"): "--device",
    ("model", "compute_dtype"): "--compute-dtype", ("model", "trust_remote_code"): "--trust-remote-code",
    ("model", "allow_pickle"): "--allow-pickle",
    ("calibration", "source"): "--calib", ("calibration", "n_samples"): "--n-samples",
    ("calibration", "seq_len"): "--seq-len", ("calibration", "seed"): "--seed",
    ("calibration", "text_field"): "--text-field", ("calibration", "image_field"): "--image-field",
    ("calibration", "split"): "--split",
    ("calibration", "subset"): "--subset",
    ("evaluation", "source"): "--eval-source", ("evaluation", "seq_len"): "--eval-seq-len",
    ("evaluation", "n_windows"): "--eval-windows", ("evaluation", "text_field"): "--eval-text-field",
    ("evaluation", "split"): "--eval-split", ("evaluation", "subset"): "--eval-subset",
    ("evaluation", "remeasure"): "--remeasure", ("evaluation", "dtype"): "--eval-dtype",
    ("evaluation", "speed"): "--eval-speed", ("evaluation", "samples"): "--eval-samples",
    ("output", "dir"): "--out", ("output", "overwrite"): "--overwrite", ("output", "push_to"): "--push-to",
    ("output", "private"): "--private", ("export", "onnx"): "--onnx", ("export", "speed"): "--onnx-speed",
}
SECTION_CLASSES = {"model": ModelSpec, "calibration": CalibrationSpec, "evaluation": EvaluationSpec,
                   "output": OutputSpec, "export": ExportSpec}


def _flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_section_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    for (section, name), flag in SECTION_FLAGS.items():
        if section not in sections or flag in skip:
            continue
        f = next(f for f in dataclasses.fields(SECTION_CLASSES[section]) if f.name == name)
        dest = f"{section}.{name}"
        if f.type in ("bool", bool) and not f.default:   # off unless given: the flag alone turns it on
            parser.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS,
                                help=f.metadata["help"])
        else:   # on by default: `--eval-speed false` turns it off (a switch, as the method flags)
            switch = {"nargs": "?", "const": "true"} if f.type in ("bool", bool) else {}
            shown = "" if states_default(f.metadata["help"]) else _default_text({section: f.default})
            parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=name.upper(),
                                help=f.metadata["help"] + shown, **switch)


def states_default(help_text: str) -> bool:
    """Whether a help text gives its default itself, as `(default: ...)` or `(default 0.5 ...)`."""
    return "(default" in help_text


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (each applies to the methods listed)")
    owners: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    valid: dict[str, dict[str, str]] = {}      # option -> {method: its choices}
    defaults: dict[str, dict[str, Any]] = {}   # option -> {method: its default}
    switches: set[str] = set()                 # bool options: the flag alone means true
    for name, spec in available_methods().items():
        types = field_types(spec.config_class)
        for f in config_fields(spec.config_class):
            owners.setdefault(f.name, []).append(name)
            helps.setdefault(f.name, f.metadata.get("help", ""))
            if "choices" in f.metadata:
                valid.setdefault(f.name, {})[name] = ", ".join(map(str, f.metadata["choices"]))
            if f.default is not dataclasses.MISSING and not states_default(f.metadata.get("help", "")):
                defaults.setdefault(f.name, {})[name] = f.default
            if types[f.name] in (bool, bool | None):
                switches.add(f.name)
    for field_name, methods in owners.items():
        if field_name == "targets":
            helps[field_name] += "; several globs comma-separated, e.g. '*.mlp.*,*.self_attn.o_proj'"
        switch = {"nargs": "?", "const": "true"} if field_name in switches else {}
        group.add_argument("--" + field_name.replace("_", "-"), dest=f"method.{field_name}", default=argparse.SUPPRESS,
                           metavar="VALUE", help=f"{helps[field_name]}{_per_method('one of', valid.get(field_name))}"
                                                 f"{_default_text(defaults.get(field_name, {}))} "
                                                 f"[{', '.join(methods)}]", **switch)


def _default_text(defaults: dict[str, Any]) -> str:
    """' (default: X)', or per method where they differ; nothing for defaults that are None or empty."""
    def flag_value(value: Any) -> str:  # as it is written after the flag
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return str(value).lower() if isinstance(value, bool) else str(value)

    return _per_method("default", {method: flag_value(value) for method, value in defaults.items()
                                   if value not in (None, "", ())})


def _per_method(label: str, shown: dict[str, str] | None) -> str:
    """' (label: X)' when every method agrees, else ' (label: X for a; Y for b)'; nothing for no values."""
    if not shown:
        return ""
    if len(set(shown.values())) == 1:
        return f" ({label}: {next(iter(shown.values()))})"
    return f" ({label}: " + "; ".join(f"{value} for {method}" for method, value in shown.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description="Compress Hugging Face models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True)

    comp = sub.add_parser("compress", help="compress a model and save/push it",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                          description="Load MODEL, apply the method (or the recipe's steps), measure before/after, "
                                      "save to --out and optionally push.")
    comp.add_argument("model", nargs="?", help="Hub repo id, local folder, .gguf file, or builtin:smollm2-135m")
    comp.add_argument("--method", help=f"compression method: {', '.join(available_methods())}")
    comp.add_argument("--recipe", help="YAML recipe; flags given beside it override its fields")
    comp.add_argument("--no-eval", action="store_true", help="skip the before/after measurements")
    comp.add_argument("--dry-run", action="store_true", help="check everything, print what the run would do (steps, "
                                                             "data, output, memory, time) and exit; no weight is "
                                                             "read, nothing is written")
    _add_section_flags(comp, ("model", "calibration", "evaluation", "output", "export"))
    _add_method_flags(comp)

    ev = sub.add_parser("eval", help="measure a model: perplexity, size, parameters, sparsity, tokens/s",
                        description="Measure MODEL as compress measures before and after, and print the numbers as "
                                    "JSON.")
    ev.add_argument("model", help="Hub repo id, local folder (e.g. an hfcompress output), .gguf file, or "
                                  "builtin:smollm2-135m")
    _add_section_flags(ev, ("model", "evaluation"))

    export = sub.add_parser("export", help="export a model folder to ONNX, validated in ONNX Runtime",
                            description="Trace FOLDER (an hfcompress output, a model folder or a Hub repo) to one "
                                        "ONNX graph (causal LMs: with KV-cache inputs), quantized layers as native "
                                        "MatMulNBits; check it against PyTorch in ONNX Runtime and write it with "
                                        "its card to --onnx. A failed check writes nothing.")
    export.add_argument("folder", help="an hfcompress output, a model folder, or a Hub repo id")
    export.add_argument("--onnx", required=True, help="output folder for the ONNX export")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --onnx")
    export.add_argument("--device", default="cpu", help="ONNX Runtime provider: cpu, or cuda (with onnxruntime-gpu)")
    _add_section_flags(export, ("export",), skip=("--onnx",))

    push = sub.add_parser("push", help="push an output folder to the Hub in one commit",
                          description="Upload FOLDER (an hfcompress output or ONNX export) to the model repo --to in "
                                      "one commit, with the token of HF_TOKEN or `hf auth login`; the repo is "
                                      "created when missing. Refuses the repo the model came from.")
    push.add_argument("folder", help="the output folder to upload")
    push.add_argument("--to", required=True, help="target repo id `namespace/name`")
    push.add_argument("--private", action="store_true", help="create the repo as private")

    card = sub.add_parser("card", help="rewrite an output folder's README.md from its hfcompress.json",
                          description="Regenerate the model card (README.md) of FOLDER from its hfcompress.json, "
                                      "e.g. after upgrading hfcompress; hand edits to README.md are replaced.")
    card.add_argument("folder", help="an hfcompress output folder")
    card.add_argument("--repo-id", help="repo id to show in the usage snippet")

    imp = sub.add_parser("importance", help="rank a model's blocks by importance and plot the scores (PNG)",
                         description="Score every transformer block as layerwise_quant does (higher = more "
                                     "important), print the ranking and write a bar chart.")
    imp.add_argument("model")
    imp.add_argument("--score", default="lim", choices=option_choices(LayerwiseQuantConfig, "score"), metavar="SCORE",
                     help="`lim` (calibration data), `zd` (no data), `random`, `reverse` (default: lim)")
    imp.add_argument("--zd-direction", default="low", choices=option_choices(LayerwiseQuantConfig, "zd_direction"),
                     metavar="DIRECTION", help="with --score zd: `low` or `high` share of large weights marks an "
                                               "important block (default: low)")
    imp.add_argument("--shuffle-seed", type=int, default=0, help="seed of --score random (default: 0)")
    imp.add_argument("--plot", default="importance.png", help="where to write the bar chart ('' for none; default: "
                                                              "importance.png)")
    _add_section_flags(imp, ("model", "calibration"))

    sub.add_parser("methods", help="list the registered methods")
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file (if any) with every given flag laid over it."""
    data: dict[str, Any] = Recipe.from_yaml(args.recipe).to_dict() if args.recipe else {"steps": []}
    if args.model:
        data["model"] = {**(data.get("model") or {}), "id": args.model}
    for section in SECTION_CLASSES:
        if given := _section(args, section):
            data.setdefault(section, {}).update(given)
    options = _section(args, "method")
    if args.method:
        # --method replaces the recipe's steps by one step, starting from the recipe's step of that method if any
        base = next((step for step in data["steps"] if step["method"] == args.method), {"method": args.method})
        data["steps"] = [{**base, **options}]
    elif options and not data["steps"]:
        raise InvalidOptionError(f"method options {sorted(options)} given without --method; valid methods: "
                                 f"{choices(available_methods())}")
    else:
        fields = [{f.name for f in config_fields(available_methods()[step["method"]].config_class)}
                  for step in data["steps"]]
        unused = sorted(set(options) - set().union(*fields))
        if unused:
            raise InvalidOptionError(f"option(s) {unused} apply to no step of the recipe "
                                     f"({', '.join(step['method'] for step in data['steps'])})")
        data["steps"] = [{**step, **{k: v for k, v in options.items() if k in known}}
                         for step, known in zip(data["steps"], fields, strict=True)]
    if "model" not in data:
        raise InvalidOptionError("name a MODEL (or give --recipe with a `model`)")
    if not data["steps"]:
        raise InvalidOptionError(f"choose a method with --method (one of {choices(available_methods())}) or give "
                                 "--recipe with `steps`")
    if args.no_eval:
        data.setdefault("evaluation", {})["enabled"] = False
    output = data.setdefault("output", {})
    if not output.get("dir"):  # a run from the command line is never lost: it goes to a new folder named after it
        model = data["model"]["id"] if isinstance(data["model"], dict) else data["model"]
        output["dir"] = unused_folder(os.path.join("out", default_name(model, [s["method"] for s in data["steps"]])))
    return Recipe.from_dict(data)


def _section(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The values given on the command line for one recipe section, e.g. {"seq_len": "512"} for `calibration`."""
    return {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith(section + ".")}


def _run(args: argparse.Namespace) -> None:
    if args.command == "methods":
        print(methods_table())
    elif args.command == "compress":
        recipe = recipe_from_args(args)  # every option error surfaces here, before torch is imported
        recipe.validate()                # and the output folder and push target, still without torch
        if args.dry_run:
            from .preflight import describe, preflight

            print(describe(preflight(recipe, log=lambda line: print(line, file=sys.stderr))))
            return
        from .pipeline import compress

        result = compress(recipe, log=lambda line: print(line, file=sys.stderr))
        if result.before:
            print(result.table)
    elif args.command == "eval":
        from .pipeline import evaluate_model

        metrics = evaluate_model(from_values(ModelSpec, {"id": args.model, **_section(args, "model")}, "model"),
                                 from_values(EvaluationSpec, _section(args, "evaluation"), "evaluation"))
        print(json.dumps(metrics, indent=2))
    elif args.command == "importance":
        from .importance import plot_importance, rank_blocks, ranking_table

        model = from_values(ModelSpec, {"id": args.model, **_section(args, "model")}, "model")
        calibration = from_values(CalibrationSpec, _section(args, "calibration"), "calibration")
        scores = rank_blocks(model, args.score, calibration, zd_direction=args.zd_direction,
                             shuffle_seed=args.shuffle_seed)
        print(ranking_table(scores))
        if args.plot and plot_importance(scores, args.plot, args.score):
            print(f"wrote {args.plot}")
        elif args.plot:
            print("no plot: pip install 'hfcompress[plots]' to draw it", file=sys.stderr)
    elif args.command == "export":
        from .export import export_onnx

        spec = from_values(ExportSpec, {"onnx": args.onnx, **_section(args, "export")}, "export")
        report = export_onnx(args.folder, spec.onnx, overwrite=args.overwrite, device=args.device,
                             speed=spec.speed, log=lambda line: print(line, file=sys.stderr))
        print(f"wrote {args.onnx} ({report['size_bytes'] / 1e6:.1f} MB), validated: "
              f"max |onnx - torch| {report['validation']['max_abs_difference']:.3g}")
    elif args.command == "push":
        from .hub import check_token, push

        check_token()  # before any network call: a missing token is one clear line, not a connection error
        print(push(args.folder, args.to, private=args.private))
    elif args.command == "card":
        from pathlib import Path

        from .card import render_card
        from .formats import read_metadata

        if not os.path.isdir(args.folder):
            raise HfCompressError(f"{args.folder!r} is not a folder: give an hfcompress output folder")
        metadata = read_metadata(args.folder)
        if metadata is None:
            raise HfCompressError(f"{args.folder!r} has no hfcompress.json: not an hfcompress output")
        Path(args.folder, "README.md").write_text(render_card(metadata, args.repo_id), encoding="utf-8")
        print(f"wrote {Path(args.folder, 'README.md')}")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The `hfcompress` parser's subcommand parsers, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def with_switch_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with `true` after each boolean method flag that no boolean word follows, so that `--faithful MODEL`
    is `--faithful true MODEL` rather than a flag given the model's name."""
    commands = subcommands(parser).values()
    switches = {flag for command in commands for action in command._actions if action.const == "true"
                for flag in action.option_strings}
    out = []
    for index, token in enumerate(argv):
        out.append(token)
        following = argv[index + 1].lower() if index + 1 < len(argv) else ""
        if token in switches and following not in TRUE_WORDS + FALSE_WORDS:
            out.append("true")
    return out


def refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit with the command's own usage line, naming the flags it does not take and the nearest ones it does."""
    import difflib

    subcommand = subcommands(parser)[command]
    flags = [flag for action in subcommand._actions for flag in action.option_strings]
    hints = [f"; for {token}, did you mean {' or '.join(near)}?" for token in unknown
             if token.startswith("-") and (near := difflib.get_close_matches(token, flags, 2))]
    subcommand.error(f"unrecognized arguments: {' '.join(unknown)}{''.join(hints)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(with_switch_values(parser, sys.argv[1:] if argv is None else argv))
    if unknown:
        refuse_unknown(parser, args.command, unknown)
    try:
        _run(args)
    except HfCompressError as error:
        print(f"hfcompress: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hfcompress: interrupted; no half-written output folder was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
