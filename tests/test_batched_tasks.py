"""Several tasks stepped as one batch give every task exactly its own rollouts (issue 15).

`Scenario.rollout_tasks` (one env of all tasks' copies, the policy sampled one task's copies
at a time) must reproduce, bit for bit, the Batch that `Scenario.rollout` gives
each task alone; and so the meta-iterations (Alg. 4, MAML + penalty, Meta-CPO, Meta-CRPO's
lockstep CRPO runs), the evaluation and the meta-test, which observe their tasks together,
must give what the task-by-task path gives.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import scenario_of
from safemeta.adaptation.base import AdaptationOperator
from safemeta.adaptation.dual_pgd_sampled import SampledAdaptationSettings, SampledDualPGD
from safemeta.config import settings
from safemeta.evaluate import adaptation_sequence, meta_test
from safemeta.meta.base import train as run_training
from safemeta.meta.safe_meta import SampledMetaTrainSettings, SampledSafeMeta
from safemeta.policies import policy_from_checkpoint
from safemeta.rollout import derived_seed
from safemeta.tasks import get_distribution

FIELDS = ("obs", "actions", "log_prob", "reward", "cost", "alive")
CASES = {  # scenario -> (horizon, rollouts): every family, small
    "half_cheetah_vel": (30, 4),
    "hopper_vel": (40, 4),
    "swimmer_vel": (30, 4),        # transition noise from each task's generator
    "humanoid_dir": (40, 4),       # episodes end early, at different steps per task
    "point_circle": (40, 5),       # one model per task
    "car_circle_hazard": (40, 4),  # 3-7 hazards per task: padded object lists
    "point_button": (60, 4),
    "point_circle_diff": (30, 4),  # torch task: the default ConcatEnv
}


@pytest.mark.parametrize("name", list(CASES))
def test_tasks_in_one_batch_give_each_task_its_own_rollouts_bit_for_bit(name):
    horizon, rollouts = CASES[name]
    dist = get_distribution(name, horizon=horizon)
    tasks = dist.sample(3, (0, 0))
    scenario = scenario_of(dist, rollouts=rollouts)
    meta = scenario.fresh_policy(tasks[0], 0, "sampled")
    other = scenario.fresh_policy(tasks[0], 1, "sampled")
    for policies in ([meta] * 3, [meta, other, other]):       # one policy for all, or two
        seeds = [11, 12, 13]
        together = scenario.rollout_tasks(tasks, policies, seeds)
        for task, policy, seed, batch in zip(tasks, policies, seeds, together):
            alone = scenario.rollout(task, policy, seed)
            for field in FIELDS:
                assert torch.equal(getattr(batch, field), getattr(alone, field)), field
    if name == "humanoid_dir":    # the tasks' batches end where their own copies have all fallen
        assert len({b.obs.shape[0] for b in together}) > 1
    if name == "car_circle_hazard":
        assert len({len(t.params["hazards"]) for t in tasks}) > 1


def test_buttons_reached_in_one_batch_redraw_goals_from_each_tasks_generator():
    """Copies pushed into their goal button: the goal redraw (the only per-step draw of the
    button tasks) takes block k's draws from task k's generator, as that task's env alone."""
    dist = get_distribution("point_button", horizon=20)
    tasks = dist.sample(2, (0, 3))
    n, seeds = 3, [5, 6]

    def push_into_goal(env, layouts, goals):
        buttons = np.concatenate([np.asarray(lay.buttons)[g] for lay, g in zip(layouts, goals)])
        xy = buttons + np.array([0.16, 0.0])                     # just outside contact, moving in
        env.set_pose(xy, np.full(len(xy), np.pi), velocity=np.tile([-2.0, 0.0], (len(xy), 1)),
                     goal=np.concatenate(goals))
        steps = [env.step(torch.zeros(env.num_envs, 2)) for _ in range(6)]
        return env.goal.copy(), torch.stack([s.reward for s in steps]), torch.stack([s.obs for s in steps])

    goals = [np.arange(n) % len(dist.layout(t.params).buttons) for t in tasks]
    together = dist.make_envs(tasks, n, seeds)
    goal_all, reward_all, obs_all = push_into_goal(together, together.layouts, goals)
    for k, (task, seed) in enumerate(zip(tasks, seeds)):
        alone = dist.make_env(task, n, seed)
        goal, reward, obs = push_into_goal(alone, alone.layouts, [goals[k]])
        block = slice(k * n, (k + 1) * n)
        assert (reward > 0.5).any()                              # a goal was reached, then redrawn
        np.testing.assert_array_equal(goal_all[block], goal)
        assert torch.equal(reward_all[:, block], reward) and torch.equal(obs_all[:, block], obs)


class TaskByTask(SampledDualPGD):
    """The same operator observing its tasks one after another (the per-task reference path)."""

    observe_tasks = AdaptationOperator.observe_tasks


def test_meta_iterations_evaluation_and_meta_test_match_the_task_by_task_path():
    dist = get_distribution("point_circle", horizon=40, cost_limit=2.0)
    train, test = dist.sample(5, (0, 0)), dist.sample(3, (0, 1))
    scenario = scenario_of(dist, rollouts=4)
    adaptation = settings(SampledAdaptationSettings, lam_c=1.0, kl_target=0.03)
    meta_settings = settings(SampledMetaTrainSettings, iterations=2, tasks_per_iteration=3, max_kl=0.01,
                             cg_iters=5, cg_damping=0.1, eval_every=1, constrain_adapted=True)
    results = []
    for operator in (SampledDualPGD(scenario, adaptation), TaskByTask(scenario, adaptation)):
        learner = SampledSafeMeta(scenario, operator, meta_settings, train, test, seed=0)
        state = run_training(learner, learner.initial_state())
        results.append((state, meta_test(operator, test, learner.policy(state), 2, seed=4)))
    (batched, batched_test), (alone, alone_test) = results
    assert any(np.isfinite(r["batch_reward"]) for r in batched.records[:-1]), "no task took the adaptation branch"
    for a, b in zip(batched.records, alone.records):
        for key in a:
            if not key.startswith("time"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    policy, operator = policy_from_checkpoint(alone.policy), TaskByTask(scenario, adaptation)
    for j, task in enumerate(test):          # the lockstep loop = each task's own loop with its seeds
        task_seed = derived_seed(4, j)
        own = adaptation_sequence(operator, task, policy, 2, lambda k: derived_seed(task_seed, k),
                                  start_seed=derived_seed(task_seed, 1 << 20))
        for key in batched_test:
            if not key.startswith("time"):
                np.testing.assert_array_equal(batched_test[key][j], own[key], err_msg=key)
                np.testing.assert_array_equal(alone_test[key][j], own[key], err_msg=key)


@pytest.mark.parametrize("algorithm", ["maml_penalty", "meta_cpo"])
def test_baseline_meta_iterations_match_the_task_by_task_path(algorithm):
    """MAML + penalty and Meta-CPO observe an iteration's tasks together (all batches on pi_phi,
    then all on the adapted policies): records and meta-policy as when each task is observed alone."""
    from safemeta.config import load_config
    from safemeta.plugins import build_meta_learner, build_scenario

    config = load_config({"seeds": [0], "device": "cpu",
                          "scenarios": {"s": {"distribution": "point_circle", "task_options": {"horizon": 40},
                                              "n_train_tasks": 5, "n_test_tasks": 2, "rollouts": 4,
                                              "policy": {"hidden": [16]},
                                              "metatrain": {"iterations": 2, "tasks_per_iteration": 3,
                                                            "cg_iters": 5, "eval_every": 1}}},
                          "methods": {"m": {"algorithm": algorithm}}})
    dist = get_distribution("point_circle", horizon=40)
    train, test = dist.sample(5, (0, 0)), dist.sample(2, (0, 1))
    results = []
    for together in (True, False):
        learner = build_meta_learner(config, build_scenario(config, "s", dist, "cpu"), "m", train, test, seed=0)
        if not together:   # the operator's per-task path, one `observe` after another
            learner.adapt.observe_tasks = lambda *a, op=learner.adapt: AdaptationOperator.observe_tasks(op, *a)
        results.append(run_training(learner, learner.initial_state()))
    batched, alone = results
    assert len(batched.records) == 3
    for a, b in zip(batched.records, alone.records):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith("time"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key, value in batched.policy["state_dict"].items():
        assert torch.equal(value, alone.policy["state_dict"][key]), key


def test_meta_crpo_groups_in_lockstep_give_every_task_the_policies_of_its_own_run():
    """Meta-CRPO runs CRPO on groups of tasks_per_iteration tasks in lockstep (one batch per
    round): every record's steps are those of the schedule, each task's k = 0..K-1 once and in
    order, and the task policies and distilled meta-policy equal the one-task-at-a-time run's."""
    from safemeta.config import load_config
    from safemeta.plugins import build_meta_learner, build_scenario

    dist = get_distribution("point_circle", horizon=30)
    train, test = dist.sample(5, (0, 0)), dist.sample(1, (0, 1))

    def learner_of(group: int, steps: int, iterations: int):
        config = load_config({"seeds": [0], "device": "cpu",
                              "scenarios": {"s": {"distribution": "point_circle", "task_options": {"horizon": 30},
                                                  "n_train_tasks": 5, "n_test_tasks": 1, "rollouts": 3,
                                                  "policy": {"hidden": [16]},
                                                  "metatrain": {"iterations": iterations, "tasks_per_iteration": group}}},
                              "methods": {"m": {"algorithm": "meta_crpo", "crpo_steps": steps}}})
        return build_meta_learner(config, build_scenario(config, "s", dist, "cpu"), "m", train, test, seed=0)

    one_step = learner_of(2, 1, 1)._rounds(0)      # one step per task: the rounds still stop at each group
    assert [[j for j, _ in r] for r in one_step] == [[0, 1], [2, 3], [4]]
    results = []
    for group in (2, 1):
        learner = learner_of(group, 3, 4)
        rounds = [learner._rounds(n) for n in range(4)]
        steps = [step for record in rounds for r in record for step in r]
        assert sorted(steps) == [(j, k) for j in range(5) for k in range(3)]                 # every step once
        assert all([k for jj, k in steps if jj == j] == [0, 1, 2] for j in range(5))          # in order per task
        assert all(len({k for _, k in r}) == 1 for record in rounds for r in record)          # a round: one step k
        if group == 2:
            assert max(len(r) for record in rounds for r in record) == 2
        results.append(run_training(learner, learner.initial_state()))
    lockstep, alone = results
    for a, b in zip(lockstep.task_policies + [lockstep.meta], alone.task_policies + [alone.meta]):
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), key
