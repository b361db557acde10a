"""CGPO: Constrained Gradient-based Policy Optimization (Dai et al., ICML 2024, Alg. 1).

One operator step from theta_k (this module, top to bottom against the paper):
1. GBE (Sec. 4.1, 5.3; `gbe.py`): J_R, J_C and g = grad J_R, q = grad J_C from one
   reparameterised rollout of N = `rollouts` episodes, back-propagated through the task's
   differentiable dynamics in windows of h steps with time-conditioned critics (`observe`);
2. the radius delta-hat of eq. (18) from the previous step's outcome: the reduction ratio
   rho = (J_R(theta_k) - J_R(theta_{k-1})) / (g_{k-1}.delta_{k-1}) (actual over predicted change;
   the printed ratio lost its hat and is 1 / 1) and the toleration ratio
   zeta = |b - J_C(theta_k)| / |J_C(theta_k) - J_C(theta_{k-1})|, both measured on this step's
   rollout (the next iteration's data, as Alg. 1 has no other);
3. the sub-problem (eqs. 9-10) in closed form, three cases (`solve_subproblem`, Thm. 5.1,
   Cor. 5.2, Alg. 2), theta_{k+1} = theta_k + delta;
4. the critics fitted on the step's windows (eq. 21).

Choices the paper leaves open (README "CGPO"): eta1 = 0.25, eta2 = 0.75 (eq. 18 gives no values;
ours, the classic trust-region thresholds); windows summed into g, q (`gbe.py`); a NaN rho (no
predicted change, e.g. g = 0) neither shrinks nor grows the radius; the policy's observations
are not normalised (Table 4's normalize_observations; the critics standardise theirs).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch

from ..records import Var
from ..registry import OptionError
from ..rollout import derived_seed
from .base import AdaptationOperator, Observation, Step
from .gbe import Critics, CriticSettings, estimate


# --------------------------------------------------------------------------- the sub-problem (Sec. 5.1)
CASES = ("a", "b", "c")   # recorded as 0, 1, 2


def solve_subproblem(g: np.ndarray, q: np.ndarray, c: float, radius: float) -> tuple[np.ndarray, str]:
    """The step delta of eq. (10) and its case: "a" (recovery), "b" (whole ball feasible) or "c".

        max_delta  g.delta   s.t.  c + q.delta <= 0,   delta.delta <= radius        (eq. 10)

    `g`, `q`: flat gradients of J_R and J_C; `c` = J_C - b; `radius` = delta-hat (SQUARED norm).
    (a) c^2/(q.q) - radius > 0 and c > 0: no point of the ball is feasible (Thm. 5.1); recovery
        step along -q to the ball's boundary (eq. 33);
    (b) c^2/(q.q) - radius > 0 and c <= 0: the whole ball is feasible (Cor. 5.2); step along g to
        the boundary (eq. 34);
    (c) otherwise: the KKT system (eqs. 36-39) solved by Algorithm 2, delta = (g - nu q) / lambda
        (eqs. 40, 47), with Lambda_a = {lambda >= 0 : lambda c + s > 0} (nu > 0) and
        Lambda_b = {lambda >= 0 : lambda c + s <= 0} (nu = 0), whose common boundary is -s/c
        (App. A.2.2; not r/c). The dual is concave in lambda on each interval, so projecting a
        branch's unconstrained maximiser onto (the closure of) its interval maximises that branch
        (eq. 44); the larger dual value picks the branch (a tie picks b, as Alg. 2). Degenerate
        inputs (g parallel to q, g = 0, q = 0, c = 0, an empty interval) take the limits of the
        same formulas.
    """
    g, q = np.asarray(g, dtype=np.float64), np.asarray(q, dtype=np.float64)
    c, radius = float(c), float(radius)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    r, s, t = float(g @ g), float(g @ q), float(q @ q)
    if c * c > radius * t:     # c^2/t - radius > 0 (also when q = 0 and c != 0)
        if c > 0:              # (a) eq. (33): steepest descent of the constraint, ||delta||^2 = radius
            return (-math.sqrt(radius / t) * q if t > 0 else np.zeros_like(q)), "a"
        return _along(g, r, radius), "b"   # (b) eq. (34)
    if t == 0:                 # q = 0 and c = 0: the constraint does not bind anywhere
        return _along(g, r, radius), "c"
    return _partially_feasible(g, q, c, radius, r, s, t), "c"


def _along(g: np.ndarray, r: float, radius: float) -> np.ndarray:
    """sqrt(radius) g / ||g|| (zero when g = 0)."""
    return math.sqrt(radius / r) * g if r > 0 else np.zeros_like(g)


def _partially_feasible(g: np.ndarray, q: np.ndarray, c: float, radius: float, r: float, s: float,
                        t: float) -> np.ndarray:
    """Case (c): Algorithm 2 (lambda*, nu*) and delta = (g - nu* q) / lambda* (eqs. 40-47).

    Branch a (nu = (lambda c + s)/t > 0) is evaluated as delta = perp/lambda - (c/t) q with perp
    the part of g orthogonal to q (the same vector, stable as lambda -> 0 when g is parallel to q);
    its limits lambda -> 0 (perp = 0) and lambda -> inf (the ball touches the plane) are the
    point -(c/t) q, the nearest point of the plane, where the dual value equals the primal -g.delta.
    """
    perp = g - (s / t) * q
    perp = perp - (float(q @ perp) / t) * q   # a second Gram-Schmidt pass: q.perp ~ rounding of perp, not of g
    r_perp = max(r - s * s / t, 0.0)       # ||perp||^2 = r - s^2/t >= 0 (Cauchy-Schwarz)
    slack = radius - c * c / t             # >= 0 in case (c)
    a_lo, a_hi, b_lo, b_hi = _intervals(c, s)

    value_a = value_b = -math.inf          # an empty interval never wins
    delta_a = delta_b = None
    if a_lo is not None:
        lam_a = _project(math.sqrt(r_perp / slack) if slack > 0 else math.inf, a_lo, a_hi)
        if 0.0 < lam_a < math.inf:
            delta_a = perp / lam_a - (c / t) * q
            value_a = (s * s / t - r) / (2 * lam_a) + 0.5 * lam_a * (c * c / t - radius) + s * c / t  # L_a (45)
        else:
            delta_a = -(c / t) * q
            value_a = float(-(g @ delta_a))
    if b_lo is not None:
        lam_b = _project(math.sqrt(r / radius), b_lo, b_hi)
        if lam_b > 0:
            delta_b = g / lam_b
            value_b = -0.5 * (r / lam_b + lam_b * radius)                                           # L_b (45)
        else:                              # g = 0 with 0 in Lambda_b: every feasible point is optimal
            delta_b, value_b = np.zeros_like(g), 0.0
    return delta_a if value_a > value_b else delta_b   # the dual is maximised (eq. 44)


def _intervals(c: float, s: float) -> tuple[float | None, float, float | None, float]:
    """(lo, hi) of the closures of Lambda_a and Lambda_b (lo None: empty), boundary -s/c (App. A.2.2).

    c < 0: Lambda_a = [0, -s/c), Lambda_b = [-s/c, inf) intersected with lambda >= 0;
    c > 0: Lambda_a = (-s/c, inf), Lambda_b = [0, -s/c]; c = 0: by the sign of s.
    """
    inf = math.inf
    if c < 0:
        edge = -s / c
        return (0.0, edge, edge, inf) if edge > 0 else (None, 0.0, 0.0, inf)
    if c > 0:
        edge = -s / c
        return (edge, inf, 0.0, edge) if edge > 0 else (0.0, inf, None, 0.0)
    return (0.0, inf, None, 0.0) if s > 0 else (None, 0.0, 0.0, inf)


def _project(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


# --------------------------------------------------------------------------- the radius (Sec. 5.2, eq. 18)
def next_radius(radius: float, rho: float, zeta: float, s: "CGPOSettings") -> float:
    """delta-hat_{k+1} of eq. (18): shrink by beta1 if rho < eta1 or zeta < eta1, grow by beta2 if
    rho >= eta2 and zeta >= eta2, else keep; clipped to [radius_lower, radius_upper]. A NaN
    ratio satisfies no comparison."""
    if rho < s.eta1 or zeta < s.eta1:
        return max(s.beta1 * radius, s.radius_lower)
    if rho >= s.eta2 and zeta >= s.eta2:
        return min(s.beta2 * radius, s.radius_upper)
    return radius


def step_ratios(reward: float, cost: float, previous: SimpleNamespace, limit: float) -> tuple[float, float]:
    """(rho, zeta) of eq. (18) for the step from `previous` to the policy now measured at
    (reward, cost) (see the module docstring)."""
    predicted = previous.predicted_reward_change
    rho = (reward - previous.reward) / predicted if predicted != 0 else math.nan
    change = abs(cost - previous.cost)
    zeta = abs(limit - cost) / change if change > 0 else math.inf
    return rho, zeta


# --------------------------------------------------------------------------- the operator (Alg. 1)
@dataclass(frozen=True)
class CGPOSettings:
    """Options of CGPO (schema block `operator_cgpo`; Table 4 gives radius_*, beta*, the
    critic's lr and minibatch, the window). eta1, eta2 are ours (the paper gives none)."""

    block: ClassVar[str] = "operator_cgpo"

    window: int
    radius_init: float
    radius_lower: float
    radius_upper: float
    adapt_radius: bool
    beta1: float
    beta2: float
    eta1: float
    eta2: float
    critic_hidden: list[int]
    critic_lr: float
    critic_batch: int
    critic_updates: int
    td_lambda: float

    def critics(self) -> CriticSettings:
        return CriticSettings(tuple(self.critic_hidden), self.critic_lr, self.critic_batch, self.critic_updates,
                              self.td_lambda)


RADIUS_RULE = ("radius_lower", "radius_upper", "beta1", "beta2", "eta1", "eta2")   # eq. (18)'s own options


def check_radius_options(s: "CGPOSettings") -> None:
    """Cross-option checks of eq. (18): lower <= init <= upper, beta1 < 1 < beta2, eta1 < eta2
    (none when the radius is static)."""
    if not s.adapt_radius:
        return
    if not s.radius_lower <= s.radius_init <= s.radius_upper:
        raise OptionError("radius_init", f"radius_init {s.radius_init} must lie in [radius_lower, radius_upper] = "
                                         f"[{s.radius_lower}, {s.radius_upper}]")
    if not s.beta1 < 1.0 < s.beta2:
        raise OptionError("beta1", f"eq. (18) needs beta1 < 1 < beta2, got {s.beta1}, {s.beta2}")
    if not s.eta1 < s.eta2:
        raise OptionError("eta1", f"eq. (18) needs eta1 < eta2, got {s.eta1}, {s.eta2}")


CGPO_STEP_VARS: dict[str, Var] = {
    "case": Var((), "sub-problem case of the step: 0 = (a) recovery, 1 = (b) whole ball feasible, 2 = (c) Alg. 2", "1"),
    "radius": Var((), "squared trust-region radius delta-hat the step used (eq. 10)", "1"),
    "rho": Var((), "reduction ratio of the previous step, which set this step's radius (eq. 18)", "1"),
    "zeta": Var((), "toleration ratio of the previous step, which set this step's radius (eq. 18)", "1"),
    "predicted_reward": Var((), "J_R of pi_[k] predicted at the step, J_R + g.delta (eq. 6)", "return"),
    "predicted_cost": Var(("constraint",), "J_C of pi_[k] predicted at the step, J_C + q.delta (eq. 7); "
                                           "realised: cost", "cost"),
}


class CGPO(AdaptationOperator):
    """One CGPO iteration (Alg. 1) on a task with differentiable dynamics."""

    name = "cgpo"
    kinds = ("differentiable",)
    Settings = CGPOSettings
    step_vars = CGPO_STEP_VARS

    @classmethod
    def check_options(cls, settings: CGPOSettings, given: frozenset[str] = frozenset()) -> None:
        check_radius_options(settings)

    @classmethod
    def ignored(cls, settings: CGPOSettings) -> dict[str, str]:
        return {} if settings.adapt_radius else {k: "adapt_radius is false (a static radius)" for k in RADIUS_RULE}

    def start(self, task, policy, seed: int):
        state = super().start(task, policy, seed)
        if state.limits.shape != (1,):
            raise ValueError(f"cgpo handles one constraint; task {task.params} has {state.limits.shape[0]}")
        probe = self.scenario.distribution.make_env(task, 1, derived_seed(seed, 0), "cpu")
        dtype = next(policy.parameters()).dtype
        state.critics = Critics(probe.observation_space.shape[0], probe.horizon, self.settings.critics(),
                                derived_seed(seed, 1), self.scenario.device, dtype)
        state.seed, state.iteration = seed, 0
        state.radius, state.previous = float(self.settings.radius_init), None
        return state

    def observe(self, state, policy, seed: int) -> Observation:
        start = time.perf_counter()
        env = self.scenario.distribution.make_env(state.task, self.scenario.sampling.rollouts, derived_seed(seed, 0),
                                                  self.scenario.device)
        est = estimate(env, policy, state.critics, self.settings.window, torch.Generator().manual_seed(derived_seed(seed, 1)))
        return Observation(est.reward, np.array([est.cost]), np.array([est.cost_se]), time.perf_counter() - start,
                           est.env_steps, est)

    def step(self, state, policy, observation: Observation) -> Step:
        est = observation.data
        new, record = trust_region_step(state, policy, est.reward, est.cost, est.g, est.q, self.settings)
        state.critics.fit(est.windows, torch.Generator().manual_seed(derived_seed(state.seed, 2, state.iteration)))
        state.iteration += 1
        return Step(new, np.array([math.nan]), mean_kl(policy, new, est.states), record)

    def return_kind(self) -> str:
        return (f"mean undiscounted episode return over {self.scenario.sampling.rollouts} reparameterised rollouts "
                f"(the GBE rollout); cost is the mean undiscounted episode cost J_C")


def trust_region_step(state, policy, reward: float, cost: float, g: torch.Tensor, q: torch.Tensor,
                      s: CGPOSettings) -> tuple[object, dict]:
    """Steps 2-3 of Alg. 1 from an estimate at theta_k: the radius of eq. (18) from the previous
    step's outcome (`state.previous`, `state.radius`), the sub-problem, theta_k + delta. Returns
    the new policy and the step's record; updates `state.radius` and `state.previous`."""
    limit = float(state.limits[0])
    rho = zeta = math.nan
    if state.previous is not None:
        rho, zeta = step_ratios(reward, cost, state.previous, limit)
        if s.adapt_radius:
            state.radius = next_radius(state.radius, rho, zeta, s)
    g_np, q_np = g.double().cpu().numpy(), q.double().cpu().numpy()
    delta, case = solve_subproblem(g_np, q_np, cost - limit, state.radius)
    state.previous = SimpleNamespace(reward=reward, cost=cost, predicted_reward_change=float(g_np @ delta))
    record = {"case": CASES.index(case), "radius": state.radius, "rho": rho, "zeta": zeta,
              "predicted_reward": reward + float(g_np @ delta), "predicted_cost": [cost + float(q_np @ delta)]}
    return moved_policy(policy, delta), record


def moved_policy(policy, delta: np.ndarray):
    """A copy of `policy` with parameters theta + delta."""
    new = type(policy).from_checkpoint(policy.to_checkpoint()).to(next(policy.parameters()).device)
    theta = policy.flat()
    new.load_flat(theta + torch.as_tensor(delta, dtype=theta.dtype, device=theta.device))
    return new


def mean_kl(old, new, states: torch.Tensor) -> float:
    """E_s KL(new(.|s) || old(.|s)) over the visited states."""
    with torch.no_grad():
        return float(old.kl(states, new.distribution(states)).mean())
