"""TRPO-Lagrangian: the multiplier's dual-ascent step and the trust region of its TRPO step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safemeta.adaptation.trpo_lagrangian import TRPOLagrangian, TRPOLagrangianSettings
from safemeta.config import settings
from safemeta.rollout import SamplingSettings
from safemeta.scenario import Scenario
from safemeta.tasks import get_distribution


@pytest.mark.parametrize("bias, violating", [(0.8, True), (0.0, False)])
def test_multiplier_ascends_on_violation_and_the_step_stays_in_its_trust_region(bias, violating):
    dist = get_distribution("point_circle_diff", horizon=40)
    task = dist.sample(1, (0, 1))[0]
    scenario = Scenario("s", dist, SamplingSettings(8, 0.99, 1.0), {"hidden": [16], "init_log_std": -0.5})
    operator = TRPOLagrangian(scenario, settings(TRPOLagrangianSettings, lagrange_lr=0.3, max_kl=0.01))
    policy = scenario.fresh_policy(task, 3, "sampled")
    with torch.no_grad():
        policy.mean[-1].bias.copy_(torch.tensor([bias, 0.0]))
    state = operator.start(task, policy, 0)
    d = task.params["d"][0]
    nu = 0.0
    for k in range(2):
        obs = operator.observe(state, policy, 10 + k)
        step = operator.step(state, policy, obs)
        expected = max(0.0, nu + 0.3 * (obs.cost[0] - d) / d)          # nu <- max(0, nu + lr (J_c - d) / |d|)
        assert step.u[0] == pytest.approx(expected, rel=1e-12)
        nu = expected
        assert (obs.cost[0] > d) == violating
        batch = obs.data
        with torch.no_grad():                                            # E_nu KL(pi_k || pi_k+1) <= max_kl
            w = batch.visitation()[batch.alive]
            states = batch.obs[batch.alive]
            kl_old_new = float((w * step.policy.kl(states, policy.distribution(states))).sum())
        assert step.record["accepted"] == 1.0 and 0 < kl_old_new <= 0.01 * (1 + 1e-6)
        policy = step.policy
    assert (nu > 0) == violating
