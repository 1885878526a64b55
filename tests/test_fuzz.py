"""Property tests: whatever a recipe holds, the only error that escapes is an HfCompressError with a message; and the
mask maths holds for any shape and ratio. Bounded and seeded (derandomized) so CI runs them fast and the same way."""

import json
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.options import config_fields
from hfcompress.recipe import Recipe

# CI: 150 examples a test, the same ones every run. The longer run: HYPOTHESIS_PROFILE=long (5,000, seeded too).
for name, examples in (("ci", 150), ("long", 5000)):
    settings.register_profile(name, max_examples=examples, derandomize=True, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["0.5", "2:4", "4,2", "auto", "1e-3", "-1", "", "nan"]))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                         max_leaves=12)
METHODS = sorted(hfcompress.available_methods())
FIELDS = {name: [f.name for f in config_fields(spec.config_class)]
          for name, spec in hfcompress.available_methods().items()}


def _only_clear_errors(call):
    try:
        call()
    except HfCompressError as error:
        assert str(error).strip(), "an error without a message"


@given(document=documents)
def test_any_document_as_a_recipe(document):
    _only_clear_errors(lambda: (Recipe.from_dict(document) if isinstance(document, dict) else
                                Recipe.from_yaml(json.dumps(document))).validate())


@given(text=st.text(max_size=200))
def test_any_text_as_a_recipe_file(text):
    _only_clear_errors(lambda: Recipe.from_yaml(text + "\n"))


@given(data=st.data())
def test_any_values_for_any_method(data):
    method = data.draw(st.sampled_from(METHODS))
    names = data.draw(st.lists(st.sampled_from(FIELDS[method] + ["not_an_option"]), max_size=4, unique=True))
    options = {name: data.draw(documents) for name in names}
    _only_clear_errors(lambda: hfcompress.make_config(method, options))
    _only_clear_errors(lambda: Recipe.from_dict({"model": "x", "steps": [{"method": method, **options}]}).validate())


@given(rows=st.integers(1, 9), columns=st.integers(1, 70), ratio=st.floats(0, 0.99), seed=st.integers(0, 10 ** 6))
def test_row_masks_prune_exactly_the_asked_share_of_every_row(rows, columns, ratio, seed):
    from hfcompress.sparsity import keep_mask

    scores = torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed))
    keep = keep_mask(scores, ratio, None)
    assert keep.shape == scores.shape
    assert ((~keep).sum(1) == int(columns * ratio)).all()


@given(rows=st.integers(1, 6), groups=st.integers(1, 8), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
       seed=st.integers(0, 10 ** 6))
def test_n_m_masks_hold_in_every_group(rows, groups, nm, seed):
    from hfcompress.sparsity import keep_mask

    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = keep_mask(scores, n / m, nm=(n, m))
    assert ((~keep).reshape(rows, groups, m).sum(-1) == n).all()

