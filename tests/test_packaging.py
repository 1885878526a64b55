"""A regular (non-editable) install holds every module and data file of the source tree and imports cleanly.

Editable installs read the source tree itself, so a subpackage missing from pyproject.toml's package list only
shows in a built wheel: this builds one, as `pip install .` does, and looks inside.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_holds_every_module_and_data_file(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("hfcompress", "model_cards"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(source)], check=True, capture_output=True)

    expected = {path.relative_to(source) for path in (source / "hfcompress").rglob("*") if path.is_file()}
    expected |= {Path("hfcompress", path.relative_to(source)) for path in (source / "model_cards").glob("*.j2")}
    installed = {path.relative_to(site) for path in (site / "hfcompress").rglob("*") if path.is_file()}
    assert not expected - installed, f"left out of a regular install: {sorted(map(str, expected - installed))}"

    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(site)!r})
        import importlib, pkgutil
        import hfcompress
        assert hfcompress.__file__.startswith({str(site)!r}), hfcompress.__file__
        for module in pkgutil.walk_packages(hfcompress.__path__, "hfcompress."):
            if module.name not in ("hfcompress.space", "hfcompress.__main__"):  # gradio is an extra; main runs
                importlib.import_module(module.name)
        for spec in hfcompress.available_methods().values():
            spec.transform, spec.config_class
        print("install ok")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "install ok" in done.stdout, done.stderr[-3000:]
