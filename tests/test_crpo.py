"""CRPO (operator crpo) and Meta-CRPO (baseline (c)) against exact tabular answers.

The switch rule; the exact step is the natural-gradient TRPO step on the chosen objective; the
sampled surrogates' gradients approach the exact policy gradients; the exact distillation is the
minimiser of the mean visitation-weighted KL (vs scipy) and the sampled L-BFGS fit reaches the
per-state mixture; Meta-CRPO's default CRPO budget equals the other methods' data.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from conftest import OneCMDP, random_cmdp, scenario_of, softmax
from safemeta.adaptation.crpo import CRPOSettings, ExactCRPO, crpo_branch, surrogate_coefficients
from safemeta.config import ConfigError, load_config, settings, stage_config
from safemeta.meta.base import train
from safemeta.meta.meta_crpo import MetaCRPOState, SampledMetaCRPO, SampledMetaCRPOSettings
from safemeta.plugins import build_meta_learner, build_scenario
from safemeta.policies import CategoricalMLPPolicy, TabularSoftmaxPolicy
from safemeta.rollout import collect
from safemeta.tasks import Task, get_distribution
from safemeta.tasks.tabular import TabularBatchEnv, evaluate, evaluate_torch


def test_switch_takes_the_reward_within_tolerance_and_else_the_most_violated_cost():
    assert crpo_branch(np.array([1.0, 2.0]), np.array([1.0, 2.0]), 0.0) == -1
    assert crpo_branch(np.array([1.4, 2.0]), np.array([1.0, 2.0]), 0.5) == -1
    assert crpo_branch(np.array([1.4, 2.9]), np.array([1.0, 2.0]), [0.5, 0.5]) == 1
    assert crpo_branch(np.array([3.0, 2.9]), np.array([1.0, 2.0]), 0.0) == 0


@pytest.mark.parametrize("violating", [False, True])
def test_exact_step_is_the_natural_gradient_trust_region_step(violating):
    cmdp = random_cmdp(6, S=5, A=3, p=2, correlation=0.5)
    logits = np.random.default_rng(2).normal(size=(5, 3))
    ev = evaluate(cmdp, softmax(logits))
    # violating: both constraints violated, the second by more; otherwise both slack
    d = ev.Jc - np.array([0.1, 0.4]) if violating else ev.Jc + 1.0
    cmdp = dataclasses.replace(cmdp, d=d)
    s = settings(CRPOSettings, max_kl=0.01, cg_iters=50, cg_damping=1e-4)
    op = ExactCRPO(scenario_of(OneCMDP(cmdp)), s)
    task = Task("one_cmdp", {"d": d.tolist()})
    state = op.start(task, TabularSoftmaxPolicy(logits), 0)
    obs = op.observe(state, TabularSoftmaxPolicy(logits), 0)
    step = op.step(state, TabularSoftmaxPolicy(logits), obs)
    after = evaluate(cmdp, step.policy.probs())
    assert step.record == {"cost_step": float(violating), "step_accepted": 1.0}
    if violating:
        assert after.Jc[1] < ev.Jc[1] - 1e-4                   # the most violated cost falls
    else:
        assert after.J > ev.J + 1e-4
    log_old, log_new = np.log(softmax(logits)), step.policy.logits
    assert (ev.nu * (softmax(logits) * (log_old - log_new)).sum(-1)).sum() <= s.max_kl * (1 + 1e-9)
    # the direction solves (F + damping) x = g with the exact visitation-weighted softmax Fisher
    phi = torch.tensor(logits, requires_grad=True)
    out = evaluate_torch(cmdp, torch.softmax(phi, -1))
    g = torch.autograd.grad(-out.Jc[1] if violating else out.J, phi)[0].numpy().reshape(-1)
    pi = softmax(logits)
    F = np.zeros((15, 15))
    for st in range(5):
        block = ev.nu[st] * (np.diag(pi[st]) - np.outer(pi[st], pi[st]))
        F[3 * st:3 * st + 3, 3 * st:3 * st + 3] = block
    x = np.linalg.solve(F + s.cg_damping * np.eye(15), g)
    move = step.result.params.numpy() - np.log(pi).reshape(-1)
    assert move @ x / (np.linalg.norm(move) * np.linalg.norm(x)) > 1 - 1e-6


def _tabular_policy(logits: np.ndarray) -> CategoricalMLPPolicy:
    policy = CategoricalMLPPolicy(logits.shape[0], logits.shape[1], ())
    with torch.no_grad():
        policy.logits[0].weight.copy_(torch.tensor(logits.T, dtype=torch.float32))
    return policy


def test_sampled_surrogates_estimate_the_exact_policy_gradients():
    cmdp = random_cmdp(7, S=4, A=3, p=1, correlation=0.3)
    logits = np.random.default_rng(3).normal(size=(4, 3))
    policy = _tabular_policy(logits)
    batch = collect(TabularBatchEnv(cmdp, 4000, 60, 0), policy, torch.Generator().manual_seed(1),
                    gamma=cmdp.gamma, constraint_gamma=cmdp.gamma)
    phi = torch.tensor(logits, requires_grad=True)
    out = evaluate_torch(cmdp, torch.softmax(phi, -1))
    alive = batch.alive
    logp = policy.log_prob(batch.obs[alive], batch.actions[alive])
    for branch, exact in ((-1, out.J), (0, -out.Jc[0])):
        want = torch.autograd.grad(exact, phi, retain_graph=True)[0].numpy()
        got = torch.autograd.grad((surrogate_coefficients(batch, branch) * logp).sum(), policy.logits[0].weight,
                                  retain_graph=True)[0].numpy().T
        assert np.linalg.norm(got - want) < 0.08 * np.linalg.norm(want), (branch, got, want)


def test_exact_distillation_is_the_minimiser_of_the_mean_weighted_kl():
    from safemeta.meta.meta_crpo import ExactMetaCRPO

    rng = np.random.default_rng(4)
    probs = [softmax(rng.normal(size=(4, 3)) * 2) for _ in range(3)]
    nus = [rng.dirichlet(np.ones(4)) for _ in range(3)]
    state = MetaCRPOState(0, None, task_policies=[np.log(p) for p in probs], task_data=nus)
    log_mix, kl = ExactMetaCRPO.distill(None, state)

    def objective(flat):
        log_pi = flat.reshape(4, 3) - np.logaddexp.reduce(flat.reshape(4, 3), axis=-1, keepdims=True)
        return np.mean([(nu * (p * (np.log(p) - log_pi)).sum(-1)).sum() for p, nu in zip(probs, nus)])

    best = minimize(objective, np.zeros(12), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(np.exp(log_mix), softmax(best.x.reshape(4, 3)), atol=1e-5)
    assert abs(kl - best.fun) < 1e-9


def test_sampled_distillation_reaches_the_visitation_weighted_mixture():
    """Categorical policies without hidden layers on one-hot states: the optimum of the fit is the
    per-state mixture of the task policies weighted by how often each task's states were drawn."""
    rng = np.random.default_rng(5)
    S, A = 4, 3
    task_logits = [rng.normal(size=(S, A)) for _ in range(3)]
    draws = [torch.multinomial(torch.tensor(rng.dirichlet(np.ones(S))), 200, replacement=True,
                               generator=torch.Generator().manual_seed(j)) for j in range(3)]
    states = [torch.nn.functional.one_hot(d, S).float() for d in draws]
    init = _tabular_policy(np.zeros((S, A))).to_checkpoint()
    state = MetaCRPOState(0, init, task_policies=[_tabular_policy(lg).to_checkpoint() for lg in task_logits],
                          task_data=states)
    learner = SampledMetaCRPO.__new__(SampledMetaCRPO)
    learner.scenario, learner.settings = SimpleNamespace(device="cpu"), settings(SampledMetaCRPOSettings,
                                                                                 distill_iters=60)
    meta, kl = learner.distill(state)
    counts = np.stack([np.bincount(d.numpy(), minlength=S) / len(d) for d in draws])       # [task, S]
    mixture = np.einsum("js,jsa->sa", counts / counts.sum(0), np.stack([softmax(lg) for lg in task_logits]))
    fitted = softmax(meta["state_dict"]["logits.0.weight"].double().numpy().T)
    np.testing.assert_allclose(fitted, mixture, atol=1e-4)
    assert kl > 0


def test_default_crpo_steps_match_the_other_methods_data():
    """crpo_steps null: N tasks x K CRPO batches = 2 x iterations x tasks_per_iteration (two batches
    per training task per meta-iteration, as MAML and Alg. 4 collect)."""
    config = load_config({"seeds": [0], "device": "cpu",
                          "scenarios": {"s": {"distribution": "tabular_random", "task_options": {"num_states": 4},
                                              "n_train_tasks": 6, "n_test_tasks": 2}},
                          "methods": {"c": {"algorithm": "meta_crpo"}},
                          "metatrain": {"iterations": 3, "tasks_per_iteration": 4}})
    dist = get_distribution("tabular_random", num_states=4)
    learner = build_meta_learner(config, build_scenario(config, "s", dist, "cpu"), "c", dist.sample(6, (0, 0)),
                                 dist.sample(2, (0, 1)), seed=0)
    assert learner.steps_per_task() == 4
    state = train(learner, learner.initial_state())
    assert sum(r.get("crpo_steps", 0) for r in state.records) == 2 * 3 * 4
    assert len(state.task_policies) == 6 and "distill_kl" in state.records[-1]


def test_a_scenario_metatrain_key_needs_one_method_that_reads_it():
    config = {"scenarios": {"s": {"distribution": "tabular_random", "metatrain": {"max_kl": 0.005}}},
              "methods": {"c": {"algorithm": "meta_crpo"}}}
    with pytest.raises(ConfigError, match=r"config key 'scenarios\.s\.metatrain\.max_kl': not read by any method"):
        load_config(config)
    config["methods"]["m"] = {"algorithm": "maml_penalty"}   # MAML's TRPO outer step reads it
    resolved = load_config(config)
    assert resolved["scenarios"]["s"]["metatrain"] == {"max_kl": 0.005}
    # each job's config part holds the effective values of the keys its method reads (the
    # scenario's override folded in), and is a valid config by itself
    parts = {m: stage_config(resolved, "meta_train", "s", m) for m in ("c", "m")}
    assert "max_kl" not in parts["c"]["metatrain"] and parts["m"]["metatrain"]["max_kl"] == 0.005
    for part in parts.values():
        load_config(part)
