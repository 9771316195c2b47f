"""Baselines against dense numpy references of their published definitions, and against PEFT.

Dense `d_out x d_in` matrices appear only in the references here, never in the package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hydraopt_jax as hj
from hydraopt_jax.baselines import BASELINES, dare_masks, run_baseline

T, R, D_IN, D_OUT = 3, 2, 7, 9


@pytest.fixture(autouse=True)
def _strict_x64():
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        yield


def adapters(seed=0, num_tasks=T, r=R, d_in=D_IN, d_out=D_OUT, shared_a=0.0):
    """Random adapters; `shared_a` mixes a common A into every task (as a shared init does)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(num_tasks, r, d_in))
    A = shared_a * rng.normal(size=(1, r, d_in)) + (1 - shared_a) * A
    B = rng.normal(size=(num_tasks, d_out, r))
    return A, B


def dense(A, B):
    return np.einsum("tor,trd->tod", B, A)


def rel(x, y):
    return float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))


def merged_update(sol):
    a, b = sol.task_factors(0)
    return np.asarray(b) @ np.asarray(a)


def np_topk(x, k):
    flat = np.abs(x).ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def np_top_eigvecs(gram, k):
    vals, vecs = np.linalg.eigh(0.5 * (gram + gram.T))
    return vecs[:, ::-1][:, :k]


def np_truncate(m, k):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


# ---------------------------------------------------------------------------- numpy references
def np_factorwise(A, B, weights, scales, combination, density=1.0, masks=None, sign="total",
                  ranks=None):  # fmt: skip
    """PEFT 0.21 `_generalized_task_arithmetic_weighted_adapter` + `merge_utils`, in numpy."""
    ranks = [A.shape[1]] * A.shape[0] if ranks is None else ranks
    c = np.asarray(weights) * np.asarray(scales)
    coef = {"A": np.sign(c + (c == 0)) * np.sqrt(np.abs(c)), "B": np.sqrt(np.abs(c))}
    raw = {"A": A, "B": B / np.asarray(scales)[:, None, None]}
    out = {}
    for side in ("A", "B"):
        x = raw[side]
        if combination == "linear":
            pruned = x
        elif combination in ("ties", "magnitude_prune"):
            sizes = [rt * x.shape[2] if side == "A" else x.shape[1] * rt for rt in ranks]
            pruned = np.stack([np_topk(x[t], int(density * sizes[t])) for t in range(len(x))])
        else:
            pruned = np.where(masks[side], x, 0.0) / density
        weighted = pruned * coef[side][:, None, None]
        if combination in ("linear", "magnitude_prune", "dare_linear"):
            out[side] = weighted.sum(0)
            continue
        s = np.sign(pruned)
        magnitude = pruned.sum(0) if sign == "total" else s.sum(0)
        agree = s == np.where(magnitude >= 0, 1.0, -1.0)
        out[side] = (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return out["A"], out["B"]


def np_knots(A, B, k, coef, density, merge="ties"):
    """KnOTS on dense updates: SVD of [dW_1 ... dW_T], TIES on S V_t^T, back through U."""
    dws = dense(A, B)
    num_tasks, _, d_in = dws.shape
    u, s, vt = np.linalg.svd(np.concatenate(list(dws), axis=1), full_matrices=False)
    keep = s > 1e-10 * s[0]
    u, s, vt = u[:, keep], s[keep], vt[keep]
    sv = np.stack([s[:, None] * vt[:, t * d_in : (t + 1) * d_in] for t in range(num_tasks)])
    if merge == "linear":
        merged = np.einsum("t,tkd->kd", coef, sv)
    else:
        # KnOTS's topk_values_mask: >= the kthvalue(n - int(n density)) of the magnitudes
        def keep(x):
            if density >= 1:
                return x
            kth = np.sort(np.abs(x).ravel())[x.size - int(x.size * density) - 1]
            return np.where(np.abs(x) >= kth, x, 0.0)

        pruned = np.stack([keep(x) for x in sv])
        elected = np.sign(pruned.sum(0))
        elected[elected == 0] = np.sign(elected.sum())
        agree = np.where(elected > 0, pruned > 0, pruned < 0)
        vectors = pruned * agree * coef[:, None, None]
        merged = vectors.sum(0) / np.maximum((vectors != 0).sum(0), 1)
    return np_truncate(u @ merged, k)


def np_joint(A, B, k, steps, diagonal, weights):
    """Compress-then-Serve joint diagonalisation by dense alternation (same start)."""
    dws = dense(A, B)
    w = np.asarray(weights)
    u = np_top_eigvecs(np.einsum("t,tij,tkj->ik", w, dws, dws), k)
    v = np_top_eigvecs(np.einsum("t,tji,tjk->ik", w, dws, dws), k)

    def polar(x):
        left, _, right_t = np.linalg.svd(x, full_matrices=False)
        return left @ right_t

    def sig(u, v):
        return np.stack([np.diag(u.T @ d @ v) for d in dws])

    for _ in range(steps):
        if diagonal:
            u = polar(sum(w[t] * dws[t] @ v * sig(u, v)[t][None] for t in range(len(dws))))
            v = polar(sum(w[t] * dws[t].T @ u * sig(u, v)[t][None] for t in range(len(dws))))
        else:
            u = np_top_eigvecs(sum(w[t] * dws[t] @ v @ v.T @ dws[t].T for t in range(len(dws))), k)
            v = np_top_eigvecs(sum(w[t] * dws[t].T @ u @ u.T @ dws[t] for t in range(len(dws))), k)
    cores = np.stack([u.T @ d @ v for d in dws])
    if diagonal:
        cores = cores * np.eye(k)[None]
    return np.einsum("ok,tkl,dl->tod", u, cores, v)


def np_pca(A, B, k):
    _, _, vt = np.linalg.svd(A.reshape(-1, A.shape[2]), full_matrices=False)
    p_a = vt[:k]  # [k, d_in]
    u, _, _ = np.linalg.svd(np.concatenate(list(B), axis=1), full_matrices=False)
    p_b = u[:, :k]
    return np.einsum("ok,pk,tpr,trd,ld,lj->toj", p_b, p_b, B, A, p_a, p_a)


# ---------------------------------------------------------------------------- selection kernels
def test_topk_mask_is_exact_with_ties_and_zeros():
    from hydraopt_jax.baselines import _common

    topk_mask, keep_at_least = jax.jit(_common.topk_mask), jax.jit(_common.keep_at_least)
    rng = np.random.default_rng(30)
    for dtype in (np.float32, np.float64):
        # bf16-like data: few distinct magnitudes, both signs, zeros
        x = (rng.integers(-4, 5, size=(6, 11)) * 0.25).astype(dtype)
        for k in (0, 1, 7, 30, 66):
            mask = np.asarray(topk_mask(jnp.asarray(x), jnp.asarray(k)))
            ref = np.zeros(x.size, bool)
            ref[np.argsort(-np.abs(x).ravel(), kind="stable")[:k]] = True
            np.testing.assert_array_equal(mask.ravel(), ref)
            keep = np.asarray(keep_at_least(jnp.asarray(x), jnp.asarray(k)))
            kth = np.sort(np.abs(x).ravel())[::-1][min(k, x.size - 1)]
            np.testing.assert_array_equal(keep, np.abs(x) >= kth)


# ---------------------------------------------------------------------------- factor-wise merges
SCALES = np.array([2.0, 0.5, 1.5])
WEIGHTS = np.array([0.7, -0.3, 0.5])


@pytest.mark.parametrize(
    "name, params",
    [
        ("linear", {}),
        ("ties", dict(density=0.4)),
        ("ties", dict(density=0.4, majority_sign_method="frequency")),
        ("magnitude_prune", dict(density=0.3)),
    ],
)
def test_factorwise_matches_numpy_reference(name, params):
    A, raw_B = adapters(1)
    B = raw_B * SCALES[:, None, None]  # scale folded in, as the loaders do
    sol = BASELINES[name](A, B, weights=WEIGHTS, scales=SCALES, **params)
    ref_a, ref_b = np_factorwise(
        A, B, WEIGHTS, SCALES, name, params.get("density", 1.0),
        sign=params.get("majority_sign_method", "total"),
    )  # fmt: skip
    assert sol.plan == hj.SharingPlan.full_merge(T, rank=R)
    assert rel(sol.shared_a[0], ref_a) < 1e-12 and rel(sol.shared_b[0], ref_b) < 1e-12


def test_ties_mixed_ranks_counts_true_sizes():
    """Zero-padded ranks: the kept count uses each task's true size (PEFT on unpadded)."""
    A, B = adapters(2, r=3)
    ranks = [3, 2, 1]
    for t, rt in enumerate(ranks):
        A[t, rt:], B[t, :, rt:] = 0.0, 0.0
    sol = hj.baselines.ties(A, B, density=0.5, task_ranks=ranks)
    ref_a, ref_b = np_factorwise(A, B, np.ones(T), np.ones(T), "ties", 0.5, ranks=ranks)
    assert rel(sol.shared_a[0], ref_a) < 1e-12 and rel(sol.shared_b[0], ref_b) < 1e-12
    assert sol.task_ranks == tuple(ranks)
    assert sol.original_params == sum(ranks) * (D_IN + D_OUT)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_with_explicit_masks(name):
    A, raw_B = adapters(3)
    B = raw_B * SCALES[:, None, None]
    density = 0.6
    sol = BASELINES[name](A, B, density=density, key=7, weights=WEIGHTS, scales=SCALES)
    mask_a, mask_b = dare_masks(jax.random.PRNGKey(7), A, B, density)
    masks = {"A": np.asarray(mask_a), "B": np.asarray(mask_b)}
    ref_a, ref_b = np_factorwise(A, B, WEIGHTS, SCALES, name, density, masks=masks)
    assert rel(sol.shared_a[0], ref_a) < 1e-12 and rel(sol.shared_b[0], ref_b) < 1e-12
    # deterministic per key, different across keys
    again = BASELINES[name](A, B, density=density, key=7, weights=WEIGHTS, scales=SCALES)
    other = BASELINES[name](A, B, density=density, key=8, weights=WEIGHTS, scales=SCALES)
    np.testing.assert_array_equal(np.asarray(sol.shared_a), np.asarray(again.shared_a))
    assert rel(other.shared_a[0], sol.shared_a[0]) > 1e-3


def test_dare_mask_statistics():
    """Each entry is kept independently with probability `density`; the rescaled drop keeps
    the mean: averaged over keys, `dare_linear` approaches `linear`."""
    A, B = adapters(4)
    mask_a, mask_b = dare_masks(jax.random.PRNGKey(0), np.zeros((4, 8, 256)), B, 0.3)
    assert mask_a.shape == (4, 8, 256) and mask_b.shape == B.shape
    assert abs(float(np.mean(mask_a)) - 0.3) < 0.01
    density, runs = 0.5, 200
    lin = hj.baselines.linear(A, B)
    mean_a = np.mean(
        [np.asarray(hj.baselines.dare_linear(A, B, density=density, key=i).shared_a[0])
         for i in range(runs)], axis=0,
    )  # fmt: skip
    # each entry's std is |mean| sqrt((1 - p) / (p runs)) when all tasks agree; 4 sigma
    assert rel(mean_a, lin.shared_a[0]) < 4 * np.sqrt((1 - density) / (density * runs))


def test_cat_is_the_exact_weighted_sum():
    A, B = adapters(5)
    sol = hj.baselines.cat(A, B, weights=WEIGHTS)
    assert sol.rank == T * R and sol.plan.rank == T * R
    target = np.einsum("t,tod->od", WEIGHTS, dense(A, B))
    assert rel(merged_update(sol), target) < 1e-12
    assert sol.storage_ratio == pytest.approx(1.0)


# ---------------------------------------------------------------------------- svd, knots
def test_svd_is_the_truncated_weighted_sum():
    A, B = adapters(6)
    for k in (1, R, T * R + 2):
        sol = hj.baselines.svd(A, B, rank=k, weights=WEIGHTS)
        target = np_truncate(np.einsum("t,tod->od", WEIGHTS, dense(A, B)), k)
        assert sol.rank == k
        assert rel(merged_update(sol), target) < 1e-10
        # PEFT's split: A has orthonormal rows (zero rows past the update's rank)
        gram = np.asarray(sol.shared_a[0] @ sol.shared_a[0].T)
        np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-12)


def test_svd_equals_exact_full_merge_with_uniform_weights():
    A, B = adapters(7)
    sol = hj.baselines.svd(A, B)  # weights 1/T: the mean update
    ref = hj.merge(A, B, hj.SharingPlan.full_merge(T, rank=R), weights="uniform")
    assert rel(merged_update(sol), merged_update(ref)) < 1e-9
    np.testing.assert_allclose(sol.relative_error, ref.relative_error, rtol=1e-9)


@pytest.mark.parametrize(
    "merge, density, k",
    [("ties", 0.3, R), ("ties", 1.0, R), ("ties", 0.3, T * R), ("linear", 1.0, R)],
)
def test_knots_matches_dense_reference(merge, density, k):
    A, B = adapters(8, shared_a=0.5)
    coef = np.array([1.0, 0.8, 1.2]) if merge == "ties" else np.full(T, 1 / T)
    sol = hj.baselines.knots(A, B, rank=k, merge=merge, density=density, weights=coef)
    assert rel(merged_update(sol), np_knots(A, B, k, coef, density, merge)) < 1e-9


def test_knots_linear_is_the_svd_merge():
    A, B = adapters(9)
    a = hj.baselines.knots(A, B, merge="linear")
    b = hj.baselines.svd(A, B)
    assert rel(merged_update(a), merged_update(b)) < 1e-10


# ---------------------------------------------------------------------------- joint, pca
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("weights", ["uniform", "relative"])
def test_joint_matches_dense_alternation(diagonal, weights):
    A, B = adapters(10, shared_a=0.3)
    k, steps = R, 4
    sol = hj.baselines.joint(A, B, rank=k, diagonal=diagonal, max_steps=steps, tol=-1.0,
                             weights=weights)  # fmt: skip
    assert int(sol.steps) == steps
    w = hj.task_weights(jnp.asarray(A), jnp.asarray(B), weights)
    ref = np_joint(A, B, k, steps, diagonal, np.asarray(w))
    recon = np.stack([np.asarray(b @ a) for a, b in map(sol.task_factors, range(T))])
    assert rel(recon, ref) < 1e-8
    err = np.linalg.norm(dense(A, B) - ref, axis=(1, 2)) / np.linalg.norm(dense(A, B), axis=(1, 2))
    np.testing.assert_allclose(sol.relative_error, err, rtol=1e-8)
    if diagonal:
        cores = np.asarray(sol.cores)
        np.testing.assert_array_equal(cores, cores * np.eye(k)[None])


@pytest.mark.parametrize("diagonal", [False, True])
def test_joint_loss_never_increases_and_converges(diagonal):
    """With relative weights the fitted objective is the reported `loss`: it never rises."""
    A, B = adapters(11, shared_a=0.3)
    fit = dict(rank=R, diagonal=diagonal, tol=-1.0, weights="relative")
    losses = [float(hj.baselines.joint(A, B, max_steps=n, **fit).loss) for n in range(6)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses[:-1], losses[1:], strict=True))
    done = hj.baselines.joint(A, B, rank=R, diagonal=diagonal, max_steps=500, tol=1e-10)
    assert int(done.result) == 0 and int(done.steps) < 500
    # U, V orthonormal
    u, v = done.shared_b[0], done.shared_a[0]  # U [d_out, k] and V [k, d_in]
    np.testing.assert_allclose(u.T @ u, np.eye(R), atol=1e-10)
    np.testing.assert_allclose(v @ v.T, np.eye(R), atol=1e-10)


def test_joint_storage_and_exactness():
    A, B = adapters(12)
    full = hj.baselines.joint(A, B, rank=T * R)  # k = T r: every update fits exactly
    assert float(jnp.max(full.relative_error)) < 1e-8
    diag = hj.baselines.joint(A, B, diagonal=True)  # k = r
    assert diag.num_params == D_OUT * R + R * D_IN + T * R
    core = hj.baselines.joint(A, B)
    assert core.num_params == D_OUT * R + R * D_IN + T * R * R
    assert core.storage_ratio == pytest.approx(core.num_params / (T * R * (D_IN + D_OUT)))
    a, b = core.task_factors(1)
    assert a.shape == (R, D_IN) and b.shape == (D_OUT, R)


def test_pca_matches_dense_reference():
    A, B = adapters(13, shared_a=0.6)
    for k in (3, T * R + 1):
        sol = run_baseline("pca", A, B, rank=k)
        assert sol.core == "full" and sol.cores.shape == (T, k, k)
        recon = np.stack([np.asarray(b @ a) for a, b in map(sol.task_factors, range(T))])
        assert rel(recon, np_pca(A, B, min(k, T * R))) < 1e-9


# ---------------------------------------------------------------------------- shared contracts
ONE_TASK_EXACT = {
    "linear": dict(weights=[1.0]),
    "cat": dict(weights=[1.0]),
    "ties": dict(density=1.0),
    "magnitude_prune": dict(density=1.0, weights=[1.0]),
    "dare_linear": dict(density=1.0, weights=[1.0]),
    "dare_ties": dict(density=1.0),
    "svd": {},
    "knots": dict(density=1.0),
    "joint": {},
    "joint_diag": {},
    "pca": {},
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_single_task_is_exact(name):
    """T = 1 (as `separate`): every method returns the adapter itself."""
    A, B = adapters(14, num_tasks=1)
    sol = run_baseline(name, A, B, **ONE_TASK_EXACT[name])
    assert float(sol.relative_error[0]) < 1e-9, name
    assert int(sol.result) == 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_reported_errors_match_dense(name):
    A, B = adapters(15, shared_a=0.5)
    sol = run_baseline(name, A, B)
    recon = np.stack([np.asarray(b @ a) for a, b in map(sol.task_factors, range(T))])
    dws = dense(A, B)
    err = np.linalg.norm(dws - recon, axis=(1, 2)) / np.linalg.norm(dws, axis=(1, 2))
    np.testing.assert_allclose(sol.relative_error, err, rtol=1e-9)
    np.testing.assert_allclose(float(sol.loss), np.sum(err**2), rtol=1e-9)
    assert sol.task_ids == tuple(range(T))
    if isinstance(sol, hj.Solution):
        assert sol.plan.name == "full_merge" and sol.shared_a.shape[0] == 1


def test_float32_inputs_stay_float32():
    A, B = adapters(16)
    with jax.enable_x64(False):
        sol = hj.baselines.svd(A.astype(np.float32), B.astype(np.float32))
        assert sol.shared_a.dtype == jnp.float32
        assert float(jnp.max(sol.relative_error)) < 2.0


def test_argument_errors():
    A, B = adapters(17)
    with pytest.raises(ValueError, match="unknown baseline 'nope'"):
        run_baseline("nope", A, B)
    with pytest.raises(ValueError, match="rank is the adapters' rank r=2"):
        run_baseline("ties", A, B, rank=4)
    with pytest.raises(ValueError, match=r"weights has shape \(2,\), expected \(3,\)"):
        run_baseline("linear", A, B, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        run_baseline("dare-linear", A, B, density=0.0)
    with pytest.raises(ValueError, match="A .* and B .* disagree"):
        run_baseline("svd", A, B[:, :, :1])
    with pytest.raises(ValueError, match="merge must be one of"):
        run_baseline("knots", A, B, merge="max")


# ---------------------------------------------------------------------------- against PEFT itself
def peft_layer(A, raw_B, alphas, use_rslora=False):
    """A tiny torch model with one LoRA'd `Linear` per task, weights set by hand (float64)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(A.shape[2], raw_B.shape[1], bias=False)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = None
    for t, alpha in enumerate(alphas):
        config = peft.LoraConfig(
            r=A.shape[1], lora_alpha=alpha, target_modules=["lin"], use_rslora=use_rslora
        )
        if model is None:
            model = peft.get_peft_model(Tiny().double(), config, adapter_name="t0")
        else:
            model.add_adapter(f"t{t}", config)
    lin = model.base_model.model.lin
    with torch.no_grad():
        for t in range(len(alphas)):
            lin.lora_A[f"t{t}"].weight.copy_(torch.from_numpy(A[t]))
            lin.lora_B[f"t{t}"].weight.copy_(torch.from_numpy(raw_B[t]))
    scales = np.array([lin.scaling[f"t{t}"] for t in range(len(alphas))])
    return model, lin, scales


def peft_merge(model, lin, name, combination_type, **kwargs):
    names = [f"t{t}" for t in range(T)]
    model.add_weighted_adapter(names, list(WEIGHTS), name, combination_type=combination_type,
                               **kwargs)  # fmt: skip
    a = lin.lora_A[name].weight.detach().numpy()
    b = lin.lora_B[name].weight.detach().numpy()
    return a, b, lin.get_delta_weight(name).detach().numpy()


PEFT_CASES = [
    ("linear", "linear", {}, {}),
    ("ties", "ties", dict(density=0.4), dict(density=0.4)),
    ("ties_frequency", "ties", dict(density=0.4, majority_sign_method="frequency"),
     dict(density=0.4, majority_sign_method="frequency")),
    ("magnitude_prune", "magnitude_prune", dict(density=0.3), dict(density=0.3)),
    ("cat", "cat", {}, {}),
]  # fmt: skip


@pytest.mark.parametrize("use_rslora", [False, True])
def test_factorwise_and_cat_match_peft(use_rslora):
    A, raw_B = adapters(20)
    model, lin, scales = peft_layer(A, raw_B, alphas=[4, 2, 3], use_rslora=use_rslora)
    B = raw_B * scales[:, None, None]
    for label, name, ours, theirs in PEFT_CASES:
        sol = BASELINES[name](A, B, weights=WEIGHTS, scales=scales, **ours)
        a, b, delta = peft_merge(model, lin, label, name, **theirs)
        # PEFT rounds its per-task coefficients to float32 (`torch.tensor(list_of_floats)`)
        assert rel(sol.shared_a[0], a) < 1e-6 and rel(sol.shared_b[0], b) < 1e-6, label
        if not use_rslora:  # PEFT gives the merged adapter r = lora_alpha: scale 1
            assert rel(merged_update(sol), delta) < 1e-6, label


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_with_the_same_masks(name, monkeypatch):
    """PEFT draws DARE's masks with `torch.bernoulli`; feed it ours, in its call order
    (every task's A, then every task's B)."""
    torch = pytest.importorskip("torch")
    A, raw_B = adapters(21)
    model, lin, scales = peft_layer(A, raw_B, alphas=[4, 2, 3])
    B = raw_B * scales[:, None, None]
    density = 0.5
    sol = BASELINES[name](A, B, density=density, key=3, weights=WEIGHTS, scales=scales)
    mask_a, mask_b = dare_masks(3, A, B, density)
    queue = [np.asarray(m, np.float64) for m in (*mask_a, *mask_b)]

    def bernoulli(probabilities):
        mask = queue.pop(0)
        assert tuple(probabilities.shape) == mask.shape
        return torch.from_numpy(mask)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    a, b, delta = peft_merge(model, lin, name, name, density=density)
    assert not queue
    assert rel(sol.shared_a[0], a) < 1e-6 and rel(sol.shared_b[0], b) < 1e-6
    assert rel(merged_update(sol), delta) < 1e-6


@pytest.mark.parametrize("k", [1, R])
def test_svd_matches_peft(k):
    A, raw_B = adapters(22)
    model, lin, scales = peft_layer(A, raw_B, alphas=[4, 2, 3])
    B = raw_B * scales[:, None, None]
    sol = hj.baselines.svd(A, B, rank=k, weights=WEIGHTS)
    _, _, delta = peft_merge(model, lin, f"svd{k}", "svd", svd_rank=k)
    assert rel(merged_update(sol), delta) < 1e-10
