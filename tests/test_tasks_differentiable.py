"""Differentiable torch tasks: definitions, autograd against finite differences, termination, devices."""
import math

import pytest
import torch

from safemeta.tasks import Task, TaskParamError, get_distribution
from safemeta.tasks.differentiable import function_f


def make(name, params=None, n=3, seed=0, **options):
    dist = get_distribution(name, dtype="float64", **options)
    full = {**dist.sample(1, seed=0)[0].params, **(params or {})}
    return dist.make_env(Task(name, full), n, seed=seed)


def total(name, actions):
    """Sum of rewards and costs of an action sequence [T, N, act_dim] from a freshly seeded env."""
    env = make(name, n=actions.shape[1])
    out = 0.0
    for a in actions:
        r = env.step(a)
        out = out + r.cost.sum() + r.reward.sum()
    return out


def test_function_env_matches_cgpo_definition():
    env = make("function_env", {"shift": 0.4}, n=2)
    x0 = env.reset()[:, 0].clone()
    a = torch.tensor([[0.5], [-2.0]], dtype=torch.float64)        # the second is clipped to -1
    out = env.step(a)
    expected = (x0 - 0.4) ** 2 / 100 + 0.1 + 0.1 * torch.sin(8 * (x0 - 0.4) / math.pi)
    torch.testing.assert_close(out.cost[:, 0], expected)
    torch.testing.assert_close(out.reward, expected)
    torch.testing.assert_close(out.obs[:, 0], x0 + 0.2 * torch.tensor([0.5, -1.0], dtype=torch.float64))
    assert env.horizon == 100 and env.cost_limits.tolist() == [8.0]


@pytest.mark.parametrize("name", ["function_env", "cartpole_pos", "point_circle_diff"])
def test_autograd_matches_finite_differences(name):
    act_dim = make(name).action_space.shape[0]
    scale = 2.0 if name == "cartpole_pos" else 0.5
    actions = (scale * (torch.rand(12, 2, act_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5))
    actions.requires_grad_(True)
    (grad,) = torch.autograd.grad(total(name, actions), actions)
    assert grad.abs().max() > 0
    eps = 1e-6
    flat = actions.detach().reshape(-1)
    for k in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))[:8]:
        up, down = flat.clone(), flat.clone()
        up[k] += eps
        down[k] -= eps
        with torch.no_grad():
            fd = (total(name, up.view_as(actions)) - total(name, down.view_as(actions))) / (2 * eps)
        assert grad.reshape(-1)[k].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_floor_variant_is_flat_between_integers():
    x = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    f = function_f(x, floor=True)
    quad = f - 0.1 - 0.1 * torch.sin(8 * x / math.pi)           # the (floor(x)/10)^2 part
    for k in range(-3, 3):
        inside = (x >= k) & (x < k + 1)
        assert torch.allclose(quad[inside], torch.full_like(quad[inside], (k / 10) ** 2))
    jumps = function_f(torch.tensor([1.0, 2.0], dtype=torch.float64), True) - function_f(
        torch.tensor([1.0 - 1e-9, 2.0 - 1e-9], dtype=torch.float64), True)
    assert (jumps > 0.005).all()
    xg = torch.tensor([0.3, 1.7, -2.2], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(function_f(xg, floor=True).sum(), xg)
    torch.testing.assert_close(g, 0.1 * 8 / math.pi * torch.cos(8 * xg.detach() / math.pi))  # only the sine term
    (g_smooth,) = torch.autograd.grad(function_f(xg, floor=False).sum(), xg)
    assert not torch.allclose(g, g_smooth)


def test_shift_moves_the_landscape_not_the_dynamics():
    a, b = make("function_env", {"shift": 0.0}), make("function_env", {"shift": 0.9})
    act = torch.full((3, 1), 0.7, dtype=torch.float64)
    ra, rb = a.step(act), b.step(act)
    assert torch.equal(ra.obs, rb.obs) and not torch.allclose(ra.cost, rb.cost)


def test_cartpole_cost_termination_and_freeze():
    env = make("cartpole_pos", {"pole_mass": 0.1, "pole_half_length": 0.5}, n=2)
    env.reset()
    env.state = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.19, 0.0, 2.0]], dtype=torch.float64)
    out = env.step(torch.zeros(2, 1, dtype=torch.float64))
    assert out.reward.tolist() == [1.0, 1.0]
    assert out.cost[0, 0].item() == pytest.approx(-0.25)
    assert out.terminated.tolist() == [False, True]                 # pole passed 0.2 rad
    frozen = out.obs[1].clone()
    later = env.step(torch.ones(2, 1, dtype=torch.float64))
    assert later.reward[1] == 0 and later.cost[1, 0] == 0 and torch.equal(later.obs[1], frozen)
    assert env.horizon == 300 and env.cost_limits.tolist() == [-50.0]


def test_cartpole_pole_parameters_change_dynamics():
    light, heavy = make("cartpole_pos", {"pole_mass": 0.05}), make("cartpole_pos", {"pole_mass": 0.15})
    push = torch.full((3, 1), 3.0, dtype=torch.float64)
    for _ in range(5):
        a, b = light.step(push), heavy.step(push)
    assert not torch.allclose(a.obs, b.obs)


def test_point_circle_diff_reward_and_soft_wall():
    env = make("point_circle_diff", {"radius": 1.0, "wall_factor": 0.6}, n=3)
    env.reset()
    env.state = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, -1.0], [0.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    out = env.step(torch.zeros(3, 2, dtype=torch.float64))
    assert out.reward[0] > 0.05 and out.reward[1] < -0.05 and out.reward[2] > 0.05
    assert out.cost[0, 0] > 0.99 and out.cost[1, 0] > 0.99 and out.cost[2, 0] < 1e-3


def test_detach_cuts_the_graph():
    env = make("function_env")
    a = torch.full((3, 1), 0.3, dtype=torch.float64, requires_grad=True)
    env.step(a)
    env.detach()
    out = env.step(torch.zeros(3, 1, dtype=torch.float64))
    assert not out.cost.requires_grad


def test_bad_differentiable_params():
    with pytest.raises(TaskParamError, match="cartpole_pos.*pole_mass"):
        make("cartpole_pos", {"pole_mass": -0.1})
    with pytest.raises(TaskParamError, match="point_circle_diff.*radius"):
        make("point_circle_diff", {"radius": -1.0})
    with pytest.raises(TaskParamError, match="dtype"):
        get_distribution("function_env", dtype="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["function_env", "cartpole_pos", "point_circle_diff"])
def test_cuda_matches_cpu(name):
    dist = get_distribution(name, dtype="float64")
    task = dist.sample(1, seed=0)[0]
    cpu, gpu = dist.make_env(task, 4, seed=2, device="cpu"), dist.make_env(task, 4, seed=2, device="cuda")
    torch.testing.assert_close(cpu.reset(), gpu.reset().cpu())
    a = torch.full((4, cpu.action_space.shape[0]), 0.5, dtype=torch.float64)
    for _ in range(10):
        x, y = cpu.step(a), gpu.step(a.cuda())
    torch.testing.assert_close(x.obs, y.obs.cpu())
    torch.testing.assert_close(x.cost, y.cost.cpu())
