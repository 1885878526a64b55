"""The README and --help describe what exists."""

import re
from pathlib import Path

from hfcompress.cli import build_parser
from hfcompress.options import config_fields
from hfcompress.registry import available_methods, methods_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_methods_table_is_the_registry_table():
    assert methods_table() in README, "regenerate the README table with `hfcompress methods`"


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"^(pip install .*)$", README, re.M)
    assert any("hfcompress compress builtin:smollm2-135m" in c for c in commands)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_help_lists_every_method_and_option():
    parser = build_parser()
    compress_help = parser._subparsers._group_actions[0].choices["compress"].format_help()
    for name, spec in available_methods().items():
        assert name in compress_help
        for field in config_fields(spec.config_class):
            assert "--" + field.name.replace("_", "-") in compress_help
    assert "examples:" in compress_help


def test_the_cpu_torch_hint_stands_beside_both_commands_and_does_not_stall():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick_start.splitlines() if line.startswith("pip install -e")]
    assert len(commands) == 2
    hint = " ".join(quick_start.split(commands[1], 1)[1].split("\n\n", 2)[1].split())  # the paragraph after it
    assert "before either one" in hint and "--index-url https://download.pytorch.org/whl/cpu" in hint
    assert "cannot be reached" in hint and "work without it" in hint
