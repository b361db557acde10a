"""The paper's A^s from samples (Alg. 3), with the safety margins that make it anytime safe.

Problem (1) for a meta-policy pi_phi is solved in parameter space from one batch of pi_phi's
rollouts. With g = E_nu[grad log pi A] (Q from Monte-Carlo returns-to-go minus a per-step
baseline, App. E.1), h_i = grad J_ci (the constrained cost: `constraint_gamma`, the quantity
compared with d), F the Fisher of pi_phi under nu and the quadratic KL model
KL(theta) = 1/2 (theta - phi)' F (theta - phi), problem (1) reads

    max_dtheta  g' dtheta - lam KL
    s.t.        J_ci + h_i' dtheta + lam_ci KL  <=  d_i + delta_i - kappa SE(J_ci)          (*)

Its Lagrangian with multipliers (1-gamma) u_i >= 0 is maximised by the natural step

    dtheta(u) = F^-1 (g - (1-gamma) sum_i u_i h_i) / eta_u,   eta_u = lam + (1-gamma) sum_i u_i lam_ci,

which is eq. (3) exactly for a tabular softmax (u is the paper's multiplier), and the dual
gradient in u_i is the slack of (*), eq. (11) plus the lam_c KL term eq. (11) drops:
limit_i - (J_ci + h_i' dtheta(u) + lam_ci KL(u)). After p + 1 conjugate-gradient solves every u
costs a few dot products, so PGD (Alg. 3 lines 2-7, `projected_gradient_descent`) is cheap.

Beyond the paper's eq. (11), three safety margins, so that realised costs stay at or below d
(issue "anytime safety that holds when sampled"; measured in the README):
1. the lam_c KL term of problem (1) in the predicted cost (lam_c in cost units per nat of KL:
   the cost the first-order model may miss per unit of KL);
2. the target d + delta - kappa SE(J_c): the paper's epsilon-conservative Case 1 with epsilon =
   kappa standard errors of the cost estimate the step starts from;
3. recovery: when (*) is infeasible (possible only when pi_phi's estimated cost exceeds its
   target: Prop. 1's condition), the step is the pure cost reduction F^-1 h_i of the most
   violated constraint at the step's KL budget (CPO's recovery); and the operator halves the KL budget
   of a task's later steps when a step's realised cost exceeded its prediction by more than
   `trust_z` standard errors (`SampledDualPGD`).

Step size. With `kl_target` (App. D.4: lam = lam_c tuned by hand so the adaptation KL is about
0.03), lam is solved per adaptation so that the model KL of dtheta(u*) equals the target
(bisection on log lam, the dual re-solved at each lam); lam is then not an option. Without it,
lam is used as given, in units of the reward advantages' standard deviation when
`normalize_advantages` (the paper's Table 2 values then give KLs of 0.1-0.35 on our tasks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..records import Var
from .base import AdaptationOperator, Observation, Step
from .dual_pgd import DualSolution, as_vector, projected_gradient_descent

if TYPE_CHECKING:
    from ..policies import NeuralPolicy
    from ..rollout import Batch


@dataclass(frozen=True)
class SampledAdaptationSettings:
    """Options of the sampled A^s (schema block `operator_dual_pgd`; module docstring)."""

    block: ClassVar[str] = "operator_dual_pgd"

    lam: float
    lam_c: float | list[float]
    delta: float | list[float]
    kappa: float
    kl_target: float | None
    trust_z: float
    normalize_advantages: bool
    dual_tol: float
    dual_max_iter: int
    cg_iters: int
    cg_damping: float


@dataclass
class SampledAdaptResult:
    policy: "NeuralPolicy"        # the adapted policy (a new module; pi_phi is left unchanged)
    u: np.ndarray                 # [p] multipliers (the paper's u)
    lam: float                    # the reward KL penalty used (solved from kl_target, or as given)
    eta: float                    # eta_u*
    kl: float                     # E_nu KL(adapted || pi_phi) on the batch's states (exact, not the model)
    predicted_cost: np.ndarray    # [p] the constraint of (*) at the step taken: J_c + h'dtheta + lam_c KL
    limit: np.ndarray             # [p] its right-hand side d + delta - kappa SE
    iterations: int
    converged: bool               # the dual's projected-gradient residual reached dual_tol
    feasible: bool                # (*) had a solution; False: a recovery step was taken
    recovery: bool
    sensitivity: "Sensitivity | None" = None   # derivatives at u* (None after a recovery step)


@dataclass
class Sensitivity:
    """How the step and its predicted cost move with the multipliers at u* (for the implicit
    function theorem of the `full` meta-gradient): d dtheta / d u_j and d predicted_i / d u_j."""

    dtheta_du: list[torch.Tensor]   # p vectors
    dpred_du: np.ndarray            # [p, p]
    active: np.ndarray              # [p] bool, u*_i > 0


@dataclass
class StepModel:
    """Problem (*) on the natural-step family dtheta(u): everything after the CG solves.

    x_r = F^-1 g, x_c[j] = F^-1 (1-gamma) h_j (damped F); a_i = h_i' x_r, B_ij = h_i' x_c[j];
    q_rr, q_rc, Q_cc the (undamped) Fisher quadratic forms of x_r and x_c.
    """

    x_r: torch.Tensor
    x_c: list[torch.Tensor]
    a: np.ndarray
    B: np.ndarray
    q_rr: float
    q_rc: np.ndarray
    Q_cc: np.ndarray
    J_c: np.ndarray
    lam_c: np.ndarray
    gamma: float

    def eta(self, u: np.ndarray, lam: float) -> float:
        return lam + (1.0 - self.gamma) * float(u @ self.lam_c)

    def dtheta(self, u: np.ndarray, lam: float) -> torch.Tensor:
        return (self.x_r - sum(float(ui) * xi for ui, xi in zip(u, self.x_c))) / self.eta(u, lam)

    def kl(self, u: np.ndarray, lam: float) -> float:           # 1/2 dtheta' F dtheta
        return 0.5 * (self.q_rr - 2.0 * u @ self.q_rc + u @ self.Q_cc @ u) / self.eta(u, lam) ** 2

    def predicted(self, u: np.ndarray, lam: float) -> np.ndarray:   # the left-hand side of (*)
        return self.J_c + (self.a - self.B @ u) / self.eta(u, lam) + self.lam_c * self.kl(u, lam)

    def sensitivity(self, u: np.ndarray, lam: float) -> Sensitivity:
        e, deta = self.eta(u, lam), (1.0 - self.gamma) * self.lam_c                  # d eta / d u_j
        dkl = (self.Q_cc @ u - self.q_rc) / e ** 2 - 2.0 * self.kl(u, lam) * deta / e
        dpred = -self.B / e - np.outer(self.a - self.B @ u, deta) / e ** 2 + np.outer(self.lam_c, dkl)
        step = self.dtheta(u, lam)
        return Sensitivity([-(xj + float(dj) * step) / e for xj, dj in zip(self.x_c, deta)], dpred, u > 0)


def step_model(policy: "NeuralPolicy", batch: "Batch", settings: SampledAdaptationSettings) -> StepModel:
    """g, h_i and the Fisher of pi_phi from its batch, solved into the `StepModel` of (*)."""
    from ..optim import conjugate_gradient, fisher_vector_product, flat_grad
    from ..rollout import time_baseline

    p = batch.cost.shape[-1]
    alive = batch.alive
    obs, actions = batch.obs[alive], batch.actions[alive]
    nu = batch.visitation()[alive]                                   # normalised discounted visitation
    adv = (batch.q_reward - time_baseline(batch.q_reward, alive))[alive]
    con = (batch.cost_to_go - time_baseline(batch.cost_to_go, alive))[alive]   # [M, p], constraint_gamma
    con_w = batch.constraint_discount[alive] / batch.num_rollouts    # h_i = grad J_ci in the cost's own units
    normalize = settings.normalize_advantages and settings.kl_target is None
    scale = float(torch.sqrt((nu * (adv - (nu * adv).sum()) ** 2).sum())) if normalize else 1.0
    scale = scale if scale > 0 else 1.0
    gamma = batch.gamma

    params = list(policy.parameters())
    logp = policy.log_prob(obs, actions)
    g = flat_grad((nu * adv * logp).sum() / scale, params, retain_graph=True)
    h = [flat_grad((con_w * con[:, i] * logp).sum(), params, retain_graph=True) for i in range(p)]
    fvp_plain = fisher_vector_product(policy, obs, nu)

    def fvp(v):
        return fvp_plain(v) + settings.cg_damping * v

    x_r = conjugate_gradient(fvp, g, settings.cg_iters)
    x_c = [conjugate_gradient(fvp, (1.0 - gamma) * hi, settings.cg_iters) for hi in h]
    F_xc = [fvp_plain(x) for x in x_c]
    return StepModel(x_r, x_c, np.array([float(hi @ x_r) for hi in h]),
                     np.array([[float(hi @ xj) for xj in x_c] for hi in h]).reshape(p, p),
                     float(x_r @ fvp_plain(x_r)), np.array([float(x_r @ f) for f in F_xc]),
                     np.array([[float(xi @ f) for f in F_xc] for xi in x_c]).reshape(p, p),
                     batch.constraint_value.detach().double().cpu().numpy(),
                     as_vector(settings.lam_c, p, "lam_c"), gamma)


def adapt_sampled(policy: "NeuralPolicy", batch: "Batch", limits: np.ndarray, settings: SampledAdaptationSettings,
                  kl_scale: float = 1.0) -> SampledAdaptResult:
    """A^s of pi_phi = `policy` from one batch of its rollouts (module docstring).

    `kl_scale` multiplies the KL budget (the operator's fallback after a missed prediction).
    """
    model = step_model(policy, batch, settings)
    p = model.J_c.shape[0]
    se = batch.constraint_value_se.detach().double().cpu().numpy()
    allowed = np.asarray(limits, dtype=np.float64) + as_vector(settings.delta, p, "delta")   # d + delta
    limit = allowed - settings.kappa * se                            # the conservative target of (*)
    tol = settings.dual_tol * max(1.0, float(np.abs(allowed).max()))

    def solve(lam: float) -> DualSolution:
        return projected_gradient_descent(lambda u: limit - model.predicted(u, lam), p, tol=tol,
                                          max_iter=settings.dual_max_iter)

    budget = None if settings.kl_target is None else settings.kl_target * kl_scale
    lam = settings.lam if budget is None else _lam_for_kl(lambda lm: model.kl(solve(lm).u, lm), model.q_rr, budget)
    sol = solve(lam)
    recovery = not sol.feasible
    if not recovery:
        u, dtheta = sol.u, model.dtheta(sol.u, lam)
        prediction, sensitivity = model.predicted(u, lam), model.sensitivity(u, lam)
    else:  # the largest cost decrease of the most violated constraint at the KL budget (or eq. 3 at u_max)
        i = int(np.argmax(model.J_c - limit))
        u, sensitivity = np.full(p, np.nan), None
        Q_ii, lam_ci = model.Q_cc[i, i], max(model.lam_c[i], 1e-12)
        step_kl = budget if budget is not None else 0.5 * Q_ii / ((1.0 - model.gamma) * lam_ci) ** 2
        length = math.sqrt(2.0 * step_kl / Q_ii) if Q_ii > 0 else 0.0
        dtheta = -length * model.x_c[i]
        prediction = model.J_c - length * model.B[:, i] + model.lam_c * 0.5 * length ** 2 * Q_ii
    adapted = type(policy).from_checkpoint(policy.to_checkpoint())
    adapted.load_flat(policy.flat() + dtheta)
    alive = batch.alive
    obs, nu = batch.obs[alive], batch.visitation()[alive]
    with torch.no_grad():   # E_nu KL(adapted || pi_phi), the direction of problem (1)
        kl = float((nu * policy.kl(obs, adapted.distribution(obs))).sum())
    return SampledAdaptResult(adapted, u, float(lam), model.eta(np.nan_to_num(u), lam), kl, prediction, limit,
                              sol.iterations, sol.converged, not recovery, recovery, sensitivity)


def _lam_for_kl(kl_of_lam, q_rr: float, target: float) -> float:
    """lam with model KL(lam) = target (KL falls as lam grows), by bisection on log lam from the
    unconstrained answer sqrt(q_rr / (2 target)); the bracket widens until it holds the target.
    When no lam reaches the target (the constraint caps the step), the smallest lam tried."""
    guess = math.sqrt(q_rr / (2.0 * target)) if q_rr > 0 else 1.0
    lo, hi = math.log(guess) - 1.0, math.log(guess) + 1.0
    for _ in range(30):
        if kl_of_lam(math.exp(lo)) >= target:
            break
        lo -= 2.0
    for _ in range(30):
        if kl_of_lam(math.exp(hi)) <= target:
            break
        hi += 2.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if kl_of_lam(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


# --------------------------------------------------------------------------- the operator
class SampledDualPGD(AdaptationOperator):
    """A^s from one batch of the current policy's rollouts (Alg. 3, `adapt_sampled`).

    Per task sequence it keeps the KL budget's scale: a step whose realised cost (the next
    observation) exceeded its prediction by more than `trust_z` standard errors of the two
    estimates halves the budget of every later step of that task.
    """

    name = "dual_pgd"
    kinds = ("sampled",)
    Settings = SampledAdaptationSettings
    step_vars = {
        "feasible": Var((), "problem (1) of the step had a solution (0: a recovery step)", "1", initial=1.0),
        "converged": Var((), "the dual solver reached dual_tol", "1", initial=1.0),
        "predicted_cost": Var(("constraint",), "predicted cost of pi_[k] by the step that produced it", "cost"),
        "cost_limit_used": Var(("constraint",), "the step's target d + delta - kappa SE", "cost"),
        "lam": Var((), "reward KL penalty of the step (from kl_target, or as given)", "1"),
        "kl_scale": Var((), "factor on the KL budget after missed predictions", "1", initial=1.0),
    }

    @classmethod
    def ignored(cls, settings: SampledAdaptationSettings) -> dict[str, str]:
        if settings.kl_target is None:
            return {}
        why = "kl_target is set, so the step's KL fixes the reward penalty; remove it, or set kl_target: null"
        return {"lam": why, "normalize_advantages": why}

    def start(self, task, policy, seed):
        state = super().start(task, policy, seed)
        state.kl_scale, state.last = 1.0, None
        return state

    def observe(self, state, policy, seed: int) -> Observation:
        batch = self.scenario.rollout(state.task, policy, seed)
        cost = batch.constraint_value.double().cpu().numpy()
        se = batch.constraint_value_se.double().cpu().numpy()
        if state.last is not None:     # was the prediction of the step that produced this policy trusted?
            predicted, predicted_se = state.last
            if ((cost - predicted) > self.settings.trust_z * np.sqrt(se ** 2 + predicted_se ** 2)).any():
                state.kl_scale *= 0.5
        return Observation(float(batch.episode_reward.mean()), cost, se, batch.sampling_time, int(batch.alive.sum()),
                           batch)

    def step(self, state, policy, observation: Observation) -> Step:
        res = adapt_sampled(policy, observation.data, state.limits, self.settings, state.kl_scale)
        state.last = (res.predicted_cost, observation.cost_se)
        record = {"feasible": res.feasible, "converged": res.converged, "predicted_cost": res.predicted_cost,
                  "cost_limit_used": res.limit, "lam": res.lam, "kl_scale": state.kl_scale}
        return Step(res.policy, res.u, res.kl, record, res)
