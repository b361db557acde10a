"""The sampled A^s (Alg. 3) and the sampled meta-gradient against the exact tabular answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import finite_horizon_values, random_cmdp, with_limits_near
from safemeta.adaptation.dual_pgd import ExactAdaptationSettings, adapt_tabular
from safemeta.adaptation.dual_pgd_sampled import SampledAdaptationSettings, adapt_sampled
from safemeta.config import settings
from safemeta.meta.safe_meta import meta_gradient_surrogate
from safemeta.meta.safe_meta_exact import meta_gradient
from safemeta.optim import flat_grad
from safemeta.policies import CategoricalMLPPolicy
from safemeta.rollout import collect
from safemeta.tasks.tabular import TabularBatchEnv

# exact comparison: no advantage normalisation, a near-exact natural step, the CMDP's own discount
EXACT_LIKE = settings(SampledAdaptationSettings, kl_target=None, kappa=0.0, lam=1.0, lam_c=1.0, normalize_advantages=False, cg_damping=1e-6, cg_iters=40)


def tabular_policy(logits: np.ndarray) -> CategoricalMLPPolicy:
    policy = CategoricalMLPPolicy(logits.shape[0], logits.shape[1], ())
    with torch.no_grad():
        policy.logits[0].weight.copy_(torch.tensor(logits.T, dtype=torch.float32))
    return policy


def policy_probs(policy: CategoricalMLPPolicy) -> np.ndarray:
    return torch.softmax(policy.logits[0].weight.detach().double().T, -1).numpy()


@pytest.fixture(scope="module")
def boundary_case():
    """A CMDP whose cost grows with reward, meta-policy exactly at the limit: u* > 0."""
    m = random_cmdp(3, S=5, A=3, p=1, correlation=0.7)
    logits = np.random.default_rng(3).normal(size=(5, 3)) * 0.5
    m = with_limits_near(m, logits, 0.0)
    return m, logits, adapt_tabular(m, logits, 1.0, 1.0, 0.0)


def _sampled(m, logits, rollouts, seed, settings=EXACT_LIKE):
    batch = collect(TabularBatchEnv(m, rollouts, 100, seed), tabular_policy(logits),
                    torch.Generator().manual_seed(100 + seed), gamma=m.gamma, constraint_gamma=m.gamma)
    return adapt_sampled(tabular_policy(logits), batch, m.d, settings)


def test_sampled_adaptation_approaches_the_exact_one(boundary_case):
    """Multipliers and policy errors fall as rollouts grow (measured: |u - u*| 0.05 -> 0.015 -> 0.007
    and max |pi - pi*| 0.007 -> 0.002 -> 0.001 at 250 / 4000 / 16000 rollouts, mean of 4 seeds)."""
    m, logits, exact = boundary_case
    assert exact.u[0] > 0.5
    errors = {}
    for rollouts in (250, 4000):
        runs = [_sampled(m, logits, rollouts, seed) for seed in range(4)]
        errors[rollouts] = (np.mean([abs(r.u[0] - exact.u[0]) for r in runs]),
                            np.mean([np.abs(policy_probs(r.policy) - np.exp(exact.logits)).max() for r in runs]))
        assert all(r.converged and r.feasible for r in runs)
    print("(|u-u*|, max|pi-pi*|) by rollouts:", errors)
    assert errors[4000][0] < errors[250][0] / 2 and errors[4000][1] < errors[250][1] / 2
    assert errors[4000][0] < 0.04 and errors[4000][1] < 0.004


def probs_on_states(policy: CategoricalMLPPolicy, num_states: int) -> np.ndarray:
    with torch.no_grad():
        return policy.distribution(torch.eye(num_states)).probs.double().numpy()


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_sampled_adaptation_keeps_the_realised_cost_within_the_limit(seed):
    """The constraint of A^s is on J_c in constraint_gamma's units (here 1: the undiscounted
    30-step cost) while Q, nu and the reward step use gamma = 0.8. From a start 3% below d, where
    the unconstrained step would overshoot d, the adapted policy's exact realised cost is at most
    d plus 3 standard errors of the batch's cost estimate, and its exact reward is higher
    (measured: realised - d between -0.11 and +0.09 of the margin, within 1 SE; with the cost
    direction built with gamma instead, +2.6 to +5.4 margins, 40-86 SE)."""
    horizon, gamma = 30, 0.8
    m = random_cmdp(seed, S=4, A=3, p=1, gamma=0.9, correlation=0.8)
    logits = np.random.default_rng(seed).normal(size=(4, 3)) * 0.5
    policy = tabular_policy(logits)
    start = finite_horizon_values(m, probs_on_states(policy, 4), horizon, 1.0)[1:]
    d = start * 1.03
    batch = collect(TabularBatchEnv(m, 2000, horizon, seed), policy, torch.Generator().manual_seed(100 + seed),
                    gamma=gamma, constraint_gamma=1.0)
    se = batch.constraint_value_se.double().numpy()
    options = dict(lam=1.0, lam_c=1.0)
    res = adapt_sampled(policy, batch, d, settings(SampledAdaptationSettings, **options))
    realised = finite_horizon_values(m, probs_on_states(res.policy, 4), horizon, 1.0)[1:]
    print(f"u {res.u}, KL {res.kl:.2e}, (realised - d) / (d - start) {(realised - d) / (d - start)}, SE {se}")
    assert (realised <= d + 3 * se).all(), f"realised cost {realised} above d = {d} (SE {se})"
    reward = [finite_horizon_values(m, probs_on_states(pi, 4), horizon, gamma)[0] for pi in (policy, res.policy)]
    assert reward[1] > reward[0], f"the step did not improve the reward: {reward}"
    free = adapt_sampled(policy, batch, d, settings(SampledAdaptationSettings, **options, delta=1e6))
    realised_free = finite_horizon_values(m, probs_on_states(free.policy, 4), horizon, 1.0)[1:]
    assert (realised_free > d + 3 * se).any(), "the case should need its constraint"


def test_kl_target_scales_lam():
    m = random_cmdp(5, S=5, A=3)  # no binding limit
    logits = np.zeros((5, 3))
    target = 0.03
    options = settings(SampledAdaptationSettings, kl_target=target, cg_damping=1e-6, cg_iters=40)
    res = _sampled(m, logits, 1000, 0, options)
    assert res.lam != options.lam                 # lam was solved from the KL target
    assert abs(res.kl - target) / target < 0.3   # the target is met on the quadratic KL model


def test_infeasible_start_is_reported():
    m0 = random_cmdp(7, S=5, A=3, correlation=0.5)
    logits = np.zeros((5, 3))
    m = with_limits_near(m0, logits, -0.5)   # the meta-policy is 0.5 above its limit
    res = _sampled(m, logits, 500, 0, settings(SampledAdaptationSettings, lam=1.0, lam_c=50.0, normalize_advantages=False))
    assert not res.feasible


def test_sampled_meta_gradient_is_unbiased_for_the_exact_line7_gradient(boundary_case):
    """Mean over 12 seeds of the sampled Alg. 4 line 7 estimator (centred score, per-step baseline)
    against the exact tabular value: every component within 4 standard errors and the mean's
    relative error below 5% (measured: max |z| 1.8-2.0, relative error 1-2%)."""
    m, logits, exact_adapt = boundary_case
    exact = meta_gradient(m, logits, settings(ExactAdaptationSettings, lam=1.0, lam_c=1.0), "first_order")
    reference = exact.grad.T.reshape(-1)             # the policy's weight is [A, S]
    meta, adapted = tabular_policy(logits), tabular_policy(exact_adapt.logits)
    grads = []
    for seed in range(12):
        batch = collect(TabularBatchEnv(m, 1000, 100, seed), adapted, torch.Generator().manual_seed(1000 + seed),
                        gamma=m.gamma)
        surrogate = meta_gradient_surrogate(meta, adapted, batch)
        grads.append(flat_grad(surrogate(None), list(meta.parameters())).numpy())
    grads = np.array(grads)
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))
    z = np.abs(mean - reference) / se
    rel = np.linalg.norm(mean - reference) / np.linalg.norm(reference)
    print(f"max |z| {z.max():.2f}, relative error of the mean {rel:.4f}")
    assert z.max() < 4 and rel < 0.05


def _multiplier_term_case(m, logits, rollouts, seeds):
    """Mean over seeds of the sampled line-7 and `full` meta-gradients (flat, the weight's [A, S] order)."""
    from safemeta.adaptation.base import Step
    from safemeta.meta.safe_meta import with_multiplier_term

    first, full = [], []
    for seed in range(seeds):
        meta = tabular_policy(logits)
        batch = collect(TabularBatchEnv(m, rollouts, 100, seed), meta, torch.Generator().manual_seed(100 + seed),
                        gamma=m.gamma, constraint_gamma=m.gamma)
        res = adapt_sampled(meta, batch, m.d, EXACT_LIKE)
        adapted_batch = collect(TabularBatchEnv(m, rollouts, 100, 50 + seed), res.policy,
                                torch.Generator().manual_seed(500 + seed), gamma=m.gamma, constraint_gamma=m.gamma)
        line7 = meta_gradient_surrogate(meta, res.policy, adapted_batch)
        both = with_multiplier_term(meta, Step(res.policy, res.u, res.kl, {}, res), adapted_batch, line7)
        params = list(meta.parameters())
        first.append(flat_grad(line7(None), params).numpy())
        full.append(flat_grad(both(None), params).numpy())
    return np.mean(first, 0), np.mean(full, 0)


def test_full_sampled_meta_gradient_approaches_the_exact_full_one(boundary_case):
    """With a binding constraint (u* = 1.23) the exact line-7 gradient has cosine 0.26 with the
    true (Prop. 3) meta-gradient; the sampled `full` form adds the grad u* term by the implicit
    function theorem on the sampled dual and approaches the true one as rollouts grow (measured,
    10 seeds: relative error 0.058 -> 0.048 -> 0.025 at 250 / 1000 / 4000 rollouts, while the
    sampled line 7 stays at 4.6)."""
    m, logits, _ = boundary_case
    exact_full = meta_gradient(m, logits, settings(ExactAdaptationSettings, lam=1.0, lam_c=1.0), "full").grad.T.reshape(-1)
    errors = {}
    for rollouts in (250, 4000):
        first, full = _multiplier_term_case(m, logits, rollouts, seeds=6)
        errors[rollouts] = np.linalg.norm(full - exact_full) / np.linalg.norm(exact_full)
        assert np.linalg.norm(first - exact_full) / np.linalg.norm(exact_full) > 1.0
    print("relative error of the sampled full meta-gradient by rollouts:", errors)
    assert errors[4000] < errors[250] and errors[4000] < 0.05


def test_step_model_sensitivity_matches_finite_differences():
    """d dtheta/du and d predicted/du of the step model (the IFT's inputs) against central
    differences, two constraints, on a random positive definite model."""
    from safemeta.adaptation.dual_pgd_sampled import StepModel

    rng = np.random.default_rng(0)
    n, p, gamma = 6, 2, 0.9
    root = rng.normal(size=(n, n))
    F = root @ root.T + np.eye(n)
    g, h = rng.normal(size=n), rng.normal(size=(p, n))
    x_r = np.linalg.solve(F, g)
    x_c = [np.linalg.solve(F, (1 - gamma) * hi) for hi in h]
    model = StepModel(torch.from_numpy(x_r), [torch.from_numpy(x) for x in x_c], h @ x_r,
                      np.array([[hi @ xj for xj in x_c] for hi in h]), float(x_r @ F @ x_r),
                      np.array([x_r @ F @ x for x in x_c]), np.array([[xi @ F @ xj for xj in x_c] for xi in x_c]),
                      np.array([1.0, 2.0]), np.array([0.3, 1.2]), gamma)
    u, lam, eps = np.array([0.4, 0.9]), 0.7, 1e-6
    sens = model.sensitivity(u, lam)
    step = model.dtheta(u, lam).numpy()
    assert abs(0.5 * step @ F @ step - model.kl(u, lam)) < 1e-12       # the model's KL is the Fisher form
    for j in range(p):
        e = eps * np.eye(p)[j]
        d_pred = (model.predicted(u + e, lam) - model.predicted(u - e, lam)) / (2 * eps)
        d_step = (model.dtheta(u + e, lam) - model.dtheta(u - e, lam)).numpy() / (2 * eps)
        np.testing.assert_allclose(sens.dpred_du[:, j], d_pred, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(sens.dtheta_du[j].numpy(), d_step, rtol=1e-6, atol=1e-8)
