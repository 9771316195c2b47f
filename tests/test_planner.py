"""The planner: Gram-space losses against `merge`, the knapsack, and `hydraopt plan` / `sweep`
end to end on small PEFT adapter directories written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml

import hydraopt_jax as hj
from hydraopt_jax._loss import regularized_covariance
from hydraopt_jax.planner import (
    allocate,
    choose,
    collection_options,
    module_options,
    module_stats,
    per_task_truncation,
    plan_budget,
    plans_from_config,
    task_attributes_from_names,
)
from hydraopt_jax.planner._attributes import groupings
from tests.helpers.grid import (
    ATTRS,
    NAMES,
    make_collection,
)


@pytest.fixture(scope="module")
def options(collection):
    return collection_options(collection, task_names=NAMES, task_attributes=ATTRS)


def test_attributes_from_names():
    assert task_attributes_from_names(NAMES)[0] == {"part0": "chat", "part1": "fr"}
    parsed = task_attributes_from_names(NAMES, r"(?P<app>[a-z]+)_(?P<lang>[a-z]+)")
    assert parsed == ATTRS
    assert task_attributes_from_names(["a", "b_c"]) == [{}, {}]
    with pytest.raises(ValueError, match="does not match"):
        task_attributes_from_names(["x-y"], r"(?P<a>\w+)_(?P<b>\w+)")


@pytest.mark.parametrize("with_cov", [False, True])
def test_option_losses_and_errors_match_merge(with_cov):
    """Every family (shared-A, shared-B, grouped, full merge, separate, and nested ranks in
    shared and grouped factors on either side), mixed ranks and an absent task: the
    Gram-space loss and per-task errors are merge's exact solver's."""
    coll = make_collection(seed=1, ranks=(4, 2, 4, 0, 3, 4))
    a, b, ranks = coll["model.layers.0.self_attn.k_proj"]
    rng = np.random.default_rng(2)
    cov = None
    if with_cov:
        x = rng.normal(size=(64, a.shape[2]))
        cov = x.T @ x / 64
    stats = module_stats("m", a, b, ranks, activation_cov=cov)
    opts = module_options(stats, groupings(len(NAMES), ATTRS))
    assert {o.name for o in opts} >= {"shared-a", "shared-b", "full-merge", "separate"}
    picks = [
        o
        for o in opts
        if (o.name, o.rank_label)
        in {
            ("shared-a", "1r"),
            ("shared-b", "2r"),
            ("full-merge", "1r"),
            ("A:app,B:task", "0.5r"),
            ("A:task,B:app", "1.5r"),
            ("A:all,B:app", "1r"),
            ("separate", "0.5r"),
            ("shared-a j=1", "1r"),
            ("shared-b j=2", "2r"),
            ("A:app,B:task j=2", "1.5r"),
            ("A:task,B:app j=4", "2r"),
        }
    ]
    assert len(picks) == 11
    present = list(stats.present)
    for o in picks:
        sol = hj.merge(a[present], b[present], o.plan, activation_cov=cov)
        np.testing.assert_allclose(o.loss, float(sol.loss), rtol=1e-7, atol=1e-9, err_msg=o.name)
        np.testing.assert_allclose(
            o.relative_error, np.asarray(sol.relative_error), rtol=1e-6, atol=1e-7
        )
        assert o.num_params == sol.num_params


def test_allocate_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        costs = [np.sort(rng.integers(1, 100, size=5)) for _ in range(4)]
        losses = [np.sort(rng.uniform(0, 10, size=5))[::-1] for _ in range(4)]
        capacity = float(rng.uniform(sum(c.min() for c in costs), sum(c.max() for c in costs)))
        best = min(
            sum(losses[m][i] for m, i in enumerate(ch))
            for ch in itertools.product(range(5), repeat=4)
            if sum(costs[m][i] for m, i in enumerate(ch)) <= capacity
        )
        choice, _ = allocate(costs, losses, capacity)
        assert sum(costs[m][i] for m, i in enumerate(choice)) <= capacity
        assert sum(losses[m][i] for m, i in enumerate(choice)) <= best + 1e-9


def test_greedy_fill_takes_the_best_ratio_upgrade_each_time():
    """The fill (which keeps each module's best move between steps) makes the choices of the
    plain rule: recompute every module's upgrades each step, take the largest loss decrease
    per extra parameter that fits (first module, then first option, on a tie)."""
    from hydraopt_jax.planner._allocate import _greedy_fill

    def reference(choice, costs, losses, capacity):
        choice = list(choice)
        while True:
            left = capacity - sum(costs[m][c] for m, c in enumerate(choice))
            moves = [
                ((losses[m][choice[m]] - losses[m][i]) / (costs[m][i] - costs[m][choice[m]]), m, i)
                for m in range(len(choice))
                for i in range(len(costs[m]))
                if 0 < costs[m][i] - costs[m][choice[m]] <= left
                and losses[m][i] < losses[m][choice[m]]
            ]
            if not moves:
                return choice
            best = max(r for r, _, _ in moves)
            m, i = min((m, i) for r, m, i in moves if r == best)
            choice[m] = i

    rng = np.random.default_rng(0)
    for trial in range(200):
        costs = [rng.integers(1, 40, size=rng.integers(1, 12)).astype(float) for _ in range(6)]
        losses = [rng.uniform(0, 10, size=len(c)) for c in costs]
        if trial % 2:
            losses = [np.round(x) for x in losses]  # ties
        capacity = float(rng.uniform(sum(c.min() for c in costs), sum(c.max() for c in costs)))
        start = [int(np.argmin(c)) for c in costs]
        assert _greedy_fill(start, costs, losses, capacity) == reference(
            start, costs, losses, capacity
        )


def test_allocate_refuses_impossible_budget():
    with pytest.raises(ValueError, match="cheapest"):
        allocate([[10, 20]], [[1.0, 0.0]], 5)


@pytest.mark.parametrize("budget", [0.12, 0.2, 0.3, 0.5, 0.8])
def test_budget_respected(options, budget):
    bp = choose(*options, budget)
    assert bp.storage_ratio <= budget + 1e-12
    assert bp.num_params == sum(c.option.num_params for c in bp.modules.values())
    assert np.isclose(bp.loss, sum(c.option.loss for c in bp.modules.values()))


def test_too_small_budget_is_refused(options):
    with pytest.raises(ValueError, match="smallest achievable"):
        choose(*options, 1e-4)


def test_generous_budget_keeps_everything(options):
    bp = choose(*options, 1.0)
    assert bp.loss < 1e-9
    assert np.max(bp.task_relative_errors()) < 1e-5
    assert all(c.option.name == "separate" for c in bp.modules.values())


def test_similar_a_shared_dissimilar_a_gets_more(options):
    bp = choose(*options, 0.35)
    for layer in range(2):
        similar = bp.modules[f"model.layers.{layer}.self_attn.q_proj"].option
        dissimilar = bp.modules[f"model.layers.{layer}.self_attn.v_proj"].option
        assert similar.a_by == "all"  # one shared A
        assert dissimilar.a_by != "all" or dissimilar.rank > similar.rank
        assert dissimilar.num_params > similar.num_params


def test_size_module_weighting_is_each_modules_share_of_the_parameters(collection):
    """`module_weights="size"` = the mapping `(d_in + d_out) / mean`; it moves storage to
    the larger modules (here the 32 -> 32 ones over the 32 -> 12 `k_proj`)."""
    sizes = {m: a.shape[2] + b.shape[1] for m, (a, b) in collection.items()}
    mapping = {m: s / np.mean(list(sizes.values())) for m, s in sizes.items()}
    by_name = plan_budget(collection, 0.2, task_attributes=ATTRS, module_weights="size")
    by_map = plan_budget(collection, 0.2, task_attributes=ATTRS, module_weights=mapping)
    equal = plan_budget(collection, 0.2, task_attributes=ATTRS)
    assert by_name.plans == by_map.plans and by_name.loss == pytest.approx(by_map.loss)
    assert plan_budget(collection, 0.2, task_attributes=ATTRS, module_weights="equal").plans == (
        equal.plans
    )

    def small_share(bp):
        params = {m: c.option.num_params for m, c in bp.modules.items()}
        return sum(v for m, v in params.items() if "k_proj" in m) / sum(params.values())

    assert by_name.plans != equal.plans and small_share(by_name) < small_share(equal)
    with pytest.raises(ValueError, match="module_weights must be 'equal' or 'size'"):
        plan_budget(collection, 0.3, module_weights="bytes")


def test_never_worse_than_uniform_plans(options):
    groupings, opts = options
    original = sum(st.original_params for st, _ in opts.values())
    checked = 0
    for key in [("all", "task"), ("task", "all"), ("all", "all"), ("lang", "task")]:
        for label in ("0.5r", "1r", "2r"):
            sel = [
                next(o for o in o_list if o.key == (*key, label, 0)) for _, o_list in opts.values()
            ]
            storage = sum(o.num_params for o in sel) / original
            loss = sum(o.loss for o in sel)
            if storage >= 1:
                continue
            bp = choose(groupings, opts, storage)
            assert bp.storage_ratio <= storage + 1e-12
            assert bp.loss <= loss + 1e-9, (key, label)
            checked += 1
    assert checked >= 9


def test_plans_merge_as_predicted(collection):
    bp = plan_budget(collection, 0.3, task_names=NAMES, task_attributes=ATTRS)
    solutions = hj.merge_adapters(collection, bp.plans)
    for module, sol in solutions.items():
        choice = bp.modules[module]
        assert sol.num_params == choice.option.num_params
        np.testing.assert_allclose(float(sol.loss), choice.option.loss, rtol=1e-5, atol=1e-7)


def test_yaml_round_trips(options):
    bp = choose(*options, 0.3)
    spec = yaml.safe_load(bp.to_yaml(NAMES))
    plans = plans_from_config(spec, NAMES, list(bp.modules))
    assert plans == bp.plans


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_per_task_truncation_is_each_update_cut_to_one_rank(collection, options, budget):
    """The reference: every task's own `dW_t` cut to its best rank-`j` approximation (dense
    numpy SVD here) on every module, the largest candidate `j` within the budget; the plan
    chosen at that budget has no higher loss."""
    groupings, opts = options
    level, ref = per_task_truncation(groupings, opts, budget)
    (j,) = set(level.ranks.values())
    assert level.name == f"rank {j}"
    original = sum(st.original_params for st, _ in opts.values())
    params = sum(j * (a.shape[2] + b.shape[1]) * a.shape[0] for a, b in collection.values())
    assert ref.num_params == params and params <= budget * original
    # the next candidate rank up would not fit
    assert 2 * params > budget * original
    for module, (a, b) in collection.items():
        for t in range(a.shape[0]):
            dw = b[t] @ a[t]
            u, s, vt = np.linalg.svd(dw)
            err = np.linalg.norm(dw - (u[:, :j] * s[:j]) @ vt[:j]) / np.linalg.norm(dw)
            assert ref.modules[module].relative_error[t] == pytest.approx(err, rel=1e-4)
    assert choose(groupings, opts, budget).loss <= ref.loss + 1e-9


def test_per_task_truncation_bounds(options):
    """Rank 1 per task is a quarter of these rank-4 adapters: nothing fits below it; and no
    budget, however large, makes the reference keep more than the module's LoRA rank."""
    assert per_task_truncation(*options, 0.24) is None
    assert per_task_truncation(*options, 0.25)[1].storage_ratio == pytest.approx(0.25)
    level, ref = per_task_truncation(*options, 4.0)
    assert level.fraction == 1 and ref.storage_ratio == pytest.approx(1.0) and ref.loss < 1e-9


def _mixed_options(collection, **kwargs):
    """Modules of LoRA rank 4 and 16 (the q and v projections widened to r = 16), and one
    module that only tasks 0 and 3 adapt."""
    mixed = _mixed_collection(collection)
    return collection_options(mixed, task_names=NAMES, task_attributes=ATTRS, **kwargs)


def _mixed_collection(collection):
    rng = np.random.default_rng(3)
    mixed = {}
    for name, (a, b) in collection.items():
        if "q_proj" in name or "v_proj" in name:
            a = np.concatenate([a, 0.3 * rng.normal(size=(a.shape[0], 12, a.shape[2]))], 1)
            b = np.concatenate([b, 0.3 * rng.normal(size=(b.shape[0], b.shape[1], 12))], 2)
        mixed[name] = (a, b)
    a, b = mixed["model.layers.0.self_attn.k_proj"]
    ranks = tuple(4 if t in (0, 3) else 0 for t in range(a.shape[0]))
    mixed["model.layers.0.self_attn.k_proj"] = (a * np.array(ranks)[:, None, None] / 4, b, ranks)
    return mixed


def test_per_task_truncation_with_mixed_ranks_and_absent_tasks(collection):
    """Levels are fractions of each module's own rank (r/4 is rank 1 on an r = 4 module and
    rank 4 on an r = 16 one), found on a module where only two tasks are present (there the
    per-task grouping coincides with an attribute grouping); `choose` starts from them."""
    groupings, opts = _mixed_options(collection)
    levels = hj.planner.truncation_levels(opts)
    assert [lv.fraction for lv in levels] == [0.125, 0.25, 0.5, 1.0]
    quarter = levels[1]
    for module, j in quarter.ranks.items():
        assert j == (4 if ("q_proj" in module or "v_proj" in module) else 1)
    level, ref = per_task_truncation(groupings, opts, 0.3)
    assert level.fraction == 0.25 and level.name == "k=0.25r"
    assert ref.storage_ratio == pytest.approx(0.25)
    for c in ref.modules.values():  # every task present keeps its own factors
        assert len(set(c.plan.restrict(c.task_ids).a_group)) == len(c.task_ids)
    for budget in (0.13, 0.25, 0.3, 0.6):
        found = per_task_truncation(groupings, opts, budget)
        if found is not None:
            assert choose(groupings, opts, budget).loss <= found[1].loss + 1e-9


# ------------------------------------------------- task weights relative to the whole adapter
def _dense_adapter_weights(collection, covs=None):
    total = np.zeros(len(NAMES))
    for m, value in collection.items():
        a, b = value[0], value[1]
        ranks = value[2] if len(value) > 2 else (a.shape[1],) * a.shape[0]
        for t in range(a.shape[0]):
            if ranks[t] == 0:
                continue
            dw = b[t] @ a[t]
            c = np.eye(a.shape[2]) if covs is None else regularized_covariance(covs[m], np)
            total[t] += np.trace(dw @ c @ dw.T)
    return 1 / total


def test_adapter_weights_are_one_over_each_tasks_whole_update(collection):
    """`w_t = 1 / sum_m ||dW_{m,t}||^2` (dense here), whitened by input covariances when
    given, and only over the modules a task adapts."""
    from hydraopt_jax._loss import adapter_task_weights

    covs = _random_covs(collection)
    entries = [(m, a, b, None) for m, (a, b) in collection.items()]
    np.testing.assert_allclose(
        adapter_task_weights(entries), _dense_adapter_weights(collection), rtol=1e-10
    )
    np.testing.assert_allclose(
        adapter_task_weights(entries, covs), _dense_adapter_weights(collection, covs), rtol=1e-10
    )
    mixed = dict(collection)
    a, b = mixed["model.layers.0.self_attn.k_proj"]
    ranks = (4, 0, 4, 0, 4, 4)  # tasks 1 and 3 do not adapt this module
    mixed["model.layers.0.self_attn.k_proj"] = (a, b, ranks)
    entries = [(m, v[0], v[1], v[2] if len(v) > 2 else None) for m, v in mixed.items()]
    np.testing.assert_allclose(
        adapter_task_weights(entries), _dense_adapter_weights(mixed), rtol=1e-10
    )
    with pytest.raises(ValueError, match="needs every module"):
        hj.merge(a, b, hj.SharingPlan.shared_a(len(NAMES)), weights="adapter")
    # covariances for some modules only: the others keep the plain metric (as in the merge)
    some = dict(list(covs.items())[:1])
    entries = [(m, a, b, None) for m, (a, b) in collection.items()]
    expected = 1 / (
        1 / _dense_adapter_weights(dict(list(collection.items())[:1]), some)
        + 1 / _dense_adapter_weights(dict(list(collection.items())[1:]))
    )
    np.testing.assert_allclose(adapter_task_weights(entries, some), expected, rtol=1e-10)
    plan = hj.SharingPlan.shared_a(len(NAMES))
    sols = hj.merge_adapters(collection, plan, weights="adapter", activation_covs=some)
    assert set(sols) == set(collection)


def test_adapter_weights_do_not_hide_a_shape_error(collection):
    """The merge's own message (module, shapes) comes before the weights are computed."""
    (m, (a, b)), *_ = collection.items()
    with pytest.raises(ValueError, match=f"merge \\({m}\\).*disagree"):
        hj.merge_adapters({m: (a, b[:, :, :2])}, hj.SharingPlan.shared_a(len(NAMES)),
                          weights="adapter")  # fmt: skip


def _random_covs(collection, seed=5):
    rng = np.random.default_rng(seed)
    covs = {}
    for m, (a, _) in collection.items():
        x = rng.normal(size=(64, a.shape[2])) * rng.uniform(0.2, 3.0, size=a.shape[2])
        covs[m] = x.T @ x / 64
    return covs


@pytest.mark.parametrize("with_covs", [False, True], ids=["plain", "activation"])
def test_adapter_weighted_planner_minimises_the_reported_task_errors(collection, with_covs):
    """With `weights="adapter"` the planner's total loss is `sum_t err_t^2` of the per-task
    errors it reports, which are those the merge reports (in the activation metric, under
    input covariances), and the merge fits the loss it predicted."""
    covs = _random_covs(collection) if with_covs else None
    groupings, opts = collection_options(
        collection, task_names=NAMES, task_attributes=ATTRS, weights="adapter",
        activation_covs=covs,
    )  # fmt: skip
    for budget in (0.3, 0.6):
        bp = choose(groupings, opts, budget)
        errors = bp.task_relative_errors()
        assert bp.loss == pytest.approx(float(np.sum(errors**2)), rel=1e-8)
        solutions = hj.merge_adapters(collection, bp.plans, weights="adapter", activation_covs=covs)
        merged = hj.task_relative_errors(solutions, len(NAMES))
        np.testing.assert_allclose(merged, errors, rtol=1e-3, atol=1e-6)
        w = _dense_adapter_weights(collection, covs)
        explicit = hj.merge_adapters(collection, bp.plans, weights=w, activation_covs=covs)
        for module, sol in solutions.items():
            np.testing.assert_allclose(
                float(sol.loss), bp.modules[module].option.loss, rtol=1e-4, atol=1e-7
            )
            assert float(sol.loss) == pytest.approx(float(explicit[module].loss), rel=1e-6)
        ref = per_task_truncation(groupings, opts, budget)[1]
        assert bp.loss <= ref.loss + 1e-12
        assert np.sum(errors**2) <= np.sum(ref.task_relative_errors() ** 2) + 1e-12


# --------------------------------------------------------------- per-task ranks in a module
def test_per_task_rank_paths_hold_every_choice_a_price_makes():
    """Each task at `argmin_i loss[t, i] + lam cost[i]`, for any price `lam`, is one of the
    rows; consecutive rows move one task up one of its levels."""
    from hydraopt_jax.planner._curves import per_task_rank_paths

    rng = np.random.default_rng(0)
    cost = np.array([1.0, 2.0, 4.0, 8.0, 12.0])
    for _ in range(20):
        loss = np.sort(rng.uniform(0, 1, size=(6, 5)), axis=1)[:, ::-1].copy()
        loss[0, 2] = loss[0, 1]  # a level that saves nothing is never picked
        rows = per_task_rank_paths(cost, loss)
        assert (rows[0] == 0).all()
        steps = np.diff(rows, axis=0)
        assert ((steps > 0).sum(axis=1) == 1).all() and (steps >= 0).all()
        assert not (rows[:, 0] == 2).any()
        found = {tuple(r) for r in rows}
        for lam in np.geomspace(1e-4, 10, 200):
            pick = np.argmin(loss + lam * cost, axis=1)
            assert tuple(pick) in found, lam


@pytest.mark.parametrize("with_cov", [False, True])
def test_per_task_rank_options_match_merge(with_cov):
    """Options with a rank per task, inside a shared factor or each task's own truncation
    (mixed LoRA ranks, an absent task): loss, per-task errors and storage are `merge`'s,
    and no option of the module beats one of them on both storage and loss."""
    from hydraopt_jax.planner._allocate import pareto

    coll = make_collection(seed=1, ranks=(4, 2, 4, 0, 3, 4))
    a, b, ranks = coll["model.layers.0.self_attn.q_proj"]
    cov = None
    if with_cov:
        x = np.random.default_rng(2).normal(size=(64, a.shape[2]))
        cov = x.T @ x / 64
    stats = module_stats("m", a, b, ranks, activation_cov=cov)
    plain = module_options(stats, groupings(len(NAMES), ATTRS))
    opts = module_options(
        stats, groupings(len(NAMES), ATTRS), per_task_ranks=True, module_weight=2.0
    )
    per_task = [o for o in opts if isinstance(o.task_rank, tuple)]
    assert len(opts) == len(plain) + len(per_task) and len(per_task) >= 5
    assert {o.a_by for o in per_task} > {"all"} and {o.b_by for o in per_task} >= {"task"}
    assert any(o.plan.own_ranks for o in per_task)  # per-task truncation at a rank per task
    present = list(stats.present)
    for o in per_task:
        assert len(set(o.task_rank)) > 1 and max(o.task_rank) <= o.rank
        assert o.plan.task_rank == o.task_rank
        sol = hj.merge(a[present], b[present], o.plan, activation_cov=cov)
        assert o.num_params == sol.num_params
        np.testing.assert_allclose(o.loss, 2.0 * float(sol.loss), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(o.relative_error, np.asarray(sol.relative_error), rtol=1e-5,
                                   atol=1e-7)  # fmt: skip
    front = set(pareto(np.array([o.num_params for o in opts], float),
                       np.array([o.loss for o in opts])).tolist())  # fmt: skip
    assert all(i in front for i, o in enumerate(opts) if isinstance(o.task_rank, tuple))


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.3])
def test_per_task_ranks_plan_merge_and_round_trip(collection, budget):
    """With a rank per task the planner's loss is no higher than with one per module (here
    it picks one on some module at each budget); the plans merge as predicted (storage and
    loss) and read back from their plan file."""
    one = plan_budget(collection, budget, task_names=NAMES, task_attributes=ATTRS)
    each = plan_budget(collection, budget, task_names=NAMES, task_attributes=ATTRS,
                       per_task_ranks=True)  # fmt: skip
    assert any(isinstance(c.option.task_rank, tuple) for c in each.modules.values())
    assert each.storage_ratio <= budget + 1e-12
    assert each.loss <= one.loss * (1 + 1e-9)
    solutions = hj.merge_adapters(collection, each.plans)
    for module, sol in solutions.items():
        assert sol.num_params == each.modules[module].option.num_params
        np.testing.assert_allclose(float(sol.loss), each.modules[module].option.loss, rtol=1e-5,
                                   atol=1e-7)  # fmt: skip
    spec = yaml.safe_load(each.to_yaml(NAMES))
    assert plans_from_config(spec, NAMES, list(each.modules)) == each.plans


def test_per_task_ranks_with_absent_tasks_and_its_argument_errors(collection):
    """Where task 3 adapts no module (and the others have mixed ranks), a per-task choice
    becomes a plan over all tasks with a rank for each (the present tasks' as chosen) that
    merges to the predicted storage and loss; per-task ranks need nested ranks."""
    from hydraopt_jax.planner._budget import _budget_plan

    mixed = make_collection(seed=1, ranks=(4, 2, 4, 0, 3, 4))
    groupings_, opts = collection_options(mixed, task_names=NAMES, task_attributes=ATTRS,
                                          per_task_ranks=True)  # fmt: skip
    picks = {}
    for m, (stats, o_list) in opts.items():
        assert stats.present == (0, 1, 2, 4, 5)
        picks[m] = next(i for i, o in enumerate(o_list) if isinstance(o.task_rank, tuple))
    bp = _budget_plan(groupings_, opts, 1.0, picks, "test")
    plans = {}
    for module, choice in bp.modules.items():
        assert len(choice.plan.task_rank) == len(NAMES)
        assert tuple(choice.plan.task_rank[t] for t in choice.task_ids) == choice.option.task_rank
        assert bp.summary()[module]["task_rank"] == list(choice.plan.task_rank)
        plans[module] = choice.plan
    for module, sol in hj.merge_adapters(mixed, plans).items():
        option = bp.modules[module].option
        assert sol.num_params == option.num_params
        np.testing.assert_allclose(float(sol.loss), option.loss, rtol=1e-5, atol=1e-7)
