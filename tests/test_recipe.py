import pytest

from hfcompress import Recipe, make_config
from hfcompress.errors import InvalidOptionError, OutputExistsError, PushError, UnknownMethodError
from hfcompress.methods.wanda import WandaConfig

YAML = """
model: HuggingFaceTB/SmolLM2-135M
steps:
  - {method: magnitude, sparsity: 0.3}
  - {method: wanda, pattern: "2:4"}
calibration: {source: builtin, n_samples: 64, seq_len: 512, seed: 3}
output: {dir: out/never-written, push_to: me/smollm2-compressed, private: true}
"""


def test_yaml_and_python_build_the_same_recipe():
    from_yaml = Recipe.from_yaml(YAML)
    from_python = Recipe(
        model="HuggingFaceTB/SmolLM2-135M",
        steps=[make_config("magnitude", {"sparsity": 0.3}), WandaConfig(pattern="2:4")],
        calibration={"source": "builtin", "n_samples": 64, "seq_len": 512, "seed": 3},
        output={"dir": "out/never-written", "push_to": "me/smollm2-compressed", "private": True},
    )
    assert from_yaml == from_python
    assert Recipe.from_yaml(from_yaml.to_yaml()) == from_yaml  # round trip


def test_cli_strings_are_coerced_to_the_field_types():
    config = make_config("wanda", {"sparsity": "0.6", "sequential": "false", "targets": "*.mlp.*,*.self_attn.*"})
    assert config == WandaConfig(sparsity=0.6, sequential=False, targets=("*.mlp.*", "*.self_attn.*"))


@pytest.mark.parametrize("data, error, message", [
    ({"model": "m", "steps": [{"method": "prune_all"}]}, UnknownMethodError, "valid methods: .*`wanda`"),
    ({"model": "m", "steps": [{"method": "wanda", "sparsty": 0.5}]}, InvalidOptionError,
     "sparsty.*valid options: .*`sparsity`"),
    ({"model": "m", "steps": [{"method": "wanda", "sparsity": 1.5}]}, InvalidOptionError, r"\[0, 1\)"),
    ({"model": "m", "steps": [{"method": "wanda", "pattern": "4:2"}]}, InvalidOptionError, "N < M"),
    ({"model": "m", "steps": [{"method": "wanda", "sparsity": "half"}]}, InvalidOptionError, "expects float"),
    ({"model": "m", "steps": [], "calibrate": {}}, InvalidOptionError, "valid keys"),
    ({"model": "m", "steps": [], "calibration": {"samples": 3}}, InvalidOptionError, "n_samples"),
    ({"steps": []}, InvalidOptionError, "no `model`"),
])
def test_bad_recipes_fail_at_construction_naming_valid_choices(data, error, message):
    with pytest.raises(error, match=message):
        Recipe.from_dict(data)


def test_validate_refuses_an_existing_output_folder_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    recipe = Recipe(model="m", steps=[WandaConfig()], output={"dir": str(tmp_path)})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        recipe.validate()
    with pytest.raises(OutputExistsError, match="only replaces an earlier hfcompress output"):
        Recipe(model="m", steps=[WandaConfig()], output={"dir": str(tmp_path), "overwrite": True}).validate()
    (tmp_path / "hfcompress.json").write_text("{}")
    Recipe(model="m", steps=[WandaConfig()], output={"dir": str(tmp_path), "overwrite": True}).validate()
    Recipe(model="m", steps=[WandaConfig()], output={"dir": str(tmp_path / "new")}).validate()


def test_validate_never_lets_the_output_overlap_the_source_or_the_working_folder(tmp_path, monkeypatch):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    for out in (source, source / "sub", tmp_path):
        with pytest.raises(OutputExistsError, match="overlap the source"):
            Recipe(model=str(source), steps=[WandaConfig()], output={"dir": str(out), "overwrite": True}).validate()
    monkeypatch.chdir(source / "..")
    with pytest.raises(OutputExistsError, match="working or home folder"):
        Recipe(model="org/m", steps=[WandaConfig()], output={"dir": ".", "overwrite": True}).validate()


def test_recipe_file_errors_are_clear(tmp_path):
    with pytest.raises(InvalidOptionError, match="does not exist"):
        Recipe.from_yaml(str(tmp_path / "typo.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(InvalidOptionError, match="not valid YAML"):
        Recipe.from_yaml(str(bad))


def test_validate_refuses_pushing_to_the_source_repo_or_without_a_folder():
    with pytest.raises(PushError, match="source model"):
        Recipe(model="org/model", steps=[WandaConfig()], output={"dir": "o", "push_to": "org/model"}).validate()
    with pytest.raises(InvalidOptionError, match="needs an output folder"):
        Recipe(model="org/model", steps=[WandaConfig()], output={"push_to": "me/new"}).validate()


def test_validate_needs_steps_and_positive_sizes():
    with pytest.raises(InvalidOptionError, match="no steps"):
        Recipe(model="m").validate()
    with pytest.raises(InvalidOptionError, match="n_samples must be positive"):
        Recipe(model="m", steps=[WandaConfig()], calibration={"n_samples": 0})
    with pytest.raises(InvalidOptionError, match="n_windows .--eval-windows. must be positive"):
        Recipe(model="m", steps=[WandaConfig()], evaluation={"n_windows": 0})


def test_a_step_is_described_by_the_options_that_apply_to_it_and_readable_numbers():
    from hfcompress.options import options_text
    from hfcompress.pipeline import _stat_text

    default, faithful = (options_text(make_config("dsnot", {"faithful": f})) for f in (False, True))
    assert "estimate: hessian" in default and "power" not in default and "threshold" not in default
    assert "power: 1.0, threshold: 0.1" in faithful and "estimate" not in faithful
    first, zeroth = (options_text(make_config("ecoflap", {"order": o})) for o in ("first", "zeroth"))
    assert "eps" not in first and "perturb" not in first and "perturb: all" in zeroth and "eps: 0.001" in zeroth
    scores = {"model.layers.0": 0.4991234, "model.layers.1": 0.52, "model.layers.10": 0.6}
    assert _stat_text(scores) == "{0: 0.499, 1: 0.52, 10: 0.6}" and _stat_text(0.123456) == "0.1235"
