"""Conjugate gradient and the TRPO step."""
from __future__ import annotations

import numpy as np
import torch

from conftest import random_cmdp, softmax
from safemeta.meta.safe_meta_exact import mean_kl, softmax_fisher_vector_product
from safemeta.optim import conjugate_gradient, trpo_step
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
