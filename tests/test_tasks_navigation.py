"""Navigation scenarios: walls, hazards, buttons, circle reward and lidar on hand-built states; layouts; resets."""
import math
import time

import numpy as np
import pytest
import torch

from safemeta.tasks import Task, TaskParamError, get_distribution
from safemeta.tasks.navigation import pseudo_lidar


def env_for(name, params=None, n=2, seed=0, **options):
    dist = get_distribution(name, **options)
    full = {**dist.sample(1, seed=0)[0].params, **(params or {})}
    return dist.make_env(Task(name, full), n, seed=seed)


def still(env):
    return env.step(torch.zeros(env.num_envs, 2))


def test_point_outside_wall_costs_one_inside_zero():
    env = env_for("point_circle", {"radius": 1.2, "wall_factor": 0.6})
    wall = 0.72
    env.set_pose([[wall + 0.05, 0.3], [wall - 0.05, -0.3]], np.zeros(2))
    assert still(env).cost[:, 0].tolist() == [1.0, 0.0]
    env.set_pose([[-wall - 0.05, 0.0], [0.0, 1.4]], np.zeros(2))   # far along y is still inside the walls
    assert still(env).cost[:, 0].tolist() == [1.0, 0.0]


def test_car_in_hazard_costs_and_outside_does_not():
    hazards = [[0.2, 0.5], [-0.2, -0.6]]
    env = env_for("car_circle_hazard", {"radius": 0.9, "wall_factor": 0.7, "hazards": hazards})
    env.set_pose([[0.25, 0.55], [0.2, 0.0]], np.zeros(2))   # first overlaps hazard 0, second clear
    assert still(env).cost[:, 0].tolist() == [1.0, 0.0]
    env.set_pose([[-0.2, -0.6 + 0.1], [0.2, 0.5 + 0.2]], np.zeros(2))   # 0.1 inside, 0.2 outside the 0.15 radius
    assert still(env).cost[:, 0].tolist() == [1.0, 0.0]
    env.set_pose([[0.7, 0.0], [0.0, 0.0]], np.zeros(2))     # beyond the wall at 0.63
    assert still(env).cost[:, 0].tolist() == [1.0, 0.0]


def test_circle_reward_follows_its_formula():
    env = env_for("point_circle", {"radius": 1.0, "wall_factor": 0.7})
    env.set_pose([[0.5, 0.0], [0.5, 0.0]], np.array([0.0, math.pi]), velocity=[[0.0, 0.8], [0.0, -0.8]])
    out = still(env)
    x, y = env.sim.qpos[:, 0], env.sim.qpos[:, 1]
    vx, vy = env.sim.qvel[:, 0], env.sim.qvel[:, 1]
    rho = np.hypot(x, y)
    expected = 0.1 * ((-vx * y + vy * x) / rho) / (1 + np.abs(rho - 1.0))
    np.testing.assert_allclose(out.reward.numpy(), expected, rtol=1e-5)
    assert out.reward[0] > 0.02 and out.reward[1] < -0.02   # counter-clockwise is rewarded


def lidar(objects, pos, rot, max_dist):
    return pseudo_lidar([objects], pos, rot, max_dist)


def test_pseudo_lidar_bins_and_aliasing():
    pos, rot = np.array([[1.0, 1.0, 0.1]]), np.eye(3)[None]
    ahead = lidar(np.array([[2.0, 1.0]]), pos, rot, max_dist=4.0)        # 1 m along the robot's x axis
    assert ahead[0, 0] == pytest.approx(0.75) and ahead[0, 15] == pytest.approx(0.75) and ahead[0, 1] == 0
    turned = np.array([[[0, -1, 0], [1, 0, 0], [0, 0, 1]]], float)                # heading +90 deg: object on the right
    right = lidar(np.array([[2.0, 1.0]]), pos, turned, max_dist=4.0)
    assert right[0].argmax() in (11, 12) and right[0, 12] == pytest.approx(0.75) and right[0, :10].sum() == 0
    mid = lidar(np.array([[1.0 + math.cos(0.3), 1.0 + math.sin(0.3)]]), pos, rot, max_dist=2.0)
    frac = 0.3 / (2 * math.pi / 16)                                                # position inside bin 0
    assert mid[0, 0] == pytest.approx(0.5) and mid[0, 1] == pytest.approx(frac * 0.5)
    assert mid[0, 15] == pytest.approx((1 - frac) * 0.5)
    two = lidar(np.array([[2.0, 1.0], [1.5, 1.0]]), pos, rot, max_dist=4.0)  # the closer object wins the bin
    assert two[0, 0] == pytest.approx(0.875)
    assert not lidar(np.array([[9.0, 9.0]]), pos, rot, max_dist=3.0).any()
    groups = pseudo_lidar([np.array([[2.0, 1.0]]), np.zeros((0, 2)), np.array([[1.0, 2.0]])], pos, rot, 4.0)
    assert groups.shape == (1, 48) and not groups[0, 16:32].any()
    np.testing.assert_allclose(groups[0, :16], ahead[0])
    assert groups[0, 32 + 4] == pytest.approx(0.75)                                # 90 deg to the left: bin 4


def test_point_button_goal_wrong_button_and_hazard():
    buttons = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]
    hazards = [[0.0, -1.0]]
    env = env_for("point_button", {"buttons": buttons, "hazards": hazards}, n=4)
    # centres 0.19 apart: the robot's sphere presses button 0 (the goal) and button 1 (a wrong one), nose away
    env.set_pose([[1.19, 0.0], [-1.19, 0.0], [0.05, -1.0], [0.0, 0.0]], np.array([0.0, math.pi, 0.0, 0.0]), goal=0)
    out = still(env)
    assert env.touching().tolist() == [[True, False, False], [False, True, False], [False] * 3, [False] * 3]
    assert out.cost[:, 0].tolist() == [0.0, 1.0, 1.0, 0.0]       # goal press is free; wrong button, hazard cost
    assert out.reward[0] > 0.99 and env.mute.tolist() == [10, 0, 0, 0]
    assert abs(out.reward[3]) < 1e-3 and env.goal[1:].tolist() == [0, 0, 0]
    obs = out.obs.numpy()
    assert not obs[0, 12:28].any() and obs[1, 12:28].any()        # buttons lidar muted after a press
    env.set_pose([[-1.19, 0.0]] * 4, np.full(4, math.pi), goal=[2, 0, 0, 0])   # while muted a wrong button is free
    env.mute[:] = [5, 0, 0, 0]
    assert still(env).cost[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_point_button_new_goal_is_any_button():
    env = env_for("point_button", {"buttons": [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], "hazards": []}, n=64)
    env.set_pose([[1.19, 0.0]] * 64, np.zeros(64), goal=0)
    still(env)
    assert (env.mute == 10).all() and set(env.goal.tolist()) == {0, 1, 2}   # as SG: the pressed one too


def test_button_shaping_rewards_progress_to_goal():
    env = env_for("point_button", {"buttons": [[1.5, 0.0], [-1.5, 0.0]], "hazards": []}, n=1)
    env.goal[:] = 0
    env.set_pose([[0.0, 0.0]], np.zeros(1), velocity=[[0.5, 0.0]])
    d0 = env.last_goal_dist.copy()
    out = still(env)
    assert out.reward[0].item() == pytest.approx(float(d0[0] - env.last_goal_dist[0]), abs=1e-6)
    assert out.reward[0] > 0


def test_resets_start_safe_without_rebuilding_the_model():
    for name in ("point_circle", "car_circle_hazard", "point_button"):
        env = env_for(name, n=64, seed=3)
        model = env.model
        starts = []
        for _ in range(3):
            env.reset()
            starts.append(env.sim.qpos.copy())
            assert not still(env).cost.any()
        assert env.model is model
        assert not np.allclose(starts[0], starts[1])
        t0 = time.perf_counter()
        for _ in range(5):
            env.reset()
        assert (time.perf_counter() - t0) / 5 < 0.05     # generous; the benchmark reports the real figure


def test_layouts_do_not_overlap():
    for t in get_distribution("point_button").sample(20, seed=0):
        pts = np.array(t.params["buttons"] + t.params["hazards"])
        gaps = np.linalg.norm(pts[:, None] - pts[None], axis=2) + 9 * np.eye(len(pts))
        assert gaps.min() >= 0.4 - 1e-9
    for t in get_distribution("car_circle_hazard").sample(20, seed=0):
        pts = np.array(t.params["hazards"])
        gaps = np.linalg.norm(pts[:, None] - pts[None], axis=2) + 9 * np.eye(len(pts))
        assert gaps.min() >= 2 * t.params["hazard_size"] - 1e-9


def test_bad_navigation_params_give_clear_errors():
    dist = get_distribution("point_circle")
    good = dist.sample(1, seed=0)[0].params
    with pytest.raises(TaskParamError, match="point_circle.*radius"):
        dist.make_env(Task("point_circle", {**good, "radius": -1.0}), 1, seed=0)
    crowded = get_distribution("car_circle_hazard", n_hazards=40)
    t0 = time.perf_counter()
    with pytest.raises(TaskParamError, match="car_circle_hazard.*n_hazards"):
        crowded.sample(1, seed=0)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(TaskParamError, match="point_button.*n_buttons"):
        get_distribution("point_button", n_buttons=200).sample(1, seed=0)
    with pytest.raises(TaskParamError, match="n_hazards"):
        get_distribution("point_button", n_hazards=[5, 2])
    button = get_distribution("point_button")
    with pytest.raises(TaskParamError, match="point_button.*buttons"):
        button.validate(Task("point_button", {**button.sample(1, seed=0)[0].params, "buttons": [[9.0, 0.0]]}))


def test_robot_pose_matches_mujoco():
    for name in ("point_circle", "car_circle_hazard"):
        env = env_for(name, n=3, seed=1)
        pos, rot = env.robot.pose(env.sim.qpos)
        body = env.model.body("agent").id
        for i, d in enumerate(env.sim.datas):   # after reset, MjData holds mj_forward's kinematics
            np.testing.assert_allclose(rot[i], d.xmat[body].reshape(3, 3), atol=1e-9)
            np.testing.assert_allclose(pos[i], d.xpos[body], atol=1e-9)


def test_crowded_hand_built_layout_is_rejected():
    dist = get_distribution("point_button")
    params = {**dist.sample(1, seed=0)[0].params, "extent": 0.3, "buttons": [[0.2, 0.0], [-0.2, 0.0]], "hazards": []}
    with pytest.raises(TaskParamError, match="point_button.*no room"):
        dist.make_env(Task("point_button", params), 2, seed=0)


@pytest.mark.parametrize("name, action", [("point_circle", [1.0, 0.0]), ("car_circle_hazard", [1.0, 1.0])])
def test_robots_drive_along_their_drive_axis(name, action):
    env = env_for(name, {"hazards": []} if name == "car_circle_hazard" else {}, n=2)
    heading = np.array([math.pi / 2, -math.pi / 2])
    env.set_pose([[0.0, -0.5], [0.0, 0.5]], heading)
    _, rot = env.robot.pose(env.sim.qpos)
    np.testing.assert_allclose(rot[:, :2, 0], [[0, 1], [0, -1]], atol=1e-9)   # body x axis = heading
    drive = np.einsum("nij,j->ni", rot[:, :2, :2], env.robot.drive_axis)    # the drive axis in the world
    for _ in range(25):
        env.step(torch.tensor([action, action]))
    moved = env.positions() - [[0.0, -0.5], [0.0, 0.5]]
    along = (moved * drive).sum(axis=1)
    across = np.abs(moved[:, 0] * drive[:, 1] - moved[:, 1] * drive[:, 0])
    assert (along > 0.1).all() and (across < 0.2 * along).all()


@pytest.mark.parametrize("name, below, at_or_beyond", [
    ("point_circle", [0.03, 0.0], [[0.05, 0.0], [0.5, 0.0], [1.0, 0.0]]),
    ("car_circle_hazard", [0.01, 0.01], [[0.02, 0.02], [0.5, 0.5], [1.0, 1.0]]),
])
def test_actuators_saturate_as_safety_gymnasium(name, below, at_or_beyond):
    """Point push: 0.3 * clip(a0, +-0.05) N; car wheels: clip(a, +-0.02) N m."""
    env = env_for(name, {"hazards": []} if name == "car_circle_hazard" else {}, n=4)
    env.set_pose([[0.0, 0.0]] * 4, np.zeros(4))
    actions = torch.tensor([below] + at_or_beyond, dtype=torch.float64)
    for _ in range(20):
        env.step(actions)
    travel = np.linalg.norm(env.positions(), axis=1)
    assert travel[0] < 0.8 * travel[1]                                   # below the limit: less push
    np.testing.assert_allclose(travel[1:], travel[1], rtol=1e-9)        # at or beyond it: the same


@pytest.mark.parametrize("name", ["point_circle", "car_circle_hazard"])
def test_sensors_describe_the_stepped_state(name):
    """As Safety-Gymnasium: sensors are computed by mj_forward after the substeps, not inside the last one."""
    import mujoco

    env = env_for(name, n=2, seed=4)
    for _ in range(5):
        out = env.step(torch.tensor([[1.0, 0.7], [0.3, -1.0]]))
    for i, d in enumerate(env.sim.datas):
        fresh = mujoco.MjData(env.model)
        fresh.qpos[:], fresh.qvel[:], fresh.ctrl[:] = d.qpos, d.qvel, d.ctrl
        fresh.qacc_warmstart[:] = d.qacc_warmstart
        mujoco.mj_forward(env.model, fresh)
        np.testing.assert_allclose(env.sim.buffers["sensordata"][i], fresh.sensordata, atol=1e-9)
        np.testing.assert_allclose(out.obs[i, :env.robot.sensor_dim].numpy(), env.robot.sensors(fresh.sensordata[None])[0],
                                   rtol=1e-5, atol=1e-5)
