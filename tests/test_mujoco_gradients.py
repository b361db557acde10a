"""half_cheetah_vel's differentiable steps: MuJoCo finite-difference Jacobians behind autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safemeta.tasks import get_distribution


def _rollout(actions: torch.Tensor, seed: int = 3):
    """Sum over steps of reward + 3 cost + 0.1 sum(obs), and the observations, for actions [T, N, 6]."""
    dist = get_distribution("half_cheetah_vel", horizon=20, sim_threads=1)
    env = dist.make_env(dist.sample(1, 0)[0], actions.shape[1], seed)
    total, observations = 0.0, []
    for a in actions:
        step = env.step(a)
        total = total + step.reward.double().sum() + 3 * step.cost.double().sum() + 0.1 * step.obs.double().sum()
        observations.append(step.obs)
    return total, observations


def test_differentiable_steps_match_plain_steps_and_finite_differences():
    actions = (torch.rand(5, 2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 1.6
    leaf = actions.clone().requires_grad_(True)
    total, observations = _rollout(leaf)
    with torch.no_grad():
        plain_total, plain_observations = _rollout(actions)     # numpy path
    assert float(total.detach()) == float(plain_total)
    for a, b in zip(observations, plain_observations):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(total, leaf)
    assert grad.abs().max() > 0
    eps = 1e-4
    for k in np.random.default_rng(1).choice(actions.numel(), 8, replace=False):
        index = np.unravel_index(k, actions.shape)
        up, down = actions.clone(), actions.clone()
        up[index] += eps
        down[index] -= eps
        with torch.no_grad():
            fd = (_rollout(up)[0] - _rollout(down)[0]) / (2 * eps)
        assert float(grad[index]) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)


def test_detach_cuts_the_graph():
    dist = get_distribution("half_cheetah_vel", horizon=20, sim_threads=1)
    env = dist.make_env(dist.sample(1, 0)[0], 1, 0)
    first = torch.full((1, 6), 0.3, requires_grad=True)
    env.step(first)
    env.detach()
    second = torch.full((1, 6), -0.2, requires_grad=True)
    out = env.step(second)
    grads = torch.autograd.grad(out.obs.sum(), [first, second], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0
