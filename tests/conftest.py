"""Shared helpers for the tests: small random CMDPs with controllable limits."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from safemeta.tasks.tabular import TabularCMDP, evaluate


def random_cmdp(seed: int, S: int = 5, A: int = 3, p: int = 1, gamma: float = 0.9,
                correlation: float = 0.0) -> TabularCMDP:
    """A dense random CMDP; `correlation` mixes the reward into the costs (makes constraints bind)."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(S), size=(S, A))
    r = rng.uniform(0, 1, (S, A))
    c = (1 - correlation) * rng.uniform(0, 1, (p, S, A)) + correlation * r[None]
    rho = rng.dirichlet(np.ones(S)) * 0.5 + 0.5 / S
    return TabularCMDP(P=P, r=r, c=c, rho=rho, gamma=gamma, d=np.full(p, 1e9))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def with_limits_near(cmdp: TabularCMDP, logits: np.ndarray, margin: float | np.ndarray) -> TabularCMDP:
    """Same CMDP with d = J_c(softmax(logits)) + margin (a safe start close to the boundary)."""
    Jc = evaluate(cmdp, softmax(logits)).Jc
    return dataclasses.replace(cmdp, d=Jc + margin)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """Small networks run fastest on one thread (and CI has two cores shared with the rest)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- algorithms on hand-made tasks
class OneCMDP:
    """A task distribution whose every task is one given CMDP: exact, or sampled as a
    TabularBatchEnv of `horizon` steps (the task's limits are its params' "d")."""

    name = "one_cmdp"
    kinds = ("exact", "sampled")

    def __init__(self, cmdp: TabularCMDP, horizon: int = 100) -> None:
        self._cmdp, self.horizon = cmdp, horizon

    def cmdp(self, task):
        return self._cmdp

    def make_env(self, task, num_envs: int, seed: int, device="cpu"):
        from safemeta.tasks.tabular import TabularBatchEnv

        return TabularBatchEnv(self._cmdp, num_envs, self.horizon, seed, device)


def finite_horizon_values(cmdp: TabularCMDP, probs: np.ndarray, horizon: int, discount: float) -> np.ndarray:
    """Exact E[sum_{t<horizon} discount^t x(s_t, a_t)] from rho for the reward (index 0) and each
    cost (1..p), [1 + p]: what a TabularBatchEnv's rollouts estimate, by propagating the state law."""
    state = cmdp.rho.copy()
    P_pi = np.einsum("sa,sat->st", probs, cmdp.P)
    x_pi = np.einsum("sa,ksa->ks", probs, cmdp.signals())
    total = np.zeros(1 + cmdp.num_constraints)
    for t in range(horizon):
        total += discount ** t * (x_pi @ state)
        state = state @ P_pi
    return total


def scenario_of(dist, rollouts: int = 10, gamma: float = 0.99, constraint_gamma: float = 1.0, device="cpu"):
    """A Scenario around a distribution, with the schema's policy network."""
    from safemeta.config import check_block
    from safemeta.rollout import SamplingSettings
    from safemeta.scenario import Scenario

    policy = check_block({}, "scenario", "scenarios.test")["policy"]
    return Scenario(dist.name, dist, SamplingSettings(rollouts, gamma, constraint_gamma), policy, device)


def exact_sequence(cmdp: TabularCMDP, logits: np.ndarray, steps: int, **options):
    """The adaptation loop of the exact A^s on one CMDP from softmax(logits): arrays over k."""
    from types import SimpleNamespace

    from safemeta.adaptation.dual_pgd import ExactAdaptationSettings, ExactDualPGD
    from safemeta.config import settings
    from safemeta.evaluate import adaptation_sequence
    from safemeta.policies import TabularSoftmaxPolicy
    from safemeta.tasks import Task

    d = cmdp.d.tolist()
    operator = ExactDualPGD(scenario_of(OneCMDP(cmdp)), settings(ExactAdaptationSettings, **options))
    seq = adaptation_sequence(operator, Task("one_cmdp", {"d": d}), TabularSoftmaxPolicy(logits), steps, lambda k: k)
    return SimpleNamespace(**seq)
