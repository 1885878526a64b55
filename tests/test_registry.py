import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest

import hfcompress
from hfcompress.errors import UnknownMethodError
from hfcompress.registry import get_method, register


def test_builtin_methods_are_registered_with_metadata():
    methods = hfcompress.available_methods()
    assert {"magnitude", "rtn", "wanda"} <= set(methods)
    assert methods["wanda"].needs_calibration and not methods["magnitude"].needs_calibration
    assert methods["wanda"].paper.startswith("https://arxiv.org/")


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(UnknownMethodError, match="valid methods: .*`magnitude`.*`wanda`"):
        get_method("wandaa")


def test_registration_refuses_mistakes():
    @dataclass
    class NotFrozen:
        method: ClassVar[str] = "x"

    with pytest.raises(TypeError, match="frozen dataclass"):
        register(NotFrozen, paper="", needs_calibration=False)

    @dataclass(frozen=True)
    class Nameless:
        pass

    with pytest.raises(TypeError, match="method"):
        register(Nameless, paper="", needs_calibration=False)

    @dataclass(frozen=True)
    class Clash:
        method: ClassVar[str] = "wanda"

    with pytest.raises(TypeError, match="already registered"):
        register(Clash, paper="", needs_calibration=False)(lambda model, config, context: None)

    @dataclass(frozen=True)
    class OldStyle:
        method: ClassVar[str] = "old_style"

    with pytest.raises(TypeError, match=r"must take \(model, config, context\)"):
        register(OldStyle, paper="", needs_calibration=False)(lambda model, config, calibration, device: None)


PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from hfcompress import Report, register


@dataclass(frozen=True)
class ScaleConfig:
    method: ClassVar[str] = "scale_plugin"
    factor: float = 1.0


@register(ScaleConfig, paper="https://example.org/scale", needs_calibration=False)
def scale(model, config, context):
    """Multiply every weight by a factor (a test plugin)."""
    for p in model.parameters():
        p.data.mul_(config.factor)
    return Report("scale_plugin", {"factor": config.factor})
'''


def test_third_party_method_is_discovered_through_its_entry_point(tmp_path, tiny):
    src = tmp_path / "plugin"
    (src / "hfc_scale_plugin").mkdir(parents=True)
    (src / "hfc_scale_plugin" / "__init__.py").write_text(PLUGIN)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "hfc-scale-plugin"
        version = "0.1"
        [project.entry-points."hfcompress.methods"]
        scale_plugin = "hfc_scale_plugin"
        """))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(src)], check=True, capture_output=True)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(target)!r})
        import hfcompress
        spec = hfcompress.available_methods()["scale_plugin"]
        assert spec.paper == "https://example.org/scale" and not spec.needs_calibration
        result = hfcompress.compress({{"model": {tiny("llama")!r}, "steps": [{{"method": "scale_plugin",
                                      "factor": "0"}}], "evaluation": {{"enabled": False}}}}, log=lambda s: None)
        assert all((p == 0).all() for p in result.model.parameters())
        print("plugin ok")
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "plugin ok" in out.stdout, out.stderr
