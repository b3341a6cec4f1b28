"""The task-arithmetic family's registry (mergehub/merge/methods/members.py): every member keeps
the recipe parameters, defaults and parts the per-method classes had (written out here from
those classes, in their order: ``--dry-run`` prints the parameters in it), and a member line
that leaves out a parameter its parts read is refused where it is written."""

from __future__ import annotations

import pytest

from mergehub.merge.methods import METHODS
from mergehub.merge.methods.family import GeneralizedTaskArithmetic, Member
from mergehub.merge.methods.sparsifiers import MagnitudeTrim, OutlierBand, RandomDrop

TIES = [("lambda", 1.0), ("normalize", True), ("rescale", False), ("int8_mask", False),
        ("trim_scope", "tensor"), ("sign_method", "sum"), ("density_tolerance", 0.0),
        ("ties", "index")]
DARE = [("lambda", 1.0), ("normalize", False), ("rescale", True), ("int8_mask", False)]
BREADCRUMBS = [("lambda", 1.0), ("normalize", False), ("rescale", False), ("int8_mask", False),
               ("ties", "index")]
BAND = [("weight", 1.0), ("density", 1.0), ("gamma", 0.01)]

#: name -> (per-model parameters, global parameters, sparsifier, election, consensus)
MEMBERS = {
    "task_arithmetic": ([("weight", 1.0)],
                        [("lambda", 1.0), ("normalize", False), ("int8_mask", False)],
                        None, None, False),
    "ties": ([("weight", 1.0), ("density", 1.0)], TIES, MagnitudeTrim, "sign_method", False),
    "dare_linear": ([("weight", 1.0), ("density", 1.0)], DARE, RandomDrop, None, False),
    "dare_ties": ([("weight", 1.0), ("density", 1.0)], DARE, RandomDrop, "sum", False),
    "breadcrumbs": (BAND, BREADCRUMBS, OutlierBand, None, False),
    "breadcrumbs_ties": (BAND, BREADCRUMBS, OutlierBand, "sum", False),
    "consensus_task_arithmetic": ([("weight", 1.0), ("tall_lambda", 0.4)],
                                  [("lambda", 1.0), ("k", 2), ("normalize", False)],
                                  None, None, True),
    "consensus_ties": ([("weight", 1.0), ("density", 0.2), ("tall_lambda", 0.4)],
                       [("lambda", 1.0), ("normalize", False), ("rescale", False),
                        ("int8_mask", False), ("trim_scope", "global"), ("sign_method", "sum"),
                        ("density_tolerance", 0.0), ("ties", "index"), ("k", 2)],
                       MagnitudeTrim, "sign_method", True),
}


def test_the_family_is_these_members():
    family = sorted(n for n, m in METHODS.items() if isinstance(m, Member))
    assert family == sorted(MEMBERS)
    assert sorted(set(METHODS) - set(MEMBERS)) == ["linear", "metric_weighted", "rmm"]


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_every_member_keeps_its_parameters_and_parts(name):
    per_model, global_, sparsifier, election, consensus = MEMBERS[name]
    member = METHODS[name]
    assert member.name == name
    assert list(member.model_params.items()) == per_model
    assert list(member.global_params.items()) == global_
    assert (member.sparsifier, member.election, member.consensus) == (
        sparsifier, election, consensus)
    assert member.needs_base and member.on_deltas and not member.base_is_input
    if "rescale" in member.global_params:  # DARE's alone also takes "l1"
        assert member.rule("rescale").accepts("l1") == name.startswith("dare")
    method = member({"lambda": 0.5})
    assert isinstance(method, GeneralizedTaskArithmetic) and method.member is member
    assert method.params == {**dict(global_), "lambda": 0.5}
    assert member.linear == (name == "task_arithmetic")  # what a PEFT adapter output needs


def test_the_election_follows_sign_method_where_a_member_has_it():
    assert METHODS["ties"]({"sign_method": "count"}).elect == "count"
    assert METHODS["consensus_ties"]({}).elect == "sum"
    assert METHODS["dare_ties"]({}).elect == "sum"
    assert METHODS["breadcrumbs"]({}).elect is None


def test_a_member_must_declare_what_its_parts_read():
    with pytest.raises(ValueError, match=r"trimmed: its parts read parameters it does not "
                                         r"declare: density \(per model\), density_tolerance "
                                         r"\(global\), rescale \(global\), ties \(global\), "
                                         r"trim_scope \(global\)"):
        Member("trimmed", {"weight": 1.0}, {"lambda": 1.0, "normalize": False}, MagnitudeTrim)
    with pytest.raises(ValueError, match=r"k \(global\), tall_lambda \(per model\)"):
        Member("voted", {"weight": 1.0}, {"lambda": 1.0, "normalize": False}, consensus=True)
    with pytest.raises(ValueError, match="sign_method"):
        Member("elected", {"weight": 1.0}, {"lambda": 1.0, "normalize": False},
               election="sign_method")
    with pytest.raises(ValueError, match="election must be one of"):
        Member("odd", {"weight": 1.0}, {"lambda": 1.0, "normalize": False}, election="mean")
