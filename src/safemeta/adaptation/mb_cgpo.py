"""MB-CGPO: CGPO with gradients from a learned world model (Dai et al. 2024, App. F.4, Alg. 3),
for tasks whose dynamics give no (useful) gradients.

One step from theta_k, as Alg. 3:
1. sample N = `rollouts` real episodes of pi_theta_k (`observe`; plain sampling, no gradients):
   they give J_R(theta_k), J_C(theta_k), hence c_k, and the reported reward and cost;
2. add their transitions to the replay buffer D and fit the world model
   F_phi(s, a) = (s' - s, r, c) by Adam on the MSE of eq. (85) (each output standardised by the
   buffer's statistics; ours, so that state, reward and cost errors weigh alike);
3. roll pi_theta_k out inside the model from the real episodes' initial observations (D_M) and
   compute g, q by GBE through the model (eqs. 19-20 with F_phi as the simulator, `gbe.py`);
4. the CGPO update: the radius of eq. (18) from real returns, the three-case step (`cgpo.py`);
5. fit the critics on the model rollout's windows (Alg. 3 does not say on which data: D_M, the
   data the gradients came from).
The model is a two-hidden-layer tanh MLP (Sec. 7 says "a two-layer MLP"), acting on observations,
actions clipped to the task's action box as the real task does; it models no termination, so
model rollouts run the whole horizon (the tasks MB-CGPO is meant for here never terminate).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..records import Var
from ..rollout import derived_seed
from ..tasks.base import StepResult
from .base import Observation, Step
from .cgpo import CGPO, CGPO_STEP_VARS, CGPOSettings, mean_kl, trust_region_step
from .gbe import estimate


@dataclass(frozen=True)
class MBCGPOSettings(CGPOSettings):
    """CGPO's options plus the world model's (schema block `operator_mb_cgpo`)."""

    block: ClassVar[str] = "operator_mb_cgpo"

    model_hidden: list[int]
    model_lr: float
    model_batch: int
    model_updates: int
    buffer_size: int


class WorldModel(torch.nn.Module):
    """(s, a) -> (s' - s, r, c) with inputs and outputs standardised by the buffer's statistics."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden, obs_dim + 2]
        layers: list[torch.nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
        self.net = torch.nn.Sequential(*layers)
        self.obs_dim = obs_dim
        for name, size in (("in", obs_dim + act_dim), ("out", obs_dim + 2)):
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_std", torch.ones(size))

    def standardised(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The network's output on standardised inputs (the scale the loss of eq. 85 is taken on)."""
        return self.net((torch.cat([obs, action], -1) - self.in_mean) / self.in_std)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.standardised(obs, action) * self.out_std + self.out_mean
        return obs + out[..., :self.obs_dim], out[..., self.obs_dim], out[..., self.obs_dim + 1]


class ModelEnv:
    """The world model as a BatchEnv (base.py conventions) whose steps carry gradients."""

    def __init__(self, model: WorldModel, start: torch.Tensor, horizon: int, low: torch.Tensor, high: torch.Tensor,
                 observation_space: Any, action_space: Any) -> None:
        self.model, self.start, self.horizon = model, start, int(horizon)
        self.num_envs, self.device = start.shape[0], start.device
        self.low, self.high = low, high
        self.observation_space, self.action_space = observation_space, action_space
        self.reset()

    def reset(self) -> torch.Tensor:
        self.t, self.obs = 0, self.start.clone()
        return self.obs

    def detach(self) -> None:
        self.obs = self.obs.detach()

    def step(self, actions: torch.Tensor) -> StepResult:
        a = torch.maximum(torch.minimum(actions.to(self.obs.dtype), self.high), self.low)
        self.obs, reward, cost = self.model(self.obs, a)
        self.t += 1
        done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return StepResult(obs=self.obs, reward=reward, cost=cost[:, None], terminated=done,
                          truncated=torch.full_like(done, self.t >= self.horizon))


MB_STEP_VARS: dict[str, Var] = {
    **CGPO_STEP_VARS,
    "model_cost": Var(("constraint",), "J_C of pi_[k-1] in the world model's rollout (real: cost at k-1)", "cost"),
    "model_loss": Var((), "world-model loss (eq. 85, standardised) after the step's fit", "1"),
}


class MBCGPO(CGPO):
    """One MB-CGPO iteration (Alg. 3) on a task sampled by rollouts."""

    name = "mb_cgpo"
    kinds = ("sampled",)
    Settings = MBCGPOSettings
    step_vars = MB_STEP_VARS

    def start(self, task, policy, seed: int):
        state = super().start(task, policy, seed)
        probe = self.scenario.distribution.make_env(task, 1, derived_seed(seed, 0), "cpu")
        obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        dtype = next(policy.parameters()).dtype
        with torch.random.fork_rng():
            torch.manual_seed(derived_seed(seed, 3))
            state.model = WorldModel(obs_dim, act_dim, tuple(self.settings.model_hidden)).to(self.scenario.device, dtype)
        state.model_optimizer = torch.optim.Adam(state.model.net.parameters(), lr=self.settings.model_lr)
        state.buffer = None
        state.spaces = (probe.observation_space, probe.action_space)
        state.horizon = probe.horizon
        return state

    def observe(self, state, policy, seed: int) -> Observation:
        batch = self.scenario.rollout(state.task, policy, seed)
        return Observation(float(batch.episode_reward.mean()), batch.constraint_value.double().cpu().numpy(),
                           batch.constraint_value_se.double().cpu().numpy(), batch.sampling_time,
                           int(batch.alive.sum()), batch)

    def step(self, state, policy, observation: Observation) -> Step:
        batch, s = observation.data, self.settings
        obs_space, act_space = state.spaces
        dtype = next(policy.parameters()).dtype
        low = torch.as_tensor(act_space.low, dtype=dtype, device=self.scenario.device)
        high = torch.as_tensor(act_space.high, dtype=dtype, device=self.scenario.device)
        self._add(state, batch, low, high)
        loss = self._fit_model(state, torch.Generator().manual_seed(derived_seed(state.seed, 4, state.iteration)))
        model_env = ModelEnv(state.model, batch.obs[0].to(dtype), state.horizon, low, high, obs_space, act_space)
        est = estimate(model_env, policy, state.critics, s.window,
                       torch.Generator().manual_seed(derived_seed(state.seed, 5, state.iteration)))
        new, record = trust_region_step(state, policy, observation.reward, float(observation.cost[0]), est.g, est.q, s)
        state.critics.fit(est.windows, torch.Generator().manual_seed(derived_seed(state.seed, 2, state.iteration)))
        state.iteration += 1
        record.update(model_cost=[est.cost], model_loss=loss)
        return Step(new, np.array([np.nan]), mean_kl(policy, new, est.states), record)

    def _add(self, state, batch, low: torch.Tensor, high: torch.Tensor) -> None:
        """Append the batch's transitions (s_t, a_t, s_{t+1} - s_t, r_t, c_t) whose s_{t+1} was
        observed (all but the last step) to the buffer, keeping the newest `buffer_size`."""
        keep = batch.alive[:-1] & batch.alive[1:]
        obs, nxt = batch.obs[:-1][keep], batch.obs[1:][keep]
        actions = torch.maximum(torch.minimum(batch.actions[:-1][keep].to(obs.dtype), high), low)
        reward, cost = batch.reward[:-1][keep].to(obs.dtype), batch.cost[:-1][keep][:, 0].to(obs.dtype)
        rows = torch.cat([obs, actions, nxt - obs, reward[:, None], cost[:, None]], 1)
        state.buffer = rows if state.buffer is None else torch.cat([state.buffer, rows])
        state.buffer = state.buffer[-self.settings.buffer_size:]

    def _fit_model(self, state, generator: torch.Generator) -> float:
        """Adam on eq. (85), every output standardised by the buffer's current statistics."""
        s, model, data = self.settings, state.model, state.buffer
        n_in = model.in_mean.shape[0]
        with torch.no_grad():
            mean, std = data.mean(0), data.std(0).clamp_min(1e-6)
            model.in_mean.copy_(mean[:n_in]), model.in_std.copy_(std[:n_in])
            model.out_mean.copy_(mean[n_in:]), model.out_std.copy_(std[n_in:])
        targets = (data[:, n_in:] - model.out_mean) / model.out_std
        loss = torch.tensor(float("nan"))
        for _ in range(s.model_updates):
            idx = torch.randint(data.shape[0], (min(s.model_batch, data.shape[0]),), generator=generator).to(data.device)
            loss = ((model.standardised(data[idx, :model.obs_dim], data[idx, model.obs_dim:n_in]) - targets[idx]) ** 2).sum(1).mean()
            state.model_optimizer.zero_grad()
            loss.backward()
            state.model_optimizer.step()
        return float(loss.detach())

    def return_kind(self) -> str:
        return (f"mean undiscounted episode return over {self.scenario.sampling.rollouts} real rollouts; cost is the "
                f"mean undiscounted episode cost J_C")
