"""Step planning and the run's hooks: every step checked on the weightless model before loading, steps that cannot
follow each other refused, recipes of several kinds of change round-tripping, progress, cancel, option names."""

import dataclasses
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

import hfcompress
from hfcompress.context import Cancelled
from hfcompress.errors import InvalidOptionError
from hfcompress.registry import RESERVED_OPTIONS, register
from hfcompress.sequential import find_linears, named_blocks, weight_matrix
from tests.test_bad_input import no_weights  # noqa: F401  (fixture)
from tests.tiny_models import fingerprint, reloaded_outputs, same_outputs

FAST = {"calibration": {"n_samples": 4, "seq_len": 32}, "evaluation": {"seq_len": 64, "n_windows": 2,
                                                                        "speed": False, "samples": False}}


def test_magnitude_then_rtn_keeps_the_zeros_and_round_trips(tiny, tmp_path):
    out = tmp_path / "out"
    result = hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "magnitude", "sparsity": 0.5},
                                                                     {"method": "rtn", "bits": 4}],
                                  **FAST, "output": {"dir": str(out)}}, log=lambda line: None)
    for prefix, block in named_blocks(result.model):
        for name, layer in find_linears(block, prefix=prefix).items():
            zeros = weight_matrix(layer) == 0
            assert (zeros.sum(1) >= zeros.shape[1] // 2).all(), name   # magnitude's zeros survive quantization
            assert set(result.structure.modules[name]) == {"sparse", "quantized"}
    assert result.after["sparsity"] >= 0.5
    expected = fingerprint(result.model)
    for loader, reloaded in reloaded_outputs(str(out), tmp_path).items():
        assert isinstance(reloaded, torch.Tensor) and same_outputs(reloaded, expected), loader


def test_a_step_that_cannot_follow_is_refused_before_loading(tiny, no_weights):  # noqa: F811
    with pytest.raises(InvalidOptionError, match="`wanda` cannot change .* after an earlier step made it quantized"):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "rtn"}, {"method": "wanda"}]},
                            log=lambda line: None)


def test_a_group_size_that_does_not_divide_fails_before_loading(tiny, no_weights):  # noqa: F811
    with pytest.raises(InvalidOptionError, match=r"group_size 48 does not divide .*\[64, 128\].*32"):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "rtn", "group_size": 48}]},
                            log=lambda line: None)


def test_progress_per_block_and_cancel_between_blocks(tiny, tmp_path):
    seen = []
    hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "wanda"}], **FAST},
                        log=lambda line: None, progress=lambda fraction, desc="": seen.append((fraction, desc)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("model.layers." in desc for _, desc in seen) == 3      # one report per block of the tiny Llama

    blocks_started = []

    def cancel():
        blocks_started.append(1)
        return len(blocks_started) > 4                               # a few checks in: during the block loop
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        hfcompress.compress({"model": tiny("llama"), "steps": [{"method": "wanda"}], **FAST,
                             "output": {"dir": str(out)}}, log=lambda line: None, cancel=cancel)
    assert not out.exists() and list(tmp_path.iterdir()) == []       # nothing left behind


def test_method_options_never_reuse_a_pipeline_flag_and_mean_one_thing():
    from hfcompress.cli import SECTION_FLAGS, _flag_dest
    from hfcompress.options import config_fields, field_types, option_choices

    assert {_flag_dest(flag) for flag in SECTION_FLAGS.values()} <= RESERVED_OPTIONS
    types: dict[str, object] = {}
    for name, spec in hfcompress.available_methods().items():
        for field in config_fields(spec.config_class):
            assert field.name not in RESERVED_OPTIONS, (name, field.name)
            assert types.setdefault(field.name, field_types(spec.config_class)[field.name]) == \
                field_types(spec.config_class)[field.name], (name, field.name)

    from hfcompress.methods.magnitude import MagnitudeConfig

    assert option_choices(MagnitudeConfig, "scope") == ("row", "layer")      # a form shows them as a dropdown
    with pytest.raises(InvalidOptionError, match="scope 'cols' is not valid for `magnitude`; valid: `row`, `layer`"):
        hfcompress.make_config("magnitude", {"scope": "cols"})

    @dataclasses.dataclass(frozen=True)
    class Clashing:
        method: ClassVar[str] = "clashing"
        seed: int = 0

    with pytest.raises(TypeError, match=r"\['seed'\] reuse pipeline option names"):
        register(Clashing, paper="", needs_calibration=False)


def test_importing_the_recipe_pulls_in_no_heavy_library():
    code = ("import sys, hfcompress.recipe, hfcompress.registry\n"
            "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
            "print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_later_steps_are_checked_against_the_skeleton_as_earlier_steps_left_it(tiny, no_weights,  # noqa: F811
                                                                                monkeypatch):
    """A structural step edits the weightless model during planning; a later step's check sees the edit."""
    from hfcompress import preflight as pipeline  # the checks before loading
    from hfcompress.modules import remove_blocks
    from hfcompress.registry import MethodSpec, Report, get_method

    @dataclasses.dataclass(frozen=True)
    class DropConfig:
        method: ClassVar[str] = "drop_test"

    def check(skeleton, config):
        renamed, changes = remove_blocks(skeleton, "model.layers", [1])
        return Report("drop_test", renamed=renamed, config=changes)

    drop = MethodSpec("drop_test", DropConfig, lambda model, config, context: None, "", False, ("causal-lm",), "",
                      check, "dropped")
    monkeypatch.setattr(pipeline, "get_method", lambda name: drop if name == "drop_test" else get_method(name))
    recipe = hfcompress.Recipe(model=tiny("llama"), steps=[hfcompress.make_config("wanda", {})])
    recipe.steps = [DropConfig(), hfcompress.make_config("wanda", {"targets": "model.layers.2.*"})]
    with pytest.raises(InvalidOptionError, match=r"match no Linear layer.*model\.layers\.0"):
        pipeline.plan(pipeline.resolve(tiny("llama")), recipe)    # block 2 is gone: there are blocks 0 and 1
    recipe.steps[1] = hfcompress.make_config("wanda", {"targets": "model.layers.1.*"})
    planned = pipeline.plan(pipeline.resolve(tiny("llama")), recipe)
    assert planned.removed == ["model.layers.1"] and planned.config["num_hidden_layers"] == 2
    assert set(planned.modules) == {f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj", "self_attn.o_proj",
                                                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("step,windows,said", [
    ({"method": "sparsegpt"}, (4, 16), "sparsegpt solves"),              # 64 tokens, inputs up to 128 wide
    ({"method": "gptq", "bits": 4}, (8, 24), "gptq solves"),              # 192: not singular, under twice 128
    ({"method": "dsnot"}, (4, 16), "dsnot solves"),                       # its default error uses the Hessian
    ({"method": "dsnot", "estimate": "diagonal"}, (4, 16), None),         # channel statistics only
    ({"method": "layerwise_quant", "bits": [4, 2], "avg_bits": 3, "quantizer": "gptq"}, (4, 16),
     "layerwise_quant solves"),
    ({"method": "layerwise_quant", "bits": [4, 2], "avg_bits": 3}, (4, 16), None),  # rtn under the allocation
    ({"method": "wanda"}, (4, 16), None),
    ({"method": "sparsegpt"}, (16, 16), None),                           # twice the widest input: enough
    ({"method": "sparsegpt", "targets": ["*.self_attn.*"]}, (8, 16), None),  # the layers it prunes: 64 wide
    ({"method": "lord", "mode": "activation"}, (4, 16), "lord solves"),
    ({"method": "lord", "mode": "svd"}, (4, 16), None),
])
def test_too_few_tokens_for_a_hessian_is_said_before_loading(tiny, step, windows, said):
    from hfcompress.preflight import preflight

    lines = []
    recipe = {"model": tiny("llama"), "steps": [step], "calibration": {"n_samples": windows[0], "seq_len": windows[1]}}
    preflight(hfcompress.Recipe.from_dict(recipe), log=lines.append)
    notes = [line for line in lines if "X^T X" in line]
    tokens = windows[0] * windows[1]
    if said is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(f"note: {said} with each layer's input Hessian X^T X, here "
                                                       f"from {tokens} calibration tokens for inputs up to 128 wide "
                                                       "(mlp.down_proj)")
        assert ("singular" in notes[0]) == (tokens < 128) and "give at least 256 (--n-samples x --seq-len;" in notes[0]
