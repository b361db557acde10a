"""Conjugate gradient, Fisher-vector products and the TRPO step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_cmdp, softmax
from safemeta.meta.safe_meta_exact import mean_kl, softmax_fisher_vector_product
from safemeta.optim import (autograd_fisher_vector_product, conjugate_gradient, fisher_vector_product, flat_grad,
                            subsample_states, trpo_step)
from safemeta.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from safemeta.tasks.tabular import evaluate, evaluate_torch


def test_conjugate_gradient_solves_spd_systems():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(12, 12))
    F = torch.from_numpy(M @ M.T + 0.5 * np.eye(12))
    b = torch.from_numpy(rng.normal(size=12))
    x = conjugate_gradient(lambda v: F @ v, b, iters=40, residual_tol=1e-24)
    torch.testing.assert_close(F @ x, b, atol=1e-8, rtol=0)
    small = conjugate_gradient(lambda v: F @ v, b * 1e-9, iters=40, residual_tol=1e-24)  # relative tolerance
    torch.testing.assert_close(small, x * 1e-9, atol=1e-16, rtol=1e-6)


def test_trpo_step_respects_kl_and_improves_exact_return():
    m = random_cmdp(4, S=6, A=4)
    logits = np.random.default_rng(4).normal(size=(6, 4))
    probs = softmax(logits)
    ev = evaluate(m, probs)
    phi = torch.tensor(logits, requires_grad=True)
    grad = torch.autograd.grad(evaluate_torch(m, torch.softmax(phi, -1)).J, phi)[0].reshape(-1)
    J = lambda flat: evaluate(m, softmax(flat.reshape(6, 4).numpy())).J  # noqa: E731
    kl = lambda flat: mean_kl(probs, ev.nu, flat.reshape(6, 4).numpy())  # noqa: E731
    for max_kl in (1e-3, 1e-2, 1e-1):
        step = trpo_step(torch.from_numpy(logits.reshape(-1)), grad, softmax_fisher_vector_product(probs, ev.nu),
                         J, kl, max_kl, cg_iters=30, damping=1e-4)
        assert step.accepted and 0 < step.kl <= max_kl
        assert step.improvement > 0 and np.isclose(J(step.params) - ev.J, step.improvement)
        # a natural-gradient step of this size is well predicted to first order at small radii
        if max_kl == 1e-3:
            assert abs(step.improvement / step.expected_improvement - 1) < 0.1


def test_trpo_step_refuses_a_non_improving_direction():
    m = random_cmdp(5, S=4, A=3)
    logits = np.zeros((4, 3))
    probs = softmax(logits)
    ev = evaluate(m, probs)
    phi = torch.tensor(logits, requires_grad=True)
    grad = torch.autograd.grad(evaluate_torch(m, torch.softmax(phi, -1)).J, phi)[0].reshape(-1)
    J = lambda flat: evaluate(m, softmax(flat.reshape(4, 3).numpy())).J  # noqa: E731
    step = trpo_step(torch.zeros(12, dtype=torch.float64), -grad, softmax_fisher_vector_product(probs, ev.nu), J,
                     lambda flat: mean_kl(probs, ev.nu, flat.reshape(4, 3).numpy()), 1e-2)
    assert not step.accepted and torch.equal(step.params, torch.zeros(12, dtype=torch.float64))


def test_trpo_step_uses_its_whole_kl_radius():
    """On a quadratic KL, 1/2 x^T F x, and a linear objective the first candidate is accepted, and
    its KL is the radius (up to the damping: the model's KL is 1/2 x^T (F + damping) x = max_kl)."""
    rng = np.random.default_rng(3)
    M = rng.normal(size=(8, 8))
    F = torch.from_numpy(M @ M.T / 8 + 0.2 * np.eye(8))
    g = torch.from_numpy(rng.normal(size=8))
    start = torch.from_numpy(rng.normal(size=8))
    kl = lambda flat: float(0.5 * (flat - start) @ F @ (flat - start))  # noqa: E731
    for max_kl in (1e-3, 0.05):
        step = trpo_step(start, g, lambda v: F @ v, lambda flat: float(g @ flat), kl, max_kl, cg_iters=8,
                         damping=1e-8)
        assert step.accepted and step.step_fraction == 1.0
        assert max_kl * (1 - 1e-6) <= step.kl <= max_kl, (step.kl, max_kl)


# --------------------------------------------------------------------------- Fisher-vector products
def _policies():
    torch.manual_seed(0)
    gaussian = GaussianMLPPolicy(7, 3, (16, 12), init_log_std=-0.3)
    with torch.no_grad():
        gaussian.log_std.copy_(torch.tensor([-0.7, 0.1, 0.4]))   # a different variance per dimension
    return {"gaussian": gaussian, "categorical": CategoricalMLPPolicy(7, 4, (16,)),
            "tabular-like categorical": CategoricalMLPPolicy(7, 4, ())}


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "tabular-like categorical"])
def test_gauss_newton_fisher_product_equals_the_double_backprop_product(kind):
    """F v by J^T M J v (jvp, then vjp through the network outputs) is the Hessian of the
    weighted KL, as double back-propagation computes it, to 1e-6 on the whole batch."""
    policy = _policies()[kind]
    gen = torch.Generator().manual_seed(1)
    obs = 2.0 * torch.randn(3000, 7, generator=gen)
    weights = torch.rand(3000, generator=gen)
    weights = weights / weights.sum()
    exact = autograd_fisher_vector_product(policy, obs, weights)
    fast = fisher_vector_product(policy, obs, weights)
    for _ in range(4):
        v = torch.randn(policy.flat().numel(), generator=gen)
        expected = exact(v)
        assert float((fast(v) - expected).norm() / expected.norm()) < 1e-6
    assert fisher_vector_product(policy, obs, weights, subsample=1.0, seed=None)(v).equal(fast(v))


def test_subsampled_states_keep_the_total_weight_and_are_seeded():
    obs, weights = torch.arange(20.0)[:, None], torch.linspace(0.1, 2.0, 20)
    part_obs, part_w = subsample_states(obs, weights, 0.25, seed=3)
    assert part_obs.shape == (5, 1) and len(set(part_obs[:, 0].tolist())) == 5
    torch.testing.assert_close(part_w.sum(), weights.sum())
    torch.testing.assert_close(part_w / part_w.sum(), weights[part_obs[:, 0].long()] / weights[part_obs[:, 0].long()].sum())
    assert subsample_states(obs, weights, 0.25, seed=3)[0].equal(part_obs)
    assert not subsample_states(obs, weights, 0.25, seed=4)[0].equal(part_obs)
    with pytest.raises(ValueError, match="seed"):
        subsample_states(obs, weights, 0.5, seed=None)


def test_trpo_step_with_a_subsampled_fisher_keeps_the_full_batch_kl_within_its_radius():
    """On a policy-gradient surrogate of real states (half_cheetah_vel), a step whose Fisher uses
    a quarter of the states: the first candidate passes the line search, whose KL is measured on
    every state, and that KL is close to the radius (the subsample's weights carry the batch's
    total: without the rescaling F would be 4x too small and the first candidates rejected)."""
    from safemeta.rollout import collect, time_baseline
    from safemeta.tasks import get_distribution

    dist = get_distribution("half_cheetah_vel", horizon=100)
    env = dist.make_env(dist.sample(1, 0)[0], 20, seed=0)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(17, 6)
    batch = collect(env, policy, torch.Generator().manual_seed(0), gamma=0.99)
    alive = batch.alive
    obs, actions, old = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
    w = batch.visitation()[alive]
    adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]

    def surrogate(params=None):
        return (w * torch.exp(policy.log_prob(obs, actions, params) - old) * adv).sum()

    grad = flat_grad(surrogate(), list(policy.parameters()))
    with torch.no_grad():
        reference = policy.distribution(obs)
    kl = lambda flat: float((w * policy.kl(obs, reference, policy.unflatten(flat))).sum())  # noqa: E731
    objective = lambda flat: float(surrogate(policy.unflatten(flat)))  # noqa: E731
    max_kl = 1e-3
    for seed in (0, 1):
        fvp = fisher_vector_product(policy, obs, w, subsample=0.25, seed=seed)
        step = trpo_step(policy.flat(), grad, fvp, objective, kl, max_kl, cg_iters=10, damping=0.1)
        print(f"subsample seed {seed}: KL / max_kl = {step.kl / max_kl:.3f}, fraction {step.step_fraction}")
        assert step.accepted and step.step_fraction == 1.0
        assert 0.5 * max_kl < step.kl <= max_kl
