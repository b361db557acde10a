"""CPO (Achiam et al. 2017, "Constrained Policy Optimization"): one step, the inner step of Meta-CPO.

One step from a policy pi_theta with one constraint (p = 1) solves the linearised problem of
Achiam et al. (section 6), written as a maximisation with g the ascent direction:

    max_x  g.x   s.t.  c + b.x <= 0   and   1/2 x^T F x <= max_kl

g = grad of the reward surrogate, b = grad of the cost surrogate (in J_c's units), c = J_c - d,
F = Fisher of the mean KL. With x_g = F^-1 g, x_b = F^-1 b and the scalars
q = g.x_g, r = g.x_b, s = b.x_b, A = q - r^2/s (>= 0), B = 2 max_kl - c^2/s:

- recovery (c > 0 and B < 0: no point of the trust region satisfies the linearised
  constraint): x = -sqrt(2 max_kl / s) x_b, the largest step that most decreases the
  linearised cost (Achiam et al. section 6, feasibility);
- otherwise the dual (Achiam et al. App. 10.2, Theorem 2, in this max convention),
      min_{lam > 0, nu >= 0}  (q - 2 nu r + nu^2 s) / (2 lam) + lam max_kl - nu c ,
  has nu*(lam) = max(0, (lam c + r) / s) and x = (x_g - nu x_b) / lam. The dual minimised over
  nu is convex in lam, so its optimum is the nu = 0 branch's stationary point
  lam_b = sqrt(q / (2 max_kl)) when that point lies in the branch (lam_b c + r <= 0: the TRPO
  step x_g / lam_b satisfies the linear constraint), and otherwise the nu > 0 branch's
  lam_a = sqrt(A / B) with nu = (lam_a c + r) / s > 0. (This is the choice between the two
  clipped candidates of reference/baselines.md 1.3, with empty intervals never clipped over.)
  The nu > 0 step is evaluated as x = sqrt(B / A) (x_g - (r/s) x_b) - (c/s) x_b, equal to
  (x_g - nu x_b) / lam_a and finite when A -> 0 or B -> 0.

Sign convention: r = g^T F^-1 b with g the gradient to ASCEND. Achiam et al.'s appendix (and his
code) minimises with g the gradient of a loss, so their r is minus this one; OmniSafe's CPO uses
this r but the appendix formulas for nu, f_a and the lam intervals, which misses the optimum on
most random instances (reference/baselines.md 1.4). `cpo_step` is tested against scipy.

The operator `cpo` takes this step with F by conjugate gradient on Fisher-vector products
(sampled) or exactly (tabular softmax, with exact advantages), then backtracks the step until
the mean KL is within max_kl and the cost surrogate is within d (or does not increase when the
policy already violates d), and, from a safe policy, the reward surrogate improves (Achiam et
al. backtrack to satisfy the sample estimates; the acceptance rule is OmniSafe's). If no
fraction is accepted the policy is unchanged. The same step, written with torch operations only
and solved by `differentiable=True` in the graph of theta, is what Meta-CPO differentiates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

from ..optim import conjugate_gradient
from ..records import Var
from ..tasks.tabular import TabularCMDP, evaluate_torch
from .base import Observation, Step
from .observation import ExactObserver, RolloutObserver

if TYPE_CHECKING:
    from ..policies import NeuralPolicy
    from ..rollout import Batch

RECOVERY, REWARD, CONSTRAINED = 0, 1, 2   # the step's case: recovery; nu* = 0 (TRPO step); nu* > 0


# --------------------------------------------------------------------------- the closed form
@dataclass
class Direction:
    x: torch.Tensor     # the step (in the autograd graph of g, b, c, x_g, x_b)
    case: int           # RECOVERY, REWARD or CONSTRAINED
    nu: float           # multiplier of the linearised constraint (NaN for the recovery step)
    lam: float          # multiplier of the trust region (NaN for the recovery step)


def cpo_direction(g: torch.Tensor, b: torch.Tensor, c: torch.Tensor | float, x_g: torch.Tensor,
                  x_b: torch.Tensor, max_kl: float) -> Direction:
    """The CPO step (module docstring) from g, b, c and the solves x_g = F^-1 g, x_b = F^-1 b.

    Only torch operations touch the inputs, so the step is differentiable in all of them; the
    case is chosen on their values (detached scalars), i.e. the active KKT piece is differentiated.
    """
    c = torch.as_tensor(c, dtype=g.dtype, device=g.device)
    two_delta = 2.0 * float(max_kl)
    q, r, s = g @ x_g, g @ x_b, b @ x_b
    qf, rf, sf, cf = (float(v.detach()) for v in (q, r, s, c))
    tiny = 1e3 * torch.finfo(g.dtype).eps
    zero = 0.0 * x_g
    if not sf > 0.0:                                   # b = 0: the linearised cost does not depend on x
        if cf > 0.0:
            return Direction(zero, RECOVERY, math.nan, math.nan)   # infeasible, and no step reduces it
        return _reward_step(q, qf, x_g, two_delta)
    Bf = two_delta - cf * cf / sf
    if cf > 0.0 and Bf < 0.0:                          # recovery
        return Direction(-torch.sqrt(two_delta / s) * x_b, RECOVERY, math.nan, math.nan)
    lam_b = math.sqrt(max(qf, 0.0) / two_delta)
    if (qf > 0.0 and lam_b * cf + rf <= 0.0) or (not qf > 0.0 and cf <= 0.0):
        return _reward_step(q, qf, x_g, two_delta)     # nu* = 0
    A = q - r * r / s
    Af = float(A.detach())
    if Af > tiny * qf and Bf > 0.0:
        B = two_delta - c * c / s
        x = torch.sqrt(B / A) * (x_g - (r / s) * x_b) - (c / s) * x_b
        lam = math.sqrt(Af / Bf)
    else:                                              # g parallel to b, or the plane touches the ellipsoid
        x = zero - (c / s) * x_b
        lam = math.sqrt(max(Af, 0.0) / Bf) if Bf > 0.0 else math.inf
    return Direction(x, CONSTRAINED, (lam * cf + rf) / sf if math.isfinite(lam) else math.inf, lam)


def _reward_step(q: torch.Tensor, qf: float, x_g: torch.Tensor, two_delta: float) -> Direction:
    """nu* = 0: the TRPO step sqrt(2 max_kl / q) x_g (zero when g = 0)."""
    if not qf > 0.0:
        return Direction(0.0 * x_g, REWARD, 0.0, 0.0)
    return Direction(torch.sqrt(two_delta / q) * x_g, REWARD, 0.0, math.sqrt(qf / two_delta))


def cpo_solution(g: np.ndarray, b: np.ndarray, c: float, F: np.ndarray, max_kl: float) -> Direction:
    """`cpo_step` with its case and multipliers (numpy in, torch float64 out)."""
    g, b, F = (np.asarray(v, dtype=np.float64) for v in (g, b, F))
    n = g.shape[0]
    if g.shape != (n,) or b.shape != (n,) or F.shape != (n, n):
        raise ValueError(f"cpo_step: g and b must be vectors [n] and F a matrix [n, n]; got {g.shape}, {b.shape}, "
                         f"{F.shape}")
    if not max_kl > 0:
        raise ValueError(f"cpo_step: max_kl must be > 0, got {max_kl!r}")
    if not np.allclose(F, F.T, rtol=1e-10, atol=1e-12 * np.abs(F).max()):
        raise ValueError("cpo_step: F must be symmetric positive definite (it is not symmetric)")
    try:
        L = np.linalg.cholesky(F)
    except np.linalg.LinAlgError:
        raise ValueError("cpo_step: F must be symmetric positive definite") from None
    solve = lambda v: np.linalg.solve(L.T, np.linalg.solve(L, v))  # noqa: E731
    t = torch.from_numpy
    return cpo_direction(t(g), t(b), float(c), t(solve(g)), t(solve(b)), max_kl)


def cpo_step(g: np.ndarray, b: np.ndarray, c: float, F: np.ndarray, max_kl: float) -> np.ndarray:
    """argmax_x g.x s.t. c + b.x <= 0 and 1/2 x'Fx <= max_kl; when no x satisfies both, the recovery
    step -sqrt(2 max_kl / b'F^-1 b) F^-1 b. g: reward gradient, b: cost gradient, c = J_c - d,
    F: a symmetric positive definite matrix (module docstring for the closed form)."""
    return cpo_solution(g, b, c, F, max_kl).x.numpy()


# --------------------------------------------------------------------------- the line search
@dataclass
class CPOStep:
    """One CPO step from theta: theta + fraction * direction.x."""

    params: torch.Tensor        # the new parameters (in the graph of theta when differentiable)
    direction: Direction
    fraction: float             # accepted backtracking fraction (0: no step was accepted)
    kl: float                   # mean KL(pi_theta || pi_new) on the step's states
    cost: float                 # J_c(pi_theta) (exact, or the batch estimate)
    predicted_cost: float       # the cost surrogate at the new parameters
    limit: float                # d


def line_search(x: torch.Tensor, cost: float, limit: float, trial: Callable[[torch.Tensor], tuple[float, float, float]],
                max_kl: float, steps: int, ratio: float) -> tuple[float, float, float, float]:
    """Backtrack fraction = 1, ratio, ratio^2, ... (`steps` trials) along x until `trial(fraction * x)`,
    which returns (mean KL, reward-surrogate gain, cost surrogate), has KL <= max_kl, cost
    surrogate <= max(d, J_c) and, when J_c <= d, a positive gain (OmniSafe's rule). Returns
    (fraction, KL, cost surrogate); (0, 0, J_c) when no trial passes."""
    fraction = 1.0
    for _ in range(steps):
        kl, gain, predicted = trial(fraction * x)
        if kl <= max_kl and predicted <= max(limit, cost) and (gain > 0.0 or cost > limit):
            return fraction, kl, gain, predicted
        fraction *= ratio
    return 0.0, 0.0, 0.0, cost


# --------------------------------------------------------------------------- solves in the graph
class _ImplicitSolve(torch.autograd.Function):
    """Forward: zeros (the value is carried by the CG solution x*); backward: v -> F^-1 v.

    x(theta) = x* + _ImplicitSolve(g(theta) - F(theta) x*) has the value x* and the derivative of
    F(theta)^-1 g(theta) by the implicit function theorem, dx = F^-1 (dg - dF x*): one CG solve
    per backward pass instead of differentiating through the CG iterations."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.solve = solve
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.enable_grad():   # the solve differentiates the KL graph (backward runs without grad mode)
            return ctx.solve(grad.detach()).detach(), None


# --------------------------------------------------------------------------- exact (tabular softmax)
def softmax_fisher(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The Fisher of a tabular softmax in its logits, sum_s w(s) (diag pi_s - pi_s pi_s^T), dense [SA, SA]
    (the Hessian of sum_s w(s) KL(pi_s || pi'_s) at pi' = pi). Its null space holds the per-state
    constant shifts of the logits, which leave the policy unchanged; every gradient of a
    function of the policy is orthogonal to it, so F^+ (`pinv_solve`) is the natural inverse."""
    blocks = weights[:, None, None] * (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :])
    return torch.block_diag(*blocks)


def pinv_solve(F: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> F^+ v for a symmetric positive semi-definite F (eigenvalues below 1e-12 of the largest dropped)."""
    inverse = torch.linalg.pinv(F, rtol=1e-12, hermitian=True)
    return lambda v: inverse @ v


def exact_cpo_step(cmdp: TabularCMDP, logits: torch.Tensor, settings: "ExactCPOSettings", *,
                   fisher_derivative: bool = True) -> CPOStep:
    """One CPO step of a tabular softmax pi = softmax(logits [S, A]) with exact J, J_c, advantages,
    visitation and natural gradients. If `logits` requires grad, the new logits are in its graph (the
    backtracking fraction and the case are constants); `fisher_derivative=False` treats F as
    a constant there."""
    if cmdp.num_constraints != 1:
        raise ValueError(f"cpo handles one constraint; the task has {cmdp.num_constraints}")
    graph = logits.requires_grad
    theta = logits if graph else logits.detach().double().requires_grad_()
    probs = torch.softmax(theta, dim=-1)
    ev = evaluate_torch(cmdp, probs)
    g, b = (torch.autograd.grad(v, theta, create_graph=graph, retain_graph=True)[0].reshape(-1) for v in (ev.J, ev.Jc[0]))
    d = float(cmdp.d[0])
    c = ev.Jc[0] - d if graph else (ev.Jc[0] - d).detach()
    # F^+ g and F^+ b in closed form: a tabular softmax's natural gradient is its advantage (Kakade
    # 2002), g = nu pi A / (1 - gamma) = F A / (1 - gamma); exact for every theta, so its derivative
    # includes that of F. With fisher_derivative False, F is held at theta: dx = F^+ dg.
    x_g, x_b = (adv.reshape(-1) / (1.0 - cmdp.gamma) for adv in (ev.A, ev.Ac[0]))
    if graph and not fisher_derivative:
        solve = pinv_solve(softmax_fisher(probs.detach(), ev.nu.detach()))
        x_g, x_b = (x.detach() + _ImplicitSolve.apply(v - v.detach(), solve) for x, v in ((x_g, g), (x_b, b)))
    elif not graph:
        x_g, x_b = x_g.detach(), x_b.detach()
    direction = cpo_direction(g, b, c, x_g, x_b, settings.max_kl)

    gamma = cmdp.gamma
    nu, A_r, A_c, pi, J_c = (v.detach() for v in (ev.nu, ev.A, ev.Ac[0], probs, ev.Jc[0]))
    log_pi = torch.log_softmax(theta.detach(), dim=-1)

    def trial(x: torch.Tensor) -> tuple[float, float, float]:  # the exact surrogates the step linearises
        log_new = torch.log_softmax(theta.detach() + x.reshape(theta.shape), dim=-1)
        new = log_new.exp()
        kl = float((nu * (pi * (log_pi - log_new)).sum(-1)).sum())
        gain = float((nu[:, None] * new * A_r).sum()) / (1.0 - gamma)
        return kl, gain, float(J_c) + float((nu[:, None] * new * A_c).sum()) / (1.0 - gamma)

    with torch.no_grad():
        fraction, kl, _, predicted = line_search(direction.x.detach(), float(J_c), d, trial, settings.max_kl,
                                              settings.backtrack_steps, settings.backtrack_ratio)
    new = theta + fraction * direction.x.reshape(theta.shape)
    return CPOStep(new if graph else new.detach(), direction, fraction, kl, float(J_c), predicted, d)


# --------------------------------------------------------------------------- sampled (neural policies)
class BatchSurrogates:
    """CPO's surrogates of one batch of a behaviour policy, as functions of flat parameters theta.

    With rho = pi_theta(a|s) / pi_behaviour(a|s) on the batch's samples,
    - reward: sum_{n,t} gamma^t rho (Q - b_t) / N, whose gradient at the behaviour policy is the
      policy gradient of J (Q: discounted returns-to-go, b_t the mean over rollouts at step t);
    - cost:   J_c + sum_{n,t} gamma_c^t rho (C - b_t) / N, the linearisation of the constrained
      J_c in its own units (C: its returns-to-go with constraint_gamma), = J_c at the behaviour;
    - mean KL and Fisher under the batch's normalised discounted visitation.
    """

    def __init__(self, policy: "NeuralPolicy", batch: "Batch", limit: float) -> None:
        from ..rollout import time_baseline

        if batch.cost.shape[-1] != 1:
            raise ValueError(f"cpo handles one constraint; the task has {batch.cost.shape[-1]}")
        self.policy, self.limit = policy, float(limit)
        alive = batch.alive
        self.obs, self.actions, self.old_logp = batch.obs[alive], batch.actions[alive], batch.log_prob[alive]
        self.reward_w = batch.discount[alive] / batch.num_rollouts
        self.adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
        self.cost_w = batch.constraint_discount[alive] / batch.num_rollouts
        cost_to_go = batch.cost_to_go[..., 0]
        self.cost_adv = (cost_to_go - time_baseline(cost_to_go, alive))[alive]
        self.nu = batch.visitation()[alive]
        self.J_c = float(batch.constraint_value[0])

    def _ratio(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.policy.log_prob(self.obs, self.actions, self.policy.unflatten(theta)) - self.old_logp)

    def reward(self, theta: torch.Tensor) -> torch.Tensor:
        return (self.reward_w * self._ratio(theta) * self.adv).sum()

    def cost(self, theta: torch.Tensor) -> torch.Tensor:
        return self.J_c + (self.cost_w * self._ratio(theta) * self.cost_adv).sum()

    def kl(self, theta: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """E_nu KL(pi_theta || pi_new)."""
        ref, to = (self.policy.distribution(self.obs, self.policy.unflatten(v)) for v in (theta, new))
        return (self.nu * torch.distributions.kl_divergence(ref, to)).sum()

    def _kl_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, grad_eps E_nu KL(pi_theta || pi_{theta + eps}) at eps = 0, in the graph of theta)."""
        eps = torch.zeros_like(theta, requires_grad=True)
        return eps, torch.autograd.grad(self.kl(theta, theta + eps), eps, create_graph=True)[0]

    def fisher(self, theta: torch.Tensor, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> (F(theta) + damping I) v, F the Hessian of the mean KL (no graph)."""
        eps, grad = self._kl_grad(theta.detach())
        return lambda v: torch.autograd.grad(grad @ v, eps, retain_graph=True)[0] + damping * v

    def fisher_product(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """F(theta) v as a function of theta (third-order terms when differentiated)."""
        eps, grad = self._kl_grad(theta)
        return torch.autograd.grad(grad @ v, eps, create_graph=True)[0]


def sampled_cpo_step(surrogates: BatchSurrogates, theta: torch.Tensor, settings: "SampledCPOSettings", *,
                     differentiable: bool = False, fisher_derivative: bool = True,
                     residual_tol: float = 1e-10) -> CPOStep:
    """One CPO step from theta (flat) on one batch's surrogates (at theta = the behaviour policy: the
    operator's step). `differentiable`: the new parameters are in the graph of theta, with F^-1 by
    the implicit function theorem (`_ImplicitSolve`) and, if `fisher_derivative`, the derivative
    of F(theta) too; the backtracking fraction and the case are constants."""
    th = theta if differentiable else theta.detach().requires_grad_()
    L_r, L_c = surrogates.reward(th), surrogates.cost(th)
    g = torch.autograd.grad(L_r, th, create_graph=differentiable, retain_graph=True)[0]
    b = torch.autograd.grad(L_c, th, create_graph=differentiable, retain_graph=differentiable)[0]
    c = L_c - surrogates.limit
    fvp = surrogates.fisher(theta, settings.cg_damping)
    solve = lambda v: conjugate_gradient(fvp, v, settings.cg_iters, residual_tol)  # noqa: E731
    x_g, x_b = solve(g.detach()), solve(b.detach())
    if differentiable:
        def in_graph(x_star: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            Fx = surrogates.fisher_product(th, x_star) if fisher_derivative else 0.0
            return x_star + _ImplicitSolve.apply(grad - Fx, solve)

        x_g, x_b = in_graph(x_g, g), in_graph(x_b, b)
    else:
        g, b, c = g.detach(), b.detach(), c.detach()
    direction = cpo_direction(g, b, c, x_g, x_b, settings.max_kl)

    base = theta.detach()
    with torch.no_grad():
        cost, reward = float(L_c.detach()), float(L_r.detach())

        def trial(x: torch.Tensor) -> tuple[float, float, float]:
            new = base + x
            return (float(surrogates.kl(base, new)), float(surrogates.reward(new)) - reward,
                    float(surrogates.cost(new)))

        fraction, kl, _, predicted = line_search(direction.x.detach(), cost, surrogates.limit, trial, settings.max_kl,
                                              settings.backtrack_steps, settings.backtrack_ratio)
    new = th + fraction * direction.x
    return CPOStep(new if differentiable else new.detach(), direction, fraction, kl, cost, predicted,
                   surrogates.limit)


# --------------------------------------------------------------------------- the operators
@dataclass(frozen=True)
class ExactCPOSettings:
    """Options of the exact CPO step (schema block `operator_cpo`)."""

    block: ClassVar[str] = "operator_cpo"

    max_kl: float
    backtrack_steps: int
    backtrack_ratio: float


@dataclass(frozen=True)
class SampledCPOSettings:
    """Options of the sampled CPO step (schema block `operator_cpo`): the trust region, the line
    search, and the conjugate gradient on Fisher-vector products."""

    block: ClassVar[str] = "operator_cpo"

    max_kl: float
    backtrack_steps: int
    backtrack_ratio: float
    cg_iters: int
    cg_damping: float


STEP_VARS: dict[str, Var] = {
    "feasible": Var((), "the step's linearised problem was feasible (no recovery step)", "1", initial=1.0),
    "cpo_case": Var((), "case of the CPO step: 0 recovery, 1 nu* = 0 (TRPO step), 2 nu* > 0", "1"),
    "fraction": Var((), "accepted backtracking fraction of the CPO step (0: no step)", "1"),
}


def _step(result: CPOStep, policy: Any) -> Step:
    case = result.direction.case
    nu = result.direction.nu if case != RECOVERY else math.nan
    return Step(policy, np.array([nu]), result.kl,
                {"feasible": float(case != RECOVERY), "cpo_case": float(case), "fraction": result.fraction}, result)


class ExactCPO(ExactObserver):
    """The CPO step of a tabular softmax with exact values (`exact_cpo_step`); observation = exact evaluation."""

    name = "cpo"
    kinds = ("exact",)
    Settings = ExactCPOSettings
    step_vars = STEP_VARS

    def step(self, state, policy, observation: Observation) -> Step:
        from ..policies import TabularSoftmaxPolicy

        result = exact_cpo_step(state.cmdp, torch.from_numpy(policy.logits), self.settings)
        logits = torch.log_softmax(result.params, dim=-1).numpy()
        return _step(result, TabularSoftmaxPolicy(logits, normalized=True))


class SampledCPO(RolloutObserver):
    """The CPO step from one batch of the current policy's rollouts (`sampled_cpo_step`)."""

    name = "cpo"
    kinds = ("sampled",)
    Settings = SampledCPOSettings
    step_vars = STEP_VARS

    def step(self, state, policy, observation: Observation) -> Step:
        surrogates = BatchSurrogates(policy, observation.data, float(state.limits[0]))
        result = sampled_cpo_step(surrogates, policy.flat(), self.settings)
        adapted = type(policy).from_checkpoint(policy.to_checkpoint()).to(result.params.device)
        adapted.load_flat(result.params)
        return _step(result, adapted)
