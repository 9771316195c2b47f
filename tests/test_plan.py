"""SharingPlan: constructors, validation and storage accounting (DESIGN.md section 2)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import hydraopt_jax as hj
from hydraopt_jax import SharingPlan


def test_named_plans_have_the_documented_group_counts():
    T = 6
    assert (SharingPlan.shared_a(T).num_a_groups, SharingPlan.shared_a(T).num_b_groups) == (1, T)
    assert (SharingPlan.shared_b(T).num_a_groups, SharingPlan.shared_b(T).num_b_groups) == (T, 1)
    assert (SharingPlan.full_merge(T).num_a_groups, SharingPlan.full_merge(T).num_b_groups) == (
        1,
        1,
    )
    assert (SharingPlan.separate(T).num_a_groups, SharingPlan.separate(T).num_b_groups) == (T, T)
    for name in ("shared_a", "shared_b", "full_merge", "separate"):
        assert SharingPlan.named(name.replace("_", "-"), T).name == name


def test_grouping_by_attributes_b_per_application_a_per_language():
    attrs = [{"app": a, "lang": l} for a in ("qa", "sum") for l in ("fr", "de", "es")]
    plan = SharingPlan.from_attributes(attrs, share_a_by="lang", share_b_by="app", rank=4)
    assert plan.a_group == (0, 1, 2, 0, 1, 2)
    assert plan.b_group == (0, 0, 0, 1, 1, 1)
    assert plan.rank == 4
    assert not plan.has_closed_form  # neither side nests in the other: ALS territory
    one_a = SharingPlan.from_attributes(attrs, share_a_by="*", share_b_by="app")
    assert one_a.a_group == (0,) * 6 and one_a.has_closed_form


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a_group=[0, 1], b_group=[0]), "a_group has 2 tasks but b_group has 1"),
        (dict(a_group=[0, 2], b_group=[0, 1]), "contiguous"),
        (dict(a_group=[1, 1], b_group=[0, 1]), "contiguous"),
        (dict(a_group=[0, 0], b_group=[0, 1], rank=0), "rank must be an integer >= 1, got 0"),
        (dict(a_group=[0, 0], b_group=[0, 1], rank=2.5), "rank must be an integer"),
        (dict(a_group=[], b_group=[]), "at least one task"),
    ],
)
def test_invalid_plans_are_refused_with_what_arrived(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharingPlan(**kwargs)


def test_unknown_named_plan_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown plan 'shared-c'.*shared_a"):
        SharingPlan.named("shared-c", 3)


def test_storage_accounting_counts_each_group_factor_once():
    T, r, d_in, d_out = 40, 16, 2048, 512
    plan = SharingPlan.shared_a(T, rank=r)
    assert plan.num_params(d_in, d_out) == r * d_in + T * d_out * r
    ratio = plan.storage_ratio(d_in, d_out, [r] * T)
    assert ratio == pytest.approx((r * d_in + T * d_out * r) / (T * r * (d_in + d_out)))
    assert SharingPlan.separate(T, r).storage_ratio(d_in, d_out, [r] * T) == 1.0


def test_restrict_relabels_groups_contiguously():
    plan = SharingPlan(a_group=[0, 1, 1, 2], b_group=[0, 1, 2, 3], rank=2)
    sub = plan.restrict([1, 3])
    assert sub.a_group == (0, 1) and sub.b_group == (0, 1) and sub.rank == 2


@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.data())
def test_nesting_criterion_matches_its_definition(a_labels, data):
    b_labels = data.draw(
        st.lists(st.integers(0, 4), min_size=len(a_labels), max_size=len(a_labels))
    )
    plan = SharingPlan.from_labels(a_labels, b_labels)
    b_in_a = all(len({plan.a_group[t] for t in members}) == 1 for members in plan.groups("b"))
    assert plan.b_nested_in_a == b_in_a
    assert SharingPlan.from_dict(plan.to_dict()) == plan
    assert hash(plan) == hash(SharingPlan.from_dict(plan.to_dict()))


def test_public_names_exist():
    for name in ("SharingPlan", "merge", "merge_adapters", "Solution", "RESULTS"):
        assert hasattr(hj, name)
