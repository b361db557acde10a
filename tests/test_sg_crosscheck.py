"""The native navigation tasks against the real Safety-Gymnasium 1.0.0 (the sg_* scenarios, worker process).

Runs where the worker environment is built (`safemeta sg-setup`; CI builds it) and skips otherwise;
the tests of error messages and of `sg-setup`'s argument checks run everywhere.

Tolerances come from benchmarks/sg_agreement.py (3 tasks x 4 copies x 500 random-action steps per
scenario; README, "Safety-Gymnasium"): native vs SG, the car stays within 3.5e-6 m and its
observations within 1.2e-3 with identical costs; the point within 2e-4 (observations) over the
first 10 steps and 2.2e-2 m after 500 steps, less than SG's own spread under a 1e-9 rad
perturbation of the start (3.5e-2 m): the point's yaw servo chatters (its time constant is below
the 2 ms timestep), so its accelerometer and gyro are chaotic in SG itself and are compared only
over the first steps.
"""
import math
import os
import signal
import sys

import numpy as np
import pytest
import torch

from safemeta.tasks import BatchEnv, BatchEnvError, Task, get_distribution
from safemeta.tasks import sg_navigation
from safemeta.tasks.navigation import LIDAR_BINS
from safemeta.tasks.sg_setup import worker_python

needs_worker = pytest.mark.skipif(worker_python() is None,
                                  reason="Safety-Gymnasium worker environment not built: run `safemeta sg-setup`")
SCENARIOS = ["point_circle", "car_circle_hazard", "point_button"]
POINT_STEADY = np.r_[3, 5, 9:12]       # velocimeter x and z, magnetometer: not moved by the yaw servo's chatter


def pair(name, n=4, seed=0, params=None, **options):
    """The native and the Safety-Gymnasium env of one task (same env seed: same starts)."""
    native, sg = get_distribution(name, sim_threads=1), get_distribution(f"sg_{name}", sim_threads=1, **options)
    task = native.sample(1, seed=seed)[0]
    params = {**task.params, **(params or {})}
    return native.make_env(Task(name, params), n, seed=seed), sg.make_env(Task(sg.name, params), n, seed=seed)


def random_actions(steps, n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (steps, n, 2)))


@needs_worker
@pytest.mark.parametrize("name", SCENARIOS)
def test_same_tasks_starts_and_observations(name):
    native, sg = get_distribution(name), get_distribution(f"sg_{name}")
    assert [t.params for t in sg.sample(3, seed=5)] == [t.params for t in native.sample(3, seed=5)]
    a, b = pair(name, seed=2)
    assert isinstance(b, BatchEnv) and b.observation_space.shape == a.observation_space.shape
    oa, ob = a.reset(), b.reset()                       # second reset: the draws stay in step
    np.testing.assert_allclose(b.positions(), a.positions(), atol=1e-12)
    np.testing.assert_allclose(ob.numpy(), oa.numpy(), atol=1e-5)   # sensors and every lidar (layout, order)


@needs_worker
def test_car_follows_safety_gymnasium_for_500_steps():
    a, b = pair("car_circle_hazard", seed=1)
    a.reset(), b.reset()
    costs = 0.0
    for act in random_actions(500, 4, seed=1):
        sa, sb = a.step(act), b.step(act)
        np.testing.assert_allclose(b.positions(), a.positions(), atol=1e-4)
        np.testing.assert_allclose(sb.obs.numpy(), sa.obs.numpy(), atol=1e-2)
        np.testing.assert_allclose(sb.reward.numpy(), sa.reward.numpy(), atol=1e-5)
        assert torch.equal(sb.cost, sa.cost)
        costs += float(sa.cost.sum())
    assert costs > 50                                   # the run does cross walls and hazards


@needs_worker
@pytest.mark.parametrize("name", ["point_circle", "point_button"])
def test_point_follows_safety_gymnasium_exactly_for_10_steps(name):
    a, b = pair(name, seed=3)
    a.reset(), b.reset()
    for act in random_actions(10, 4, seed=3):
        sa, sb = a.step(act), b.step(act)
        np.testing.assert_allclose(sb.obs.numpy(), sa.obs.numpy(), atol=5e-3)
        np.testing.assert_allclose(sb.reward.numpy(), sa.reward.numpy(), atol=1e-5)
        assert torch.equal(sb.cost, sa.cost)
    np.testing.assert_allclose(b.positions(), a.positions(), atol=1e-6)


@needs_worker
def test_point_circle_stays_with_safety_gymnasium_for_500_steps():
    a, b = pair("point_circle", seed=0, params={"radius": 1.0, "wall_factor": 0.55})   # narrow walls: costs
    a.reset(), b.reset()
    mismatches, costs, steps = 0, 0.0, 500
    for act in random_actions(steps, 4, seed=0):
        sa, sb = a.step(act), b.step(act)
        np.testing.assert_allclose(b.positions(), a.positions(), atol=0.1)
        np.testing.assert_allclose(sb.obs[:, POINT_STEADY].numpy(), sa.obs[:, POINT_STEADY].numpy(), atol=0.1)
        np.testing.assert_allclose(sb.obs[:, 12:].numpy(), sa.obs[:, 12:].numpy(), atol=0.5)   # circle lidar
        np.testing.assert_allclose(sb.reward.numpy(), sa.reward.numpy(), atol=1e-2)
        mismatches += int((sb.cost != sa.cost).sum())
        costs += float(sa.cost.sum())
    assert costs > 20 and mismatches <= 0.02 * steps * 4


@needs_worker
def test_point_button_rules_follow_safety_gymnasium():
    """Hand-built approaches: copies 0 and 3 press their goal, copy 1 a wrong button, copy 2 drives
    into a hazard; presses, mute timer, costs and rewards agree step by step."""
    buttons, hazards = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.2, 1.2]], [[0.0, -1.0]]
    a, b = pair("point_button", params={"buttons": buttons, "hazards": hazards})
    xy, heading, goal = [[0.5, 0.0], [-0.5, 0.0], [0.0, -0.5], [0.0, 0.5]], np.array([0, math.pi, -math.pi / 2, math.pi / 2]), [0, 0, 0, 2]
    np.testing.assert_allclose(b.set_pose(xy, heading, goal=goal).numpy(), a.set_pose(xy, heading, goal=goal).numpy(),
                               atol=1e-6)
    presses, costs = np.zeros(4), np.zeros(4)
    steady = np.r_[POINT_STEADY, 12:12 + LIDAR_BINS, 12 + 2 * LIDAR_BINS:12 + 3 * LIDAR_BINS]   # + buttons, hazards lidar
    for t in range(40):
        act = torch.tensor([[1.0, 0.0]] * 4 if t < 20 else [[0.0, 0.0]] * 4)
        sa, sb = a.step(act), b.step(act)
        np.testing.assert_allclose(sb.reward.numpy(), sa.reward.numpy(), atol=5e-3)
        assert torch.equal(sb.cost, sa.cost), t
        np.testing.assert_allclose(sb.obs[:, steady].numpy(), sa.obs[:, steady].numpy(), atol=0.05)
        presses += sb.reward.numpy() > 0.5
        costs += sb.cost[:, 0].numpy()
        # Safety-Gymnasium draws the next goal itself: let the native env follow its choice
        a.goal[:] = b.goal
        a.last_goal_dist = np.linalg.norm(a.positions() - a.layout.buttons[a.goal], axis=1)
    assert presses[0] >= 1 and presses[3] >= 1 and presses[1] == presses[2] == 0
    assert costs[1] >= 1 and costs[2] >= 1 and costs[0] == costs[3] == 0


@needs_worker
@pytest.mark.parametrize("name", ["sg_car_circle_hazard", "sg_point_button"])
def test_sg_env_is_reproducible_and_independent_of_workers_transport_and_reuse(name):
    dist = get_distribution(name, sim_threads=1)
    task = dist.sample(1, seed=0)[0]
    actions = random_actions(15, 4, seed=2)

    def run(seed, **options):
        env = get_distribution(name, **options).make_env(task, 4, seed=seed)
        out = [env.reset()] + [env.step(act).obs for act in actions]
        env.close()
        return torch.stack(out)

    sg_navigation.close_idle_workers()                   # the first run builds new worlds, the next reuse them
    first = run(5, sim_threads=1)
    assert torch.equal(first, run(5, sim_threads=1))
    assert torch.equal(first, run(5, sim_threads=2))
    assert torch.equal(first, run(5, sim_threads=1, transport="pipe"))
    assert not torch.equal(first, run(6, sim_threads=1))


@needs_worker
def test_dead_or_silent_worker_is_a_clear_error(monkeypatch):
    _, env = pair("point_circle", n=2)
    env.reset()
    env._parts[0].worker.proc.kill()
    with pytest.raises(BatchEnvError, match="worker .* exited with status -9 during step"):
        env.step(torch.zeros(2, 2))
    env.close()
    _, env = pair("point_circle", n=2)
    env.reset()
    monkeypatch.setattr(sg_navigation, "STEP_SECONDS", (0.5, 0.0))
    worker = env._parts[0].worker
    os.kill(worker.proc.pid, signal.SIGSTOP)            # alive but silent
    with pytest.raises(BatchEnvError, match="did not answer step .* within 0.5 s and was killed"):
        env.step(torch.zeros(2, 2))
    assert not worker.alive()
    env.close()


def test_missing_worker_environment_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEMETA_SG_ENV", str(tmp_path / "nowhere"))
    dist = get_distribution("sg_car_circle_hazard")
    task = dist.sample(1, seed=0)[0]                    # sampling needs no worker
    with pytest.raises(BatchEnvError, match="sg_car_circle_hazard needs the Safety-Gymnasium worker .* sg-setup"):
        dist.make_env(task, 2, seed=0)


def test_sg_setup_rejects_a_wrong_interpreter(tmp_path, capsys):
    from safemeta.cli import main

    for python, message in [(str(tmp_path / "python3.10"), "cannot run it"), (sys.executable, "is Python 3.1")]:
        assert main(["sg-setup", "--python", python, "--prefix", str(tmp_path / "env")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("safemeta sg-setup: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "env").exists()


def test_meta_train_without_the_worker_environment_fails_in_one_line(monkeypatch, tmp_path, capsys):
    import json

    from safemeta.cli import main

    monkeypatch.setenv("SAFEMETA_SG_ENV", str(tmp_path / "nowhere"))
    config = json.dumps({"scenarios": {"sg": {"distribution": "sg_point_circle", "task_options": {"horizon": 5},
                                              "n_train_tasks": 2, "n_test_tasks": 1, "rollouts": 2,
                                              "adaptation": {"dual_pgd": {"lam_c": 0.5}}}},
                         "methods": {"safemeta": {"meta_gradient": "first_order"}},
                         "metatrain": {"iterations": 1, "tasks_per_iteration": 1}})
    base = ["--config", config, "--scenario", "sg", "--seed", "0"]
    assert main(["tasks", *base, "--out", str(tmp_path / "tasks.json")]) == 0      # sampling needs no worker
    capsys.readouterr()
    assert main(["meta-train", *base, "--method", "safemeta", "--tasks", str(tmp_path / "tasks.json"),
                 "--out-dir", str(tmp_path / "mt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("safemeta meta-train: error: scenario sg_point_circle needs") and "sg-setup" in err[-1]


def test_sg_options_and_params_are_checked_before_any_worker(monkeypatch, tmp_path):
    from safemeta.tasks import TaskParamError

    monkeypatch.setenv("SAFEMETA_SG_ENV", str(tmp_path / "nowhere"))
    with pytest.raises(TaskParamError, match="sg_point_button: option 'transport'"):
        get_distribution("sg_point_button", transport="udp")
    dist = get_distribution("sg_point_circle")
    task = dist.sample(1, seed=0)[0]
    with pytest.raises(TaskParamError, match="sg_point_circle.*radius"):
        dist.make_env(Task(dist.name, {**task.params, "radius": float("nan")}), 1, seed=0)
