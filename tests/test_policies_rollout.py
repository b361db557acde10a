"""Neural policies (log-probabilities, KL, functional use, checkpoints) and batched rollouts."""
from __future__ import annotations

import math

import numpy as np
import torch

from safemeta.policies import CategoricalMLPPolicy, GaussianMLPPolicy, policy_for, policy_from_checkpoint
from safemeta.rollout import Batch, collect, returns_to_go, time_baseline
from safemeta.tasks import get_distribution


def test_gaussian_log_prob_and_kl_follow_their_formulas():
    torch.manual_seed(0)
    pol = GaussianMLPPolicy(3, 2)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    mean, log_std = pol.mean(obs), pol.log_std
    by_hand = (-0.5 * ((act - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(pol.log_prob(obs, act), by_hand)
    other = pol.unflatten(pol.flat() + 0.1)
    p, q = pol.distribution(obs), pol.distribution(obs, other)
    mp, sp, mq, sq = p.base_dist.loc, p.base_dist.scale, q.base_dist.loc, q.base_dist.scale
    kl_by_hand = (torch.log(sq / sp) + (sp ** 2 + (mp - mq) ** 2) / (2 * sq ** 2) - 0.5).sum(-1)
    torch.testing.assert_close(pol.kl(obs, p, other), kl_by_hand)


def test_gaussian_sample_blocks_equals_each_block_drawn_through_torch_distributions_bit_for_bit():
    """The lean sampling path (functional forward per block, draws' arithmetic over all rows) gives
    the actions and log-probabilities of torch.distributions on each block alone, with its generator."""
    for obs_dim, act_dim, rows, blocks in ((17, 6, 10, 10), (376, 17, 40, 3), (8, 2, 7, 1)):
        torch.manual_seed(obs_dim)
        policy = GaussianMLPPolicy(obs_dim, act_dim)
        with torch.no_grad():
            policy.log_std.uniform_(-1.0, 0.5)
        obs = 3 * torch.randn(rows * blocks, obs_dim)
        actions, log_prob = policy.sample_blocks(obs, [torch.Generator().manual_seed(k) for k in range(blocks)])
        expected_a, expected_lp = [], []
        with torch.no_grad():
            for k, block in enumerate(obs.chunk(blocks)):
                dist = policy.distribution(block.clone())
                mean, std = dist.base_dist.loc, dist.base_dist.scale
                a = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(k))
                expected_a.append(a)
                expected_lp.append(dist.log_prob(a))
        assert torch.equal(actions, torch.cat(expected_a))
        assert torch.equal(log_prob, torch.cat(expected_lp))


def test_functional_parameters_match_loaded_parameters_and_checkpoints_round_trip():
    torch.manual_seed(1)
    pol = GaussianMLPPolicy(4, 2, (8, 8))
    obs, act = torch.randn(6, 4), torch.randn(6, 2)
    shifted = pol.flat() * 0.9 + 0.01
    functional = pol.log_prob(obs, act, pol.unflatten(shifted))
    pol.load_flat(shifted)
    torch.testing.assert_close(pol.log_prob(obs, act), functional)
    again = policy_from_checkpoint(pol.to_checkpoint())
    torch.testing.assert_close(again.log_prob(obs, act), functional)
    assert again.config == pol.config


def test_categorical_without_hidden_layers_is_a_tabular_softmax():
    pol = CategoricalMLPPolicy(4, 3, ())
    table = torch.randn(4, 3)
    with torch.no_grad():
        pol.logits[0].weight.copy_(table.T)
    torch.testing.assert_close(pol.distribution(torch.eye(4)).probs, torch.softmax(table, -1))
    gen = torch.Generator().manual_seed(0)
    actions, logp = pol.sample(torch.eye(4)[[0] * 20000], gen)
    freq = torch.bincount(actions, minlength=3) / 20000
    assert torch.allclose(freq, torch.softmax(table[0], -1), atol=0.015)


def test_policy_for_picks_the_policy_of_the_action_space():
    from gymnasium import spaces

    box = spaces.Box(-1, 1, (3,))
    assert isinstance(policy_for(spaces.Box(-1, 1, (5,)), box), GaussianMLPPolicy)
    assert isinstance(policy_for(spaces.Box(0, 1, (5,)), spaces.Discrete(4)), CategoricalMLPPolicy)


def test_returns_to_go_and_baseline_respect_termination():
    reward = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    alive = torch.tensor([[True, True], [True, False], [True, False]])
    q = returns_to_go(reward, alive, 0.5)
    torch.testing.assert_close(q[:, 0], torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]))
    torch.testing.assert_close(q[:, 1], torch.tensor([1.0, 0.0, 0.0]))
    b = time_baseline(q, alive)
    torch.testing.assert_close(b[0], torch.full((2,), (q[0, 0] + q[0, 1]) / 2))
    torch.testing.assert_close(b[1], torch.tensor([q[1, 0], 0.0]))


def test_collect_runs_the_whole_batch_and_sums_episodes():
    dist = get_distribution("cartpole_pos", horizon=60)
    task = dist.sample(1, 0)[0]
    env = dist.make_env(task, 16, seed=3)
    torch.manual_seed(0)
    pol = policy_for(env.observation_space, env.action_space)
    batch = collect(env, pol, torch.Generator().manual_seed(0), gamma=0.9, constraint_gamma=1.0)
    T, N = batch.reward.shape
    assert N == 16 and T <= 60 and batch.cost.shape == (T, 16, 1)
    assert not batch.alive.all()  # cart-pole episodes terminate; later steps are masked
    torch.testing.assert_close(batch.episode_reward, (batch.reward * batch.alive).sum(0))
    torch.testing.assert_close(batch.constraint_value, batch.episode_cost.mean(0))   # constraint_gamma = 1
    torch.testing.assert_close(batch.visitation().sum(), torch.tensor(1.0))
    assert isinstance(batch, Batch)


def test_same_seed_same_rollouts():
    dist = get_distribution("point_circle", horizon=40)
    task = dist.sample(1, 0)[0]
    pol = policy_for(dist.make_env(task, 1, 0).observation_space, dist.make_env(task, 1, 0).action_space)
    a = collect(dist.make_env(task, 4, 7), pol, torch.Generator().manual_seed(1), 0.99)
    b = collect(dist.make_env(task, 4, 7), pol, torch.Generator().manual_seed(1), 0.99)
    c = collect(dist.make_env(task, 4, 8), pol, torch.Generator().manual_seed(1), 0.99)
    torch.testing.assert_close(a.obs, b.obs)
    torch.testing.assert_close(a.reward, b.reward)
    assert not np.allclose(a.obs.numpy(), c.obs.numpy())


class CostlyEndEnv:
    """Copy i terminates on its transition at step i + 1 (copy 3 never), and that transition costs
    2; every transition rewards 1 (the BatchEnv conventions: frozen and zero after termination)."""

    num_envs, horizon, num_constraints, device = 4, 6, 1, "cpu"
    END = torch.tensor([1, 2, 3, 99])

    def __init__(self):
        from gymnasium import spaces

        self.observation_space, self.action_space = spaces.Box(-1, 1, (1,)), spaces.Discrete(2)
        self.cost_limits = np.array([1.0])

    def reset(self):
        self.t, self.done = 0, torch.zeros(4, dtype=torch.bool)
        return torch.zeros(4, 1)

    def step(self, actions):
        from safemeta.tasks.base import StepResult

        live = ~self.done
        ends = live & (self.END == self.t)
        reward, cost = live.float(), (2.0 * ends.float())[:, None]
        self.done = self.done | ends
        self.t += 1
        return StepResult(torch.zeros(4, 1), reward, cost, ends, torch.full((4,), self.t >= self.horizon))


def test_collect_keeps_the_terminal_transitions_reward_and_cost():
    batch = collect(CostlyEndEnv(), CategoricalMLPPolicy(1, 2, ()), torch.Generator().manual_seed(0), gamma=0.5,
                    constraint_gamma=0.9)
    torch.testing.assert_close(batch.episode_reward, torch.tensor([2.0, 3.0, 4.0, 6.0]))
    torch.testing.assert_close(batch.episode_cost[:, 0], torch.tensor([2.0, 2.0, 2.0, 0.0]))
    torch.testing.assert_close(batch.constraint_value, torch.tensor([2.0 * (0.9 + 0.9 ** 2 + 0.9 ** 3) / 4]))
    torch.testing.assert_close(batch.q_cost[0, :, 0], torch.tensor([2 * 0.5, 2 * 0.5 ** 2, 2 * 0.5 ** 3, 0.0]))


def test_sampling_time_includes_building_the_environment():
    import time

    from safemeta.rollout import SamplingSettings, rollout_policy

    dist = get_distribution("point_circle", horizon=2)
    task = dist.sample(1, 0)[0]
    pol = policy_for(dist.make_env(task, 1, 0).observation_space, dist.make_env(task, 1, 0).action_space)

    class SlowToBuild:                                 # an external simulator that takes 0.3 s to start
        def make_env(self, *args):
            time.sleep(0.3)
            return dist.make_env(*args)

    batch = rollout_policy(SlowToBuild(), task, pol, SamplingSettings(2, 0.99, 1.0), seed=0)
    assert batch.sampling_time >= 0.3
