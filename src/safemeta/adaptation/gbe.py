"""Gradient-based estimation (GBE) of J_R, J_C and their gradients through differentiable
dynamics (Dai et al. 2024, "CGPO": Sec. 4.1, 5.3, App. A.4-A.5), shared by the CGPO,
MB-CGPO and SHAC-Lag operators.

One call of `estimate` rolls the policy out on N copies of a task for the whole horizon T,
with actions sampled by reparameterisation (a = mu(s) + std * eps, eps fixed in the graph), and
back-propagates through the dynamics (`env.step` is torch operations; `env.detach()` cuts the
graph) in SHAC-style windows of h steps (eqs. 19-20):

    L_R = 1/N sum_i [ sum_{t=t0}^{t0+h-1} r(s_t, a_t) + V^R(s_{t0+h}, t0+h) ],   likewise L_C,

no discount, the window's start state detached. g and q are the SUMS over the windows of
dL_R/dtheta and dL_C/dtheta (the paper does not say how windows combine; summed, the truncated
gradients add up to the total derivative of the episode's return, sum_t dJ/da_t da_t/dtheta,
so that q.delta predicts the change of J_C on the scale of c = J_C - b, which eq. (7) needs;
a mean would shrink q by T/h). With h >= T it is plain BPTT (eqs. 79-80) and needs no critic.
J_R and J_C are the mean episode return and cost of the same rollout (eqs. 6-7 at theta_k).

Critics (App. A.5): V(s, t), finite-horizon and undiscounted (eq. 65), one network for reward
and one for cost, parameterised as V(s, t) = (T - t) * net(standardised s, t/T) (ours: exactly 0
at the horizon, outputs of the order of one step's reward), fitted after each step to the
TD(lambda) targets of eq. (67) inside each window, G_t = r_t + (1-lambda) V(s_{t+1}) +
lambda G_{t+1} with G at the window's end = V(s_{t0+h}) (zero after termination), by Adam on
the MSE of eq. (68) over random minibatches. Targets use the critics before the fit (the paper
names no target network).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..optim import flat_grad


@dataclass(frozen=True)
class CriticSettings:
    hidden: tuple[int, ...]   # hidden layers of each critic (tanh)
    lr: float                 # Adam learning rate (Table 4: 1e-3)
    batch: int                # minibatch size (Table 4: 64)
    updates: int              # Adam steps per fit
    td_lambda: float          # lambda of eq. (67)


class TimeCritic(torch.nn.Module):
    """V(s, t) = (T - t) * net([(s - mean)/std, t/T]) (eq. 65 with V(., T) = 0)."""

    def __init__(self, obs_dim: int, horizon: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        sizes = [obs_dim + 1, *hidden, 1]
        layers: list[torch.nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
        self.net = torch.nn.Sequential(*layers)
        self.horizon = int(horizon)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def forward(self, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        frac = (t.to(obs.dtype) / self.horizon).reshape(*obs.shape[:-1], 1)
        x = torch.cat([(obs - self.obs_mean) / self.obs_std, frac], dim=-1)
        return (self.horizon - t.to(obs.dtype)) * self.net(x).squeeze(-1)


class Critics:
    """V^R and V^C of one adaptation sequence, with their optimisers (App. A.5)."""

    def __init__(self, obs_dim: int, horizon: int, settings: CriticSettings, seed: int, device: Any,
                 dtype: torch.dtype) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.reward = TimeCritic(obs_dim, horizon, tuple(settings.hidden)).to(device, dtype)
            self.cost = TimeCritic(obs_dim, horizon, tuple(settings.hidden)).to(device, dtype)
        self.settings, self.horizon = settings, int(horizon)
        params = [*self.reward.net.parameters(), *self.cost.net.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=settings.lr)
        self.count = 0   # observations in the running standardisation

    def values(self, obs: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        time = torch.full(obs.shape[:-1], t, device=obs.device)
        return self.reward(obs, time), self.cost(obs, time)

    def fit(self, windows: list["Window"], generator: torch.Generator) -> float:
        """TD(lambda) targets of every window (eq. 67), then `updates` Adam steps on eq. (68);
        returns the mean loss of the last step."""
        with torch.no_grad():
            obs, times, targets_r, targets_c = [], [], [], []
            for w in windows:
                tr, tc = self._targets(w)
                alive = w.alive
                obs.append(w.obs[:-1][alive])
                times.append((w.t0 + torch.arange(w.length, device=alive.device))[:, None].expand_as(alive)[alive])
                targets_r.append(tr[alive])
                targets_c.append(tc[alive])
            obs, times = torch.cat(obs), torch.cat(times)
            targets_r, targets_c = torch.cat(targets_r), torch.cat(targets_c)
            self._update_standardisation(obs)
        loss = torch.tensor(float("nan"))
        n = obs.shape[0]
        for _ in range(self.settings.updates):
            idx = torch.randint(n, (min(self.settings.batch, n),), generator=generator).to(obs.device)
            loss = ((self.reward(obs[idx], times[idx]) - targets_r[idx]) ** 2).mean() + \
                   ((self.cost(obs[idx], times[idx]) - targets_c[idx]) ** 2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    def _targets(self, w: "Window") -> tuple[torch.Tensor, torch.Tensor]:
        """G^lambda_t of eq. (67) by its backward recursion, for reward and cost, [h, N]."""
        lam = self.settings.td_lambda
        out = []
        for critic, signal in ((self.reward, w.reward), (self.cost, w.cost)):
            times = (w.t0 + torch.arange(w.length + 1, device=w.obs.device))[:, None].expand(w.length + 1, w.obs.shape[1])
            value = critic(w.obs, times) * w.alive_after.to(w.obs.dtype)     # [h+1, N]: V(s_{t+1}), 0 once terminated
            running = value[-1]
            targets = torch.empty_like(signal)
            for k in range(w.length - 1, -1, -1):
                running = signal[k] + (1 - lam) * value[k + 1] + lam * running
                running = torch.where(w.alive_after[k + 1], running, signal[k])
                targets[k] = running
            out.append(targets)
        return out[0], out[1]

    def _update_standardisation(self, obs: torch.Tensor) -> None:
        """Running mean and variance of the observations the critics see (all data so far)."""
        n_new = obs.shape[0]
        mean_new, var_new = obs.mean(0), obs.var(0, unbiased=False)
        total = self.count + n_new
        for critic in (self.reward, self.cost):
            mean_old, var_old = critic.obs_mean.clone(), critic.obs_std ** 2
            if self.count == 0:
                mean, var = mean_new, var_new
            else:
                delta = mean_new - mean_old
                mean = mean_old + delta * n_new / total
                var = (var_old * self.count + var_new * n_new + delta ** 2 * self.count * n_new / total) / total
            critic.obs_mean.copy_(mean)
            critic.obs_std.copy_(var.clamp_min(1e-8).sqrt())
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"reward": self.reward.state_dict(), "cost": self.cost.state_dict(),
                "optimizer": self.optimizer.state_dict(), "count": self.count}


@dataclass
class Window:
    """One window's data for the critics (detached): obs [h+1, N, d] from s_{t0} to s_{t0+h},
    reward and cost [h, N], alive [h, N] (step k taken before termination), alive_after
    [h+1, N] (s_{t0+k} reached without terminating)."""

    t0: int
    obs: torch.Tensor
    reward: torch.Tensor
    cost: torch.Tensor
    alive: torch.Tensor
    alive_after: torch.Tensor

    @property
    def length(self) -> int:
        return self.reward.shape[0]


@dataclass
class Estimate:
    """What one GBE rollout gives at theta_k."""

    reward: float              # J_R: mean undiscounted episode return
    cost: float                # J_C: mean undiscounted episode cost
    reward_se: float           # standard errors over the N episodes
    cost_se: float
    g: torch.Tensor            # flat sum over windows of dL_R/dtheta (eq. 19)
    q: torch.Tensor            # flat sum over windows of dL_C/dtheta (eq. 20)
    env_steps: int             # steps taken before termination, over all copies
    windows: list[Window]      # the critics' data
    states: torch.Tensor       # every visited observation (detached), for the step's KL


def estimate(env: Any, policy: Any, critics: Critics | None, window: int, generator: torch.Generator) -> Estimate:
    """One reparameterised rollout of `policy` on `env` (reset here) with windowed
    back-propagation (module doc).

    `critics` may be None only when `window` >= the horizon (plain BPTT). Noise eps is drawn
    from `generator` (CPU) step by step.
    """
    horizon = int(env.horizon)
    if critics is None and window < horizon:
        raise ValueError("windows shorter than the horizon need critics")
    params = list(policy.parameters())
    obs = env.reset()
    n = obs.shape[0]
    act_dim = policy.config["act_dim"]
    alive = torch.ones(n, dtype=torch.bool, device=obs.device)
    total_r = torch.zeros(n, dtype=torch.float64, device=obs.device)
    total_c = torch.zeros(n, dtype=torch.float64, device=obs.device)
    g = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    q = torch.zeros_like(g)
    windows: list[Window] = []
    states = []
    env_steps = 0
    t = 0
    while t < horizon and bool(alive.any()):
        env.detach()
        obs = obs.detach()
        t0, rows = t, {"obs": [obs], "reward": [], "cost": [], "alive": [], "alive_after": [alive.clone()]}
        sum_r = torch.zeros(n, dtype=obs.dtype, device=obs.device)
        sum_c = torch.zeros_like(sum_r)
        while t < min(t0 + window, horizon) and bool(alive.any()):
            noise = torch.randn((n, act_dim), generator=generator, dtype=torch.float64)
            step = env.step(policy.rsample(obs, noise))
            reward, cost = step.reward.to(obs.dtype), step.cost[:, 0].to(obs.dtype)
            sum_r, sum_c = sum_r + reward, sum_c + cost
            rows["alive"].append(alive.clone())
            env_steps += int(alive.sum())
            alive = alive & ~step.terminated
            obs = step.obs
            rows["obs"].append(obs.detach())
            rows["reward"].append(reward.detach())
            rows["cost"].append(cost.detach())
            rows["alive_after"].append(alive.clone())
            t += 1
        total_r += sum_r.detach().double()
        total_c += sum_c.detach().double()
        loss_r, loss_c = sum_r, sum_c
        if critics is not None and t < horizon:   # V(s_T, T) = 0: no bootstrap at the horizon
            v_r, v_c = critics.values(obs, t)
            loss_r, loss_c = sum_r + v_r * alive, sum_c + v_c * alive
        if loss_r.requires_grad:     # two backward passes through the window's one graph
            g += flat_grad(loss_r.mean(), params, retain_graph=loss_c.requires_grad)
        if loss_c.requires_grad:
            q += flat_grad(loss_c.mean(), params)
        stacked = {k: torch.stack(v) for k, v in rows.items()}
        windows.append(Window(t0, **stacked))
        states.append(stacked["obs"][:-1][stacked["alive"]])
    return Estimate(float(total_r.mean()), float(total_c.mean()), _se(total_r), _se(total_c), g, q, env_steps,
                    windows, torch.cat(states))


def _se(per_episode: torch.Tensor) -> float:
    n = per_episode.shape[0]
    return float(per_episode.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
