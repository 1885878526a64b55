"""The structure map: merging steps, renumbering, and refusing a change that cannot follow another."""

import pytest

from hfcompress.errors import InvalidOptionError
from hfcompress.structure import Structure, dropped, lowrank, quantized, renamed_to, sparse


def test_steps_merge_into_one_map_per_module():
    structure = Structure()
    structure.add({"model.layers.0.mlp.up_proj": sparse(0.5)}, method="wanda")
    structure.add({"model.layers.0.mlp.up_proj": quantized(4, 64, "rtn")}, method="rtn")
    assert structure.modules["model.layers.0.mlp.up_proj"] == {**sparse(0.5), **quantized(4, 64, "rtn")}
    assert structure.kinds == {"sparse", "quantized"}
    assert structure.of_kind("quantized") == {"model.layers.0.mlp.up_proj": quantized(4, 64, "rtn")["quantized"]}
    assert Structure.from_dict(structure.to_dict()) == structure


def test_a_later_renumbering_rewrites_earlier_names():
    structure = Structure()
    structure.add({f"model.layers.{i}.mlp.up_proj": sparse(0.5) for i in range(4)}, method="wanda")
    renamed = {"model.layers.1": None, "model.layers.2": "model.layers.1", "model.layers.3": "model.layers.2"}
    structure.add({"model.layers.0.self_attn": dropped("attention")}, renamed=renamed,
                  config={"num_hidden_layers": 3}, method="layer_drop")
    assert "model.layers.3.mlp.up_proj" not in structure.modules
    assert structure.modules["model.layers.2.mlp.up_proj"] == sparse(0.5)
    assert structure.modules["model.layers.0.self_attn"] == dropped("attention")
    assert structure.removed == ["model.layers.1"]
    assert structure.config == {"num_hidden_layers": 3}
    assert renamed_to("model.layers.10.mlp", {"model.layers.1": "model.layers.0"}) == "model.layers.10.mlp"


@pytest.mark.parametrize("first,then,why", [(quantized(4, 64, "rtn"), sparse(0.5), "prune before quantizing"),
                                            (quantized(4, 64, "rtn"), lowrank(8), "decompose before quantizing"),
                                            (lowrank(8), sparse(0.5), "prune before decomposing")])
def test_a_change_that_cannot_follow_is_refused_with_the_reason(first, then, why):
    structure = Structure()
    structure.add({"layer": first}, method="first")
    with pytest.raises(InvalidOptionError, match=why):
        structure.add({"layer": then}, method="second")


def test_format_version_1_steps_become_sparse_entries():
    steps = [{"method": "wanda", "modules": {"model.layers.0.mlp.up_proj": {"sparsity": 0.5}}}]
    assert Structure.from_steps(steps).modules == {"model.layers.0.mlp.up_proj": sparse(0.5)}


def test_a_replaced_module_takes_its_earlier_entries_and_those_inside_it_along():
    structure = Structure()
    structure.add({"m.layers.0.self_attn.q_proj": sparse(0.5), "m.layers.0.mlp.up_proj": sparse(0.5)}, method="a")
    structure.add({"m.layers.0.self_attn": dropped("attention"), "m.layers.0.mlp.up_proj": lowrank(8)}, method="b")
    assert structure.modules == {"m.layers.0.self_attn": dropped("attention"), "m.layers.0.mlp.up_proj": lowrank(8)}
