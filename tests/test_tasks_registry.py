"""Every registered scenario: reproducible sampling, JSON round trip, paper ranges, stable shapes, BatchEnv contract."""
import math

import numpy as np
import pytest
import torch

from safemeta.tasks import BatchEnv, Task, TaskParamError, distribution_names, get_distribution
from safemeta.tasks.base import round_trip, tasks_from_json, tasks_to_json

SCENARIOS = ["half_cheetah_vel", "hopper_vel", "swimmer_vel", "humanoid_dir", "point_circle", "car_circle_hazard",
             "point_button", "function_env", "function_env_floor", "cartpole_pos", "point_circle_diff"]

# scenario -> (obs dim, act dim, horizon, d)
CONTRACT = {
    "half_cheetah_vel": (17, 6, 200, 10.0), "hopper_vel": (11, 3, 200, 5.0), "swimmer_vel": (8, 2, 200, 5.0),
    "humanoid_dir": (376, 17, 200, 20.0), "point_circle": (28, 2, 500, 10.0), "car_circle_hazard": (56, 2, 500, 10.0),
    "point_button": (60, 2, 500, 10.0), "function_env": (1, 1, 100, 8.0), "function_env_floor": (1, 1, 100, 8.0),
    "cartpole_pos": (4, 1, 300, -50.0), "point_circle_diff": (4, 2, 200, 10.0),
}


# scalar parameters that the distribution draws per task
VARYING = {
    "half_cheetah_vel": ["goal_velocity"], "hopper_vel": ["goal_velocity"],
    "swimmer_vel": ["goal_velocity", "noise_var", "cost_weight"], "humanoid_dir": ["direction"],
    "point_circle": ["radius", "wall_factor"], "car_circle_hazard": ["radius", "wall_factor"], "point_button": [],
    "function_env": ["shift"], "function_env_floor": ["shift"], "cartpole_pos": ["pole_mass", "pole_half_length"],
    "point_circle_diff": ["radius", "wall_factor"],
}


def within(x, lo, hi):
    return lo <= x <= hi


def in_paper_range(name, p):
    """The paper's (App. D.1) and CGPO's task distributions."""
    if name == "half_cheetah_vel":
        return within(p["goal_velocity"], 0, 2)
    if name == "hopper_vel":
        return within(p["goal_velocity"], 0, 1)
    if name == "swimmer_vel":
        return within(p["goal_velocity"], 0, 1) and within(p["noise_var"], 0, 0.5) and within(p["cost_weight"], 0.5, 1)
    if name == "humanoid_dir":
        return within(p["direction"], 0, math.pi / 2)
    if name in ("point_circle", "point_circle_diff"):
        return within(p["radius"], 1.0, 1.5) and within(p["wall_factor"], 0.55, 0.75)
    if name == "car_circle_hazard":
        wall = p["radius"] * p["wall_factor"]
        return (within(p["radius"], 0.7, 1.0) and within(p["wall_factor"], 0.55, 0.75)
                and within(len(p["hazards"]), 3, 7) and all(abs(x) <= wall for x, _ in p["hazards"]))
    if name == "point_button":
        return (within(len(p["buttons"]), 6, 10) and within(len(p["hazards"]), 6, 10)
                and np.abs(np.array(p["buttons"] + p["hazards"])).max() <= p["extent"])
    if name in ("function_env", "function_env_floor"):
        return within(p["shift"], -1, 1)
    if name == "cartpole_pos":
        return within(p["pole_mass"], 0.05, 0.15) and within(p["pole_half_length"], 0.4, 0.6)
    raise AssertionError(name)


def test_all_scenarios_registered():
    assert set(SCENARIOS) <= set(distribution_names())


@pytest.mark.parametrize("name", SCENARIOS)
def test_sampling_reproducible_and_round_trips(name):
    dist = get_distribution(name)
    a, b, c = dist.sample(4, seed=7), dist.sample(4, seed=7), dist.sample(4, seed=8)
    assert a == b
    assert a != c
    assert all(t.scenario == name for t in a)
    assert tasks_from_json(tasks_to_json(a)) == a
    for t in a:
        assert round_trip(t) == t
        dist.validate(round_trip(t))


@pytest.mark.parametrize("name", SCENARIOS)
def test_params_within_paper_ranges(name):
    d_expected = CONTRACT[name][3]
    tasks = get_distribution(name).sample(30, seed=0)
    for t in tasks:
        assert in_paper_range(name, t.params), t.params
        assert t.params["d"] == [pytest.approx(d_expected)]
    for key in VARYING[name]:
        assert len({t.params[key] for t in tasks}) > 1, key
    for key in ("hazards", "buttons"):  # layouts vary in count and place
        if key in tasks[0].params:
            assert len({str(t.params[key]) for t in tasks}) == len(tasks)


@pytest.mark.parametrize("name", SCENARIOS)
def test_batch_env_contract_and_stable_shapes(name):
    obs_dim, act_dim, horizon, d = CONTRACT[name]
    dist = get_distribution(name)
    for task in dist.sample(2, seed=3):
        env = dist.make_env(task, 3, seed=0)
        assert isinstance(env, BatchEnv)
        assert env.num_envs == 3 and env.horizon == horizon and env.num_constraints == 1
        assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (act_dim,)
        np.testing.assert_allclose(env.cost_limits, [d])
        obs = env.reset()
        assert isinstance(obs, torch.Tensor) and obs.shape == (3, obs_dim) and torch.isfinite(obs).all()
        out = env.step(torch.zeros(3, act_dim))
        assert out.obs.shape == (3, obs_dim) and out.reward.shape == (3,) and out.cost.shape == (3, 1)
        assert out.terminated.dtype == torch.bool and out.truncated.dtype == torch.bool
        assert out.terminated.shape == out.truncated.shape == (3,)
        assert not out.truncated.any()


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_seed_same_rollouts(name):
    dist = get_distribution(name)
    task = dist.sample(1, seed=0)[0]
    act_dim = CONTRACT[name][1]
    actions = torch.rand(6, 2, act_dim, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def run(seed):
        env = dist.make_env(task, 2, seed=seed)
        obs = [env.reset()]
        for a in actions:
            obs.append(env.step(a).obs)
        return torch.stack(obs)

    first, second, other = run(5), run(5), run(6)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", ["half_cheetah_vel", "point_circle", "function_env"])
def test_short_horizon_truncates_and_scales_d(name):
    dist = get_distribution(name, horizon=4)
    task = dist.sample(1, seed=0)[0]
    obs_dim, act_dim, horizon, d = CONTRACT[name]
    assert task.params["d"] == [pytest.approx(d * 4 / horizon)]
    env = dist.make_env(task, 2, seed=0)
    env.reset()
    flags = [bool(env.step(torch.zeros(2, act_dim)).truncated.all()) for _ in range(4)]
    assert flags == [False, False, False, True]
    assert get_distribution(name, cost_limit=3.0).sample(1, seed=0)[0].params["d"] == [3.0]


@pytest.mark.parametrize("name", SCENARIOS)
def test_bad_options_and_params_are_named(name):
    with pytest.raises(TaskParamError, match=name):
        get_distribution(name, no_such_option=1)
    with pytest.raises(TaskParamError, match="horizon"):
        get_distribution(name, horizon=0)
    dist = get_distribution(name)
    good = dist.sample(1, seed=0)[0]
    with pytest.raises(TaskParamError, match="'d'"):
        dist.validate(Task(name, {**good.params, "d": [1.0, 2.0]}))
    key = (VARYING[name] or ["extent"])[0]
    with pytest.raises(TaskParamError, match=f"{name}.*{key}"):
        dist.make_env(Task(name, {**good.params, key: float("nan")}), 1, seed=0)
    with pytest.raises(TaskParamError):
        dist.validate(Task("another_scenario", good.params))
