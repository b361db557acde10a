"""MAML + penalty (baseline (a)): the inner step and the second-order meta-gradient.

Exact: the meta-gradient through the exact inner step equals central finite differences of
L_w(A(pi_phi)) to 1e-6, with the hinge active and inactive and for the linear penalty, and
differs from the first-order (FOMAML) gradient. Sampled: the MAML-TRPO meta-gradient equals the
one `higher.innerloop_ctx` computes on the same two batches.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_cmdp
from safemeta.adaptation.pg_penalty import ExactPGPenaltySettings, exact_inner_step, exact_penalised, pg_data, surrogate
from safemeta.config import load_config, settings
from safemeta.meta.maml_penalty import exact_meta_gradient, exact_meta_objective, maml_objective
from safemeta.optim import flat_grad
from safemeta.plugins import build_meta_learner, build_scenario
from safemeta.tasks import get_distribution
from safemeta.tasks.tabular import evaluate


def _objective(cmdp, op, flat: np.ndarray) -> float:
    with torch.no_grad():
        return float(exact_meta_objective(cmdp, torch.from_numpy(flat), op)[0])


def _central_differences(cmdp, op, logits: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    grad = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        e = np.zeros_like(logits)
        e[idx] = eps
        grad[idx] = (_objective(cmdp, op, logits + e) - _objective(cmdp, op, logits - e)) / (2 * eps)
    return grad


@pytest.mark.parametrize("case", ["hinge_active", "hinge_inactive", "linear"])
def test_exact_meta_gradient_equals_central_differences(case):
    cmdp = random_cmdp(4, S=5, A=3, p=2, correlation=0.6)
    logits = np.random.default_rng(0).normal(size=(5, 3))
    op = settings(ExactPGPenaltySettings, inner_lr=0.5, penalty=[2.0, 0.7],
                  penalty_form="linear" if case == "linear" else "hinge")
    Jc = evaluate(cmdp, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).Jc
    cmdp = dataclasses.replace(cmdp, d=Jc - 0.3 if case == "hinge_active" else Jc + 50.0)
    mg = exact_meta_gradient(cmdp, logits, op)
    adapted_Jc = mg.adapted_cost
    if case == "hinge_active":   # both hinges active at phi and at theta', away from their kinks
        assert (Jc - cmdp.d > 0.1).all() and (adapted_Jc - cmdp.d > 0.1).all()
    fd = _central_differences(cmdp, op, logits)
    np.testing.assert_allclose(mg.grad, fd, rtol=0, atol=1e-6)
    # FOMAML (the gradient of L_w at theta', the inner step's Jacobian dropped) is a different vector
    theta = exact_inner_step(cmdp, torch.from_numpy(logits), op).detach().requires_grad_(True)
    first_order = torch.autograd.grad(exact_penalised(cmdp, theta, op.penalty, op.penalty_form), theta)[0].numpy()
    assert np.abs(first_order - mg.grad).max() > 1e-3


def test_exact_inner_step_is_the_penalised_policy_gradient_step():
    cmdp = random_cmdp(5, S=4, A=3, p=1, correlation=0.5)
    logits = np.random.default_rng(1).normal(size=(4, 3))
    Jc = evaluate(cmdp, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).Jc
    active = dataclasses.replace(cmdp, d=Jc - 0.2)
    op = settings(ExactPGPenaltySettings, inner_lr=0.3, penalty=1.5)
    phi = torch.tensor(logits, requires_grad=True)
    from safemeta.tasks.tabular import evaluate_torch

    ev = evaluate_torch(active, torch.softmax(phi, -1))
    g_r, g_c = (torch.autograd.grad(v, phi, retain_graph=True)[0] for v in (ev.J, ev.Jc[0]))
    theta = exact_inner_step(active, torch.from_numpy(logits), op)
    torch.testing.assert_close(theta, torch.from_numpy(logits) + 0.3 * (g_r - 1.5 * g_c), rtol=1e-12, atol=1e-12)
    slack = dataclasses.replace(cmdp, d=Jc + 0.2)   # hinge inactive: a plain policy-gradient step on J
    torch.testing.assert_close(exact_inner_step(slack, torch.from_numpy(logits), op),
                               torch.from_numpy(logits) + 0.3 * g_r, rtol=1e-12, atol=1e-12)


def test_sampled_meta_gradient_equals_higher_innerloop_ctx():
    higher = pytest.importorskip("higher")
    config = load_config({"seeds": [0], "device": "cpu",
                          "scenarios": {"s": {"distribution": "point_circle_diff", "task_options": {"horizon": 20},
                                              "n_train_tasks": 2, "n_test_tasks": 1, "rollouts": 6,
                                              "policy": {"hidden": [16]},
                                              "adaptation": {"pg_penalty": {"inner_lr": 0.5, "penalty": 2.0}}}},
                          "methods": {"m": {"algorithm": "maml_penalty"}}})
    scen = config["scenarios"]["s"]
    dist = get_distribution(scen["distribution"], **scen["task_options"])
    scenario = build_scenario(config, "s", dist, "cpu")
    train, test = dist.sample(2, (0, 0)), dist.sample(1, (0, 1))
    learner = build_meta_learner(config, scenario, "m", train, test, seed=0)
    meta, op, adapt = learner.policy(learner.initial_state()), learner.adapt.settings, learner.adapt
    on_task = adapt.start(train[0], meta, 0)
    on_task.limits = np.zeros(1)                   # every cost violates: the hinge is active in both losses
    meta_obs = adapt.observe(on_task, meta, 1)
    step = adapt.step(on_task, meta, meta_obs)
    outer = pg_data(adapt.observe(on_task, step.policy, 2).data, on_task.limits, op.penalty, op.penalty_form, False)
    inner = step.result
    assert inner.weights[0] == 2.0 and outer.weights[0] == 2.0 and inner.scale != 1.0

    ours = flat_grad(maml_objective(meta, inner, outer, op.inner_lr)(None), list(meta.parameters()))

    class LogProb(torch.nn.Module):             # higher patches this module's parameters (the policy's)
        def __init__(self, policy):
            super().__init__()
            self.policy = policy

        def forward(self, obs, actions):
            return self.policy.log_prob(obs, actions)

    model = LogProb(meta)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=op.inner_lr),
                              copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(-(inner.coef * fmodel(inner.obs, inner.actions)).sum())      # SGD on -surrogate
        ratio = torch.exp(fmodel(outer.obs, outer.actions) - outer.behaviour_log_prob)
        theirs = torch.cat([g.reshape(-1) for g in torch.autograd.grad((outer.coef * ratio).sum(),
                                                                        list(model.parameters()))])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # ... and it is second order: the gradient at theta' alone (FOMAML) differs
    theta = {k: v.detach() for k, v in step.policy.named_params().items()}
    for v in theta.values():
        v.requires_grad_(True)
    fo = torch.autograd.grad((outer.coef * torch.exp(meta.log_prob(outer.obs, outer.actions, theta)
                                                      - outer.behaviour_log_prob)).sum(), list(theta.values()))
    fo = torch.cat([g.reshape(-1) for g in fo])
    assert float((fo - ours).norm()) > 1e-3 * float(ours.norm())


def test_sampled_step_direction_estimates_the_exact_penalised_gradient():
    """pg_data's coefficients (unnormalised) give grad J - w 1[J_c > d] grad J_c of the exact CMDP."""
    from safemeta.policies import CategoricalMLPPolicy
    from safemeta.rollout import collect
    from safemeta.tasks.tabular import TabularBatchEnv

    cmdp = random_cmdp(8, S=4, A=3, p=1, correlation=0.4)
    logits = np.random.default_rng(6).normal(size=(4, 3))
    Jc = evaluate(cmdp, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).Jc
    cmdp = dataclasses.replace(cmdp, d=Jc - 0.5)                     # the hinge is active
    policy = CategoricalMLPPolicy(4, 3, ())
    with torch.no_grad():
        policy.logits[0].weight.copy_(torch.tensor(logits.T, dtype=torch.float32))
    batch = collect(TabularBatchEnv(cmdp, 4000, 60, 0), policy, torch.Generator().manual_seed(1),
                    gamma=cmdp.gamma, constraint_gamma=cmdp.gamma)
    data = pg_data(batch, cmdp.d, 3.0, "hinge", normalize=False)
    assert data.weights[0] == 3.0 and data.scale == 1.0
    got = torch.autograd.grad(surrogate(policy, data), policy.logits[0].weight)[0].numpy().T
    want = torch.func.grad(lambda th: exact_penalised(cmdp, th, 3.0, "hinge"))(torch.tensor(logits)).numpy()
    assert np.linalg.norm(got - want) < 0.08 * np.linalg.norm(want)
    normalised = pg_data(batch, cmdp.d, 3.0, "hinge", normalize=True)   # the same direction, rescaled
    torch.testing.assert_close(normalised.coef, data.coef * normalised.scale)
