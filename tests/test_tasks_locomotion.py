"""Locomotion scenarios: rewards and costs against their definitions on hand-built states, task effects, batching."""
import math
from pathlib import Path

import gymnasium
import mujoco
import numpy as np
import pytest
import torch

from safemeta.tasks import Task, TaskParamError, get_distribution
from safemeta.tasks.locomotion import CHEETAH_HEAD_H0, gym_model
from safemeta.tasks.mujoco_batch import BatchSim


def env_for(name, params, n=4, seed=0, **options):
    dist = get_distribution(name, **options)
    full = {**dist.sample(1, seed=0)[0].params, **params}
    return dist.make_env(Task(name, full), n, seed=seed)


def rollout(env, actions):
    env.reset()
    return [env.step(torch.as_tensor(a)) for a in actions]


def random_actions(env, steps, seed=0):
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    return rng.uniform(1.5 * low, 1.5 * high, (steps, env.num_envs, low.shape[0])).astype(np.float32)


def test_batch_sim_matches_plain_mj_step():
    """The batched loop steps every copy exactly like mj_step on its own MjData, threads or not."""
    model = gym_model("half_cheetah.xml")
    rng = np.random.default_rng(0)
    qpos = model.qpos0 + rng.uniform(-0.1, 0.1, (3, model.nq))
    qvel = rng.normal(0, 0.1, (3, model.nv))
    ctrl = rng.uniform(-1, 1, (10, 3, model.nu))
    sims = [BatchSim(model, 3, 5, threads=t) for t in (1, 2)]
    for sim in sims:
        sim.set_state(range(3), qpos, qvel)
        for c in ctrl:
            sim.step(c)
    for i in range(3):
        d = mujoco.MjData(model)
        d.qpos[:], d.qvel[:] = qpos[i], qvel[i]
        mujoco.mj_forward(model, d)
        for c in ctrl:
            d.ctrl[:] = c[i]
            mujoco.mj_step(model, d, nstep=5)
        for sim in sims:
            np.testing.assert_array_equal(sim.qpos[i], d.qpos)
            np.testing.assert_array_equal(sim.qvel[i], d.qvel)


def test_cheetah_head_height_matches_mujoco():
    env = env_for("half_cheetah_vel", {})
    rng = np.random.default_rng(1)
    qpos = env.model.qpos0 + rng.uniform(-0.5, 0.5, (20, env.model.nq))
    d = mujoco.MjData(env.model)
    head = env.model.geom("head").id
    expected = []
    for q in qpos:
        d.qpos[:] = q
        mujoco.mj_kinematics(env.model, d)
        expected.append(d.geom_xpos[head, 2])
    np.testing.assert_allclose(env.head_height(qpos), expected, atol=1e-12)


def test_cheetah_head_cost_on_hand_built_states():
    env = env_for("half_cheetah_vel", {}, n=2)
    qpos = np.tile(env.model.qpos0, (2, 1))
    qpos[0, 1] = 0.5    # torso lifted: head well above h0
    qpos[1, 1] = -0.3   # crouched: head below h0
    env.sim.set_state(range(2), qpos, np.zeros((2, env.model.nv)))
    out = env.step(torch.zeros(2, 6))
    d = mujoco.MjData(env.model)
    for i in range(2):
        d.qpos[:] = env.sim.qpos[i]
        mujoco.mj_kinematics(env.model, d)
        head_z = d.geom_xpos[env.model.geom("head").id, 2]
        assert out.cost[i, 0].item() == pytest.approx(max(0.0, head_z - CHEETAH_HEAD_H0), abs=1e-6)
    assert out.cost[0, 0] > 0.2 and out.cost[1, 0] == 0


def test_goal_velocity_changes_reward_not_dynamics():
    actions = random_actions(env_for("half_cheetah_vel", {}), 5)
    slow, fast = env_for("half_cheetah_vel", {"goal_velocity": 0.3}), env_for("half_cheetah_vel", {"goal_velocity": 1.7})
    for a, b in zip(rollout(slow, actions), rollout(fast, actions)):
        assert torch.equal(a.obs, b.obs) and torch.equal(a.cost, b.cost)
        assert not torch.equal(a.reward, b.reward)


def test_cheetah_at_goal_velocity_has_zero_reward():
    actions = random_actions(env_for("half_cheetah_vel", {}), 1)
    probe = env_for("half_cheetah_vel", {"goal_velocity": 0.0})
    x0 = probe.sim.qpos[:, 0].copy()   # state after the reset done by make_env
    reward = probe.step(torch.as_tensor(actions[0])).reward.numpy()
    measured = (probe.sim.qpos[:, 0] - x0) / 0.05   # displacement of rootx over dt = 5 x 0.01 s
    np.testing.assert_allclose(reward, -np.abs(measured), atol=1e-5)
    for i in range(probe.num_envs):
        at_goal = env_for("half_cheetah_vel", {"goal_velocity": float(measured[i])})
        assert at_goal.step(torch.as_tensor(actions[0])).reward[i].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name, weight, bound", [("hopper_vel", 1.0, 1.0), ("humanoid_dir", 1.0, 0.4)])
def test_control_cost_is_sum_of_squared_clipped_actions(name, weight, bound):
    env = env_for(name, {})
    actions = random_actions(env, 3)
    for a, out in zip(actions, rollout(env, actions)):
        expected = weight * np.sum(np.clip(a, -bound, bound).astype(np.float64) ** 2, axis=1)
        np.testing.assert_allclose(out.cost[:, 0].numpy(), expected, rtol=1e-6)


def test_swimmer_cost_weight_scales_cost_only():
    light, heavy = env_for("swimmer_vel", {"cost_weight": 0.5}), env_for("swimmer_vel", {"cost_weight": 1.0})
    actions = random_actions(light, 3)
    for a, x, y in zip(actions, rollout(light, actions), rollout(heavy, actions)):
        expected = np.sum(np.clip(a, -1, 1).astype(np.float64) ** 2, axis=1)
        np.testing.assert_allclose(x.cost[:, 0].numpy(), 0.5 * expected, rtol=1e-6)
        np.testing.assert_allclose(y.cost[:, 0].numpy(), expected, rtol=1e-6)
        assert torch.equal(x.obs, y.obs) and torch.equal(x.reward, y.reward)


def test_swimmer_noise_changes_dynamics():
    quiet = env_for("swimmer_vel", {"noise_var": 0.0})
    quiet2 = env_for("swimmer_vel", {"noise_var": 0.0}, seed=0)
    noisy = env_for("swimmer_vel", {"noise_var": 0.3})
    actions = random_actions(quiet, 4)
    a, b, c = rollout(quiet, actions), rollout(quiet2, actions), rollout(noisy, actions)
    assert torch.equal(a[-1].obs, b[-1].obs)
    assert not torch.allclose(a[-1].obs, c[-1].obs, atol=1e-3)
    # the noise is zero-mean with the task's variance: joint-velocity kicks between steps
    big = env_for("swimmer_vel", {"noise_var": 0.3}, n=200)
    big.reset()
    before = big.sim.qvel.copy()
    big.sim.step(np.zeros((200, 2)))
    physics = big.sim.qvel.copy()
    big._after_physics(np.ones(200, bool))
    kicks = big.sim.qvel - physics
    assert abs(kicks.mean()) < 0.05 and kicks.var() == pytest.approx(0.3, rel=0.1)
    assert not np.allclose(before, physics)


def test_humanoid_reward_is_velocity_along_direction_and_direction_leaves_dynamics():
    actions = random_actions(env_for("humanoid_dir", {}), 3)
    outs = {th: rollout(env_for("humanoid_dir", {"direction": th}), actions) for th in (0.0, math.pi / 4, math.pi / 2)}
    for x, diag, y in zip(outs[0.0], outs[math.pi / 4], outs[math.pi / 2]):
        assert torch.equal(x.obs, y.obs) and torch.equal(x.obs, diag.obs)
        np.testing.assert_allclose(diag.reward.numpy(), (x.reward + y.reward).numpy() / math.sqrt(2), atol=1e-5)
        assert not torch.allclose(x.reward, y.reward)


def test_humanoid_reward_is_centre_of_mass_velocity():
    import mujoco

    env = env_for("humanoid_dir", {"direction": 0.0}, n=3)
    actions = random_actions(env, 1)[0]
    copies = [env.sim.data(i) for i in range(env.num_envs)]             # each copy as an MjData of its own
    before = np.array([d.subtree_com[0, :2] for d in copies])           # MuJoCo's whole-model centre of mass
    out = env.step(torch.as_tensor(actions))
    for d, a in zip(copies, actions):                                   # the same env step, by hand
        d.ctrl[:] = np.clip(a.astype(np.float64), *env.model.actuator_ctrlrange.T)
        mujoco.mj_step(env.model, d, nstep=env.sim.frame_skip)
    after = np.array([d.subtree_com[0, :2] for d in copies])
    velocity = (after - before) / env.sim.dt
    np.testing.assert_allclose(out.reward.numpy(), velocity[:, 0], rtol=1e-4, atol=1e-6)


def test_humanoid_terminates_when_fallen_and_stays_frozen():
    env = env_for("humanoid_dir", {}, n=2)
    qpos = np.tile(env.model.qpos0, (2, 1))
    qpos[1, 2] = 0.6   # torso near the floor: unhealthy
    env.sim.set_state(range(2), qpos, np.zeros((2, env.model.nv)))
    first = env.step(torch.zeros(2, 17))
    assert first.terminated.tolist() == [False, True]
    frozen = env.sim.qpos[1].copy()
    second = env.step(torch.full((2, 17), 0.4))
    assert second.terminated.tolist() == [False, True]
    assert second.reward[1] == 0 and second.cost[1, 0] == 0 and second.cost[0, 0] > 0
    assert torch.equal(second.obs[1], first.obs[1])
    np.testing.assert_array_equal(env.sim.qpos[1], frozen)
    assert not env.reset().isnan().any() and not env.step(torch.zeros(2, 17)).terminated.any()


def test_hopper_never_terminates_and_obs_velocity_clipped():
    env = env_for("hopper_vel", {}, n=2)
    qvel = np.zeros((2, env.model.nv))
    qvel[:, 2] = 50.0
    qpos = np.tile(env.model.qpos0, (2, 1))
    qpos[:, 1] = 0.3   # fallen below gymnasium's healthy height
    obs = env.set_state(qpos, qvel)
    assert obs[:, 5 + 2].tolist() == [10.0, 10.0]
    assert not env.step(torch.zeros(2, 3)).terminated.any()


def test_invalid_locomotion_params_are_named():
    dist = get_distribution("swimmer_vel")
    good = dist.sample(1, seed=0)[0].params
    with pytest.raises(TaskParamError, match="swimmer_vel.*noise_var"):
        dist.validate(Task("swimmer_vel", {**good, "noise_var": -0.1}))
    with pytest.raises(TaskParamError, match="swimmer_vel.*cost_weight"):
        dist.validate(Task("swimmer_vel", {k: v for k, v in good.items() if k != "cost_weight"}))
    with pytest.raises(ValueError, match="shape"):
        env_for("hopper_vel", {}, n=2).step(torch.zeros(3, 3))


def test_cheetah_model_equals_gymnasium_file(tmp_path, monkeypatch):
    """Applying settotalmass after compiling (no deprecation log) gives the model the XML file defines."""
    monkeypatch.chdir(tmp_path)
    ours = gym_model.__wrapped__("half_cheetah.xml")   # a fresh load, not the cached model
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    ref = mujoco.MjModel.from_xml_path(str(Path(gymnasium.__file__).parent / "envs/mujoco/assets/half_cheetah.xml"))
    for field in ("body_mass", "body_inertia", "dof_invweight0", "actuator_acc0"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(ref, field))
    assert ours.body_mass.sum() == pytest.approx(14.0)
