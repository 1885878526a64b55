import argparse
import json
import subprocess
import sys
import time

import pytest
import yaml

from hfcompress.cli import build_parser, main, recipe_from_args, with_switch_values
from hfcompress.methods.wanda import WandaConfig


def test_flags_build_the_recipe_and_override_a_recipe_file(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"model": "org/base", "steps": [{"method": "wanda", "sparsity": 0.5}],
                                           "calibration": {"n_samples": 64}}))
    args = build_parser().parse_args(["compress", "--recipe", str(recipe_file), "--sparsity", "0.6",
                                      "--n-samples", "8", "--out", str(tmp_path / "o"), "--calib", "wikitext",
                                      "--subset", "wikitext-2-raw-v1", "--eval-source", "wikitext",
                                      "--eval-subset", "wikitext-2-raw-v1", "--eval-split", "validation"])
    recipe = recipe_from_args(args)
    assert recipe.model.id == "org/base"
    assert recipe.steps == [WandaConfig(sparsity=0.6)]
    assert recipe.calibration.n_samples == 8 and recipe.output.dir == str(tmp_path / "o")
    assert (recipe.calibration.subset, recipe.calibration.split) == ("wikitext-2-raw-v1", "train")
    assert (recipe.evaluation.subset, recipe.evaluation.split) == ("wikitext-2-raw-v1", "validation")


def test_compress_eval_and_card_commands(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", tiny("llama"), "--method", "wanda", "--pattern", "2:4", "--n-samples", "4",
                 "--seq-len", "32", "--eval-seq-len", "64", "--eval-windows", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| perplexity |" in printed and "| sparsity (block Linear weights) | 0.0% | 50.0% |" in printed
    metadata = json.loads((out / "hfcompress.json").read_text())
    assert metadata["steps"][0]["config"]["pattern"] == "2:4"
    assert metadata["recipe"]["calibration"] == {"source": "builtin", "n_samples": 4, "seq_len": 32, "seed": 0,
                                                 "text_field": "text", "image_field": "image", "split": "train",
                                                 "subset": None}

    assert main(["eval", str(out), "--eval-seq-len", "64", "--eval-windows", "2"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["sparsity"] == pytest.approx(0.5)

    (out / "README.md").unlink()
    assert main(["card", str(out), "--repo-id", "me/tiny-24"]) == 0
    assert 'from_pretrained("me/tiny-24")' in (out / "README.md").read_text()

    assert main(["compress", tiny("llama"), "--method", "wanda", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_methods_command_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    assert "| `wanda` |" in capsys.readouterr().out


def test_method_flag_keeps_the_recipe_step_options_and_unused_flags_are_errors(tmp_path):
    from hfcompress.errors import InvalidOptionError

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"model": "org/base", "steps": [
        {"method": "wanda", "sparsity": 0.3, "targets": ["*.mlp.*"]}]}))
    args = build_parser().parse_args(["compress", "--recipe", str(recipe_file), "--method", "wanda",
                                      "--pattern", "unstructured"])
    assert recipe_from_args(args).steps == [WandaConfig(sparsity=0.3, targets=("*.mlp.*",))]
    args = build_parser().parse_args(["compress", "--recipe", str(recipe_file), "--scope", "layer"])
    with pytest.raises(InvalidOptionError, match="apply to no step"):
        recipe_from_args(args)


def test_card_on_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["card", str(tmp_path / "plain")]) == 2
    assert "has no hfcompress.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["compress", "some/model"], "choose a method with --method (one of `dsnot`"),
    (["compress", "some/model", "--method", "wanda", "--eval-windows", "0"], "n_windows (--eval-windows) must be "
                                                                            "positive, got 0"),
    (["compress", "some/model", "--method", "wanda", "--eval-seq-len", "1"], "seq_len (--eval-seq-len) must be at "
                                                                            "least 2, got 1"),
])
def test_parse_errors_say_what_to_do(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "None" not in err


def test_a_broken_recipe_file_is_named_with_the_place(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: [a\nsteps: x: y\n")
    assert main(["compress", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe} is not valid YAML (line 2, column 6)" in err and "unicode string" not in err


def test_help_shows_defaults_and_describes_every_command():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    compress_help = subcommands["compress"].format_help()
    for flag, default in [("--seed SEED", "(default: 0)"), ("--split SPLIT", "(default: train)"),
                          ("--eval-split SPLIT", "(default: test)"), ("--eval-windows N_WINDOWS", "(default: 32)"),
                          ("--cycles VALUE", "(default: 50)"), ("--faithful [VALUE]", "(default: false)"),
                          ("--bits VALUE", "(default: 4 for gptq; 4,2 for layerwise_quant; 4 for rtn)"),
                          ("--act-order [VALUE]", "(default: true)"), ("--estimate VALUE", "(default: hessian)"),
                          ("--score VALUE", "(one of: similarity, influence for layer_drop; lim, zd, random, "
                                            "reverse for layerwise_quant)"),
                          ("--eval-speed [SPEED]", "(default: true)"),
                          ("--eval-samples [SAMPLES]", "(default: true)")]:
        after = " ".join(compress_help.split(f"\n  {flag}", 1)[1].split()[:40])  # the option's own help line
        assert default in after, flag
    assert "severalglobscomma-separated" in "".join(compress_help.split())  # help wraps at spaces and hyphens
    for name in ("eval", "push", "card", "export"):
        assert subcommands[name].description, name
        positional = [a for a in subcommands[name]._actions if not a.option_strings]
        assert all(a.help for a in positional), name


def test_evaluation_speed_and_samples_can_be_turned_off_from_the_command_line():
    parser = build_parser()

    def evaluation(*flags):
        argv = ["compress", "m", "--method", "wanda", *flags]
        return recipe_from_args(parser.parse_args(with_switch_values(parser, argv))).evaluation

    assert evaluation().speed and evaluation().samples
    off = evaluation("--eval-speed", "false", "--eval-samples", "no")
    assert not off.speed and not off.samples
    assert evaluation("--eval-speed", "--eval-samples", "yes").speed


def test_an_unknown_flag_gets_the_command_usage_and_the_nearest_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "m", "--method", "wanda", "--sparstiy", "0.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: hfcompress compress ")
    assert "unrecognized arguments: --sparstiy 0.5; for --sparstiy, did you mean --sparsity" in err


def test_a_boolean_option_alone_means_true_and_a_bad_word_names_the_good_ones():
    def faithful(*flags, model_last=False):
        parser = build_parser()
        argv = ["compress", "--method", "dsnot", *flags, "m"] if model_last else \
            ["compress", "m", "--method", "dsnot", *flags]
        recipe = recipe_from_args(parser.parse_args(with_switch_values(parser, argv)))
        assert recipe.model.id == "m"
        return recipe.steps[0]

    assert faithful("--faithful").faithful and faithful("--faithful", "yes").faithful
    assert faithful("--faithful", model_last=True).faithful                      # the model is not its value
    assert not faithful("--faithful", "false").faithful and not faithful().faithful
    with pytest.raises(Exception, match=r"expects bool \(true/false, yes/no, 1/0\), got 'maybe'"):
        faithful("--faithful=maybe")


def test_a_run_without_out_is_saved_to_a_new_folder_named_after_it(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--method", "magnitude", "--sparsity", "0.3", "--no-eval"]
    assert main(["compress", tiny("llama"), *flags]) == 0
    assert main(["compress", tiny("llama"), *flags]) == 0                     # never onto the first one
    name = f"{tiny('llama').rstrip('/').rsplit('/', 1)[-1]}-magnitude"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [name, f"{name}-2"]
    assert all((tmp_path / "out" / n / "hfcompress.json").is_file() for n in (name, f"{name}-2"))
    assert f"saved to {tmp_path / 'out' / name}" in capsys.readouterr().err.replace("out/", f"{tmp_path}/out/")


def test_push_without_a_token_says_so_before_any_network_call(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens: a network call would fail
    (tmp_path / "out").mkdir()
    assert main(["push", str(tmp_path / "out"), "--to", "me/x"]) == 2
    assert "pushing needs a Hub token" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hfcompress.pipeline.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "out"
    assert main(["compress", tiny("llama"), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out),
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for expected in ("(causal-lm, ", "step 1: rtn (bits: [4], group_size: '32'", "21 modules quantized",
                     "calibration: none needed", f"output: {out}", "memory: about", "time: at least"):
        assert expected in printed, expected
    assert not out.exists()
    assert main(["compress", tiny("llama"), "--method", "wanda", "--sparsity", "2", "--dry-run"]) == 2  # checked too


STARTUP = """
import json, sys
from hfcompress.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:  # argparse's own errors and --help
    code = exit.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0), (["compress", "--help"], 0), (["methods"], 0),
    (["compress", "m", "--method", "nope"], 2),                       # unknown method: the valid ones
    (["compress", "m", "--method", "wanda", "--sparsity", "1.5"], 2),  # a bad ratio
    (["compress", "m", "--method", "wanda", "--bogus", "1"], 2),      # argparse: unknown flag
    (["compress", "m", "--method", "wanda", "--out", "taken"], 2),    # an output folder that is not empty
    (["importance", "m", "--score", "foo"], 2),                       # an unknown block score
])
def test_help_listing_and_argument_errors_answer_without_torch_in_under_a_second(argv, code, tmp_path):
    """A fresh process, interpreter start-up included: nothing heavy is imported, and the answer comes in under 1 s
    (the fastest of three runs, so that a busy machine does not fail it)."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_text("")
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", STARTUP, *argv], capture_output=True, text=True,
                                cwd=tmp_path, timeout=120)
        runs.append({**json.loads(result.stderr.strip().splitlines()[-1]), "seconds": time.perf_counter() - start})
    assert all(run["code"] == code and run["heavy"] == [] for run in runs), runs
    assert min(run["seconds"] for run in runs) < 1.0, runs
