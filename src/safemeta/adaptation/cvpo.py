"""CVPO (Liu et al., ICML 2022, `papers/cvpo.txt`): one off-policy E/M step per adaptation step.

An adaptation step from pi_k (the paper's pi_theta_i; App. B.1, Alg. 2):
1. the rollouts that `observe` collected for pi_k go into a replay buffer that lives for the
   task's adaptation sequence (`start` makes it, with the critics);
2. `updates` = ceil(replay_ratio * new transitions / batch_size) times (the released code's
   replay ratio, `episode_rerun_num`): sample B transitions; one Adam step on each critic's
   mean-squared Bellman error (eqs. 49-52); the E-step (eqs. 8-9) at K particles per state drawn
   from pi_k; `mstep_iters` primal-dual steps of the M-step (eqs. 54-58); polyak averaging of
   the target critics (eq. 59).
pi_k stays the "old" policy of the whole step: the particles come from it and the M-step's trust
region (12) is around it, so a step moves the policy by at most the M-step's KL bounds (Prop. 3
needs them below the E-step's bound). It plays the role of the paper's target policy pi_theta'
(the released code polyak-averages an actor instead; FSRL freezes `actor_old` per collect cycle,
as here).

Critics (App. B.1 and the released code, reference A2.1): a reward ensemble of 2 with the min in
the targets and one cost critic per constraint, ReLU MLPs, all members one batched module;
targets y = r + gamma m min_j Q'_rj(s', a') and y_c = c + gamma m Q'_c(s', a') with a' from the
policy being updated and m = 0 after a termination (our episodes end only there, so unlike the
released code, whose `done` marks a reached goal in a continuing episode, the cost is masked too).
The last transition of a time-limited episode has no next state in a rollout batch and is not
stored. The E-step uses the target critics (reward: the ensemble min).

E-step: with A = Q_r - sum_i lam_i Q_ci at K particles a_bk ~ pi_k(.|s_b), the dual (9) with the
inner expectation as the particle mean,
    g(eta, lam) = lam . eps1 + eta eps2 + eta mean_b log mean_k exp(A_bk / eta),
is minimised over eta > 0, 0 <= lam <= LAM_MAX (`solve_estep_dual`: eta*(lam) by a 1-D solve,
lam by projected Newton steps on the convex h(lam) = min_eta g; analytic gradient, eq. 34, and
Hessian, App. A.3), warm-started from the previous solution, to a scaled KKT residual <=
ESTEP_TOL: |mean_b KL(q_b || pi_k) - eps2| / eps2 for an interior eta, and |E[Q_ci] - eps1_i|
relative to max(|eps1_i|, spread of Q_ci) for an interior lam_i (one-sided at the bounds). The
weights are q*_bk = softmax_k(A_bk / eta) (eq. 8). If even lam = LAM_MAX leaves E_q[Q_c] > eps1
(Slater's condition violated, Remark 4), lam stays at the bound and q* is the most cost-reducing
distribution of the KL ball: the recovery step. The weights are computed from fresh arrays,
never in place (FSRL modifies its Q_r tensor in place and weighs Q_r - 2 lam Q_c; reference A7).
eps1 is the episode limit d as a per-state discounted threshold, d (1 - gamma^T) / ((1 - gamma) T)
(reference A2.2; assumes fixed-length episodes of T steps and an undiscounted episode cost).

M-step (eqs. 10-12, 53-58): maximise mean_b sum_k q*_bk [log N(a_bk; mu_theta, Sigma_k) +
log N(a_bk; mu_k, Sigma_theta)] (the decoupled likelihood of App. B.1: mean from the current
network, covariance from the old policy, and vice versa) subject to the decoupled KLs
    C_mu = mean_b 1/2 (mu - mu_k)^T Sigma_k^-1 (mu - mu_k) <= eps_mu,
    C_Sigma = 1/2 (tr(Sigma^-1 Sigma_k) - n + ln |Sigma| / |Sigma_k|) <= eps_Sigma
(old covariance in C_mu, as the released code; the paper typesets Sigma^-1). Each iteration takes
a gradient step on the multipliers, beta <- max(0, beta - alpha (eps - C)) (eqs. 56-57), then an
Adam step on theta (eq. 58). The multipliers and the Adam moments persist over the sequence.
Choices the released code makes and this one does not: no upper clip of beta (its 0.1 for beta_mu
cannot hold C_mu near eps_mu once theta converges to the weighted fit; the bound then holds only
because few Adam steps are taken), no gradient-norm clip (Adam's step is invariant to rescaling
the whole gradient, which is all a global-norm clip does), the policy class is the project's
diagonal Gaussian with a state-free log-std (the meta-policy's), not a Cholesky network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..records import Var
from .base import AdaptationOperator, Observation, Step

if TYPE_CHECKING:
    from ..policies import GaussianMLPPolicy
    from ..rollout import Batch

LAM_MAX = 1e5       # upper bound of lam (the released code's SLSQP bound)
ETA_MIN = 1e-8      # bounds of eta (the upper one only keeps trial points finite)
ETA_MAX = 1e100
ESTEP_TOL = 1e-8    # scaled KKT residual at which the E-step dual counts as solved
REWARD_MEMBERS = 2  # reward-critic ensemble size (min in the targets)


def cost_threshold(d: np.ndarray, gamma: float, horizon: int) -> np.ndarray:
    """eps1 = d (1 - gamma^T) / ((1 - gamma) T): the episode limit as a discounted per-state Q limit."""
    d = np.asarray(d, dtype=np.float64)
    if gamma == 1.0:
        return d.copy()
    return d * (1.0 - gamma ** horizon) / ((1.0 - gamma) * horizon)


# --------------------------------------------------------------------------- E-step (eqs. 8-9)
@dataclass
class DualTerms:
    """g(eta, lam) of eq. (9) with particle means, its gradient and Hessian, and q* at (eta, lam)."""

    eta: float
    value: float
    grad: np.ndarray        # [1 + p]: d/d eta, d/d lam_i
    hessian: np.ndarray     # [1 + p, 1 + p] (NaN when not asked for)
    weights: np.ndarray     # [B, K] softmax_k(A / eta)
    kl: float               # mean_b KL(q_b || pi) with pi the particles' uniform weights
    expected_cost: np.ndarray  # [p] mean_b E_q[Q_ci]


def dual_terms(eta: float, lam: np.ndarray, q_r: np.ndarray, q_c: np.ndarray, eps1: np.ndarray,
               eps2: float, hessian: bool = True) -> DualTerms:
    """Eq. (9) and its derivatives at (eta, lam); q_r [B, K], q_c [p, B, K], eps1 [p].

    Gradient (eq. 34, batch mean): dg/d eta = eps2 - mean_b KL(q_b || pi), dg/d lam_i = eps1_i -
    mean_b E_q[Q_ci]. Hessian (App. A.3, batch mean): d2g/d eta2 = Var_q(A) / eta^3, d2g/d eta
    d lam_i = Cov_q(Q_ci, A) / eta^2, d2g/d lam_i d lam_j = Cov_q(Q_ci, Q_cj) / eta.
    """
    K = q_r.shape[1]
    adv = q_r - np.tensordot(lam, q_c, axes=1)                       # A = Q_r - lam . Q_c, a new array
    z = adv / eta
    top = z.max(axis=1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(axis=1, keepdims=True)
    weights = e / total
    log_mean = (top + np.log(total))[:, 0] - math.log(K)             # log mean_k exp(A / eta)
    mean_adv = (weights * adv).sum(axis=1)
    kl = mean_adv / eta - log_mean                                   # KL(q_b || uniform particles)
    exp_cost = (weights[None] * q_c).sum(axis=2)                     # [p, B]
    value = float(lam @ eps1 + eta * eps2 + eta * log_mean.mean())
    grad = np.concatenate([[eps2 - kl.mean()], eps1 - exp_cost.mean(axis=1)])
    h = np.full((1 + len(lam), 1 + len(lam)), np.nan)
    if hessian:   # (App. A.3 prints the cross term with the opposite sign; central differences confirm this one)
        d_adv = adv - mean_adv[:, None]
        d_cost = q_c - exp_cost[:, :, None]
        h[0, 0] = (weights * d_adv ** 2).sum(axis=1).mean() / eta ** 3
        h[0, 1:] = h[1:, 0] = (weights[None] * d_cost * d_adv[None]).sum(axis=2).mean(axis=1) / eta ** 2
        h[1:, 1:] = np.einsum("bk,ibk,jbk->ij", weights, d_cost, d_cost) / (len(weights) * eta)
    return DualTerms(float(eta), value, grad, h, weights, float(kl.mean()), exp_cost.mean(axis=1))


@dataclass
class EStepSolution:
    eta: float
    lam: np.ndarray           # [p]
    weights: np.ndarray       # [B, K] q*(a_k | s_b), rows sum to 1
    kl: float                 # mean_b KL(q*_b || pi) (= eps2 when eta is interior)
    expected_cost: np.ndarray  # [p] mean_b E_q*[Q_ci] (= eps1_i when lam_i is interior)
    iterations: int
    residual: float           # scaled KKT residual at exit
    converged: bool           # residual <= tol
    slater: bool              # False when lam reached LAM_MAX (no feasible q in the KL ball)


def _residual(x: np.ndarray, terms: DualTerms, eps2: float, cost_scale: np.ndarray, upper: np.ndarray) -> float:
    """Scaled projected-gradient (KKT) residual of the box-constrained dual at x."""
    g = terms.grad
    if x[0] > ETA_MIN:
        r_eta = abs(g[0]) / eps2
    else:
        r_eta = max(0.0, -g[0]) / eps2                    # at the bound: KL below eps2 is fine
    g_lam = g[1:] / cost_scale
    interior = (x[1:] > 0) & (x[1:] < upper)
    r_lam = np.where(interior, np.abs(g_lam), np.where(x[1:] <= 0, np.maximum(0.0, -g_lam), np.maximum(0.0, g_lam)))
    return float(max(r_eta, r_lam.max(initial=0.0)))


def _optimal_eta(lam: np.ndarray, log_eta: float, q_r: np.ndarray, q_c: np.ndarray, eps1: np.ndarray, eps2: float,
                 tol: float) -> DualTerms:
    """The dual's terms at (eta*(lam), lam), eta*(lam) = argmin_eta g(eta, lam).

    dg/d eta = eps2 - KL(eta) increases with eta (d2g/d eta2 >= 0), so eta* is its root, or ETA_MIN
    when dg/d eta >= 0 there already (the KL bound does not bind). Safeguarded Newton in log eta
    inside a bracket, from `log_eta`; stops at |KL - eps2| <= tol eps2.
    """
    low, high = math.log(ETA_MIN), math.log(ETA_MAX)

    def at(u: float) -> DualTerms:
        return dual_terms(math.exp(u), lam, q_r, q_c, eps1, eps2)

    u = min(max(log_eta, low), high)
    terms = at(u)
    lo, hi, jump = (u, high, 2.0) if terms.grad[0] < 0 else (low, u, -2.0)
    while terms.grad[0] * jump < 0 and low < u < high:         # walk (doubling) until the root is bracketed
        u = min(max(u + jump, low), high)
        terms = at(u)
        if terms.grad[0] < 0:
            lo = u
        else:
            hi = u
        jump *= 2.0
    if u <= low and terms.grad[0] >= 0:
        return terms
    for _ in range(200):
        if abs(terms.grad[0]) <= tol * eps2 or hi - lo <= 1e-15 * max(1.0, abs(u)):
            break
        curvature = terms.hessian[0, 0] * math.exp(u)          # d(dg/d eta)/d log eta
        nxt = u - terms.grad[0] / curvature if curvature > 0 else 0.5 * (lo + hi)
        u = nxt if lo < nxt < hi else 0.5 * (lo + hi)
        terms = at(u)
        if terms.grad[0] < 0:
            lo = u
        else:
            hi = u
    return terms


def solve_estep_dual(q_r: np.ndarray, q_c: np.ndarray, cost_threshold: float | np.ndarray, kl_bound: float, *,
                     init: tuple[float, Any] | None = None, tol: float = ESTEP_TOL, max_iter: int = 100,
                     lam_max: float = LAM_MAX) -> EStepSolution:
    """Minimise the dual (9) over eta >= ETA_MIN, 0 <= lam <= lam_max.

    q_r [B, K]; q_c [B, K] (one constraint) or [p, B, K]; cost_threshold eps1 (scalar or [p]);
    kl_bound eps2 > 0; `init` = (eta, lam) warm start (default: eta = mean_b std_k(Q_r) /
    sqrt(2 eps2), the KL of a small Gaussian tilt, and lam = 0).

    h(lam) = min_eta g(eta, lam) is convex (a partial minimum of the jointly convex g, Theorem 2),
    with h' = dg/d lam at eta*(lam) (envelope theorem) and h'' the Schur complement H_ll -
    H_le H_ee^-1 H_el. eta*(lam) comes from a 1-D solve (`_optimal_eta`); lam from projected
    Newton steps on h with an Armijo line search (variables at a bound whose gradient points
    outward are held; a normalised gradient step, lengthened while h keeps falling, where h'' is
    singular, e.g. one-hot q*). Converged when the scaled KKT residual (module doc) <= tol.
    """
    q_r = np.asarray(q_r, dtype=np.float64)
    q_c = np.asarray(q_c, dtype=np.float64)
    q_c = q_c[None] if q_c.ndim == 2 else q_c
    if q_r.ndim != 2 or q_c.shape[1:] != q_r.shape:
        raise ValueError(f"q_r must be [batch, particles] and q_c [batch, particles] or [p, batch, particles]; got "
                         f"{q_r.shape} and {q_c.shape}")
    if not kl_bound > 0:
        raise ValueError(f"kl_bound must be > 0, got {kl_bound!r}")
    p = q_c.shape[0]
    eps1 = np.broadcast_to(np.asarray(cost_threshold, dtype=np.float64), (p,)).copy()
    eps2 = float(kl_bound)
    spread = q_c.std(axis=2).mean(axis=1)
    cost_scale = np.maximum(np.maximum(np.abs(eps1), spread), 1e-12)
    upper = np.full(p, float(lam_max))
    if init is None:
        eta0 = float(q_r.std(axis=1).mean()) / math.sqrt(2.0 * eps2)
        eta0, lam = (eta0 if eta0 > ETA_MIN else 1.0), np.zeros(p)
    else:
        eta0, lam = float(init[0]), np.broadcast_to(np.asarray(init[1], dtype=np.float64), (p,))
    lam = np.clip(lam, 0.0, upper)
    inner_tol = 0.1 * tol

    def solve_eta(point: np.ndarray, log_eta: float) -> DualTerms:
        return _optimal_eta(point, log_eta, q_r, q_c, eps1, eps2, inner_tol)

    terms = solve_eta(lam, math.log(max(eta0, ETA_MIN)))

    def residual_of(point: np.ndarray, t: DualTerms) -> float:
        return _residual(np.concatenate([[t.eta], point]), t, eps2, cost_scale, upper)

    residual = residual_of(lam, terms)
    it = 0
    for it in range(1, max_iter + 1):
        if residual <= tol:
            it -= 1
            break
        grad = terms.grad[1:]
        h = terms.hessian
        schur = h[1:, 1:] - (np.outer(h[1:, 0], h[0, 1:]) / h[0, 0] if terms.eta > ETA_MIN and h[0, 0] > 0 else 0.0)
        held = ((lam <= 0) & (grad > 0)) | ((lam >= upper) & (grad < 0))
        free = ~held
        newton, step = True, None
        try:
            hf = schur[np.ix_(free, free)]
            step = -np.linalg.solve(hf + 1e-12 * abs(np.trace(hf)) * np.eye(len(hf)), grad[free])
        except np.linalg.LinAlgError:
            newton = False
        if step is None or not np.all(np.isfinite(step)) or step @ grad[free] >= 0:
            newton, step = False, -grad[free] / max(float(np.abs(grad[free]).max()), 1e-300) * max(1.0, float(lam.max()))
        direction = np.zeros(p)
        direction[free] = step
        log_eta = math.log(terms.eta)

        def armijo(t: float) -> tuple[np.ndarray, DualTerms] | None:
            trial = np.clip(lam + t * direction, 0.0, upper)
            trial_terms = solve_eta(trial, log_eta)
            decrease = trial_terms.value - terms.value
            ok = np.isfinite(trial_terms.value) and (decrease <= 1e-4 * grad @ (trial - lam) or (
                decrease <= 1e-13 * (1.0 + abs(terms.value)) and residual_of(trial, trial_terms) < residual))
            return (trial, trial_terms) if ok else None

        t, found = 1.0, None
        for _ in range(80):
            found = armijo(t)
            if found is not None:
                break
            t *= 0.5
        if found is None:
            break  # no decrease representable in floating point: stop with the residual reached
        while not newton and t < 2.0 ** 60:
            longer = armijo(2.0 * t)
            if longer is None or longer[1].value >= found[1].value:
                break
            t, found = 2.0 * t, longer
        lam, terms = found
        residual = residual_of(lam, terms)
    return EStepSolution(terms.eta, lam.copy(), terms.weights, terms.kl, terms.expected_cost, it, residual,
                         residual <= tol, bool(lam.max(initial=0.0) < lam_max))


def estep_dual(q_r: np.ndarray, q_c: np.ndarray, cost_threshold: float | np.ndarray, kl_bound: float,
               init: tuple[float, Any] | None = None) -> tuple[float, Any, np.ndarray]:
    """(eta, lam, weights) of the E-step (eqs. 8-9) on particle values q_r, q_c [batch, particles].

    (eta, lam) minimise eq. (9) with the inner expectation over pi as the mean over the K
    particles (eta > 0, lam >= 0); weights [batch, particles] = softmax over particles of
    (q_r - lam q_c) / eta. lam is a float for q_c [B, K], an array [p] for q_c [p, B, K].
    """
    sol = solve_estep_dual(q_r, q_c, cost_threshold, kl_bound, init=init)
    lam = float(sol.lam[0]) if np.ndim(q_c) == 2 else sol.lam
    return sol.eta, lam, sol.weights


# --------------------------------------------------------------------------- M-step (eqs. 53-58)
def decoupled_kl(mean: torch.Tensor, log_std: torch.Tensor, old_mean: torch.Tensor,
                 old_log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_mu, C_Sigma) of eq. (53) for diagonal Gaussians: mean [B, n], log_std [n] (state-free).

    C_mu = mean_b 1/2 (mu - mu_old)^T Sigma_old^-1 (mu - mu_old); C_Sigma = 1/2 (tr(Sigma^-1 Sigma_old)
    - n + ln |Sigma| / |Sigma_old|). E_s KL(pi_old || pi) is C_Sigma plus C_mu with Sigma^-1 in
    place of Sigma_old^-1: equal to first order; the old covariance makes C_mu independent of Sigma.
    """
    c_mu = 0.5 * (((mean - old_mean) / old_log_std.exp()) ** 2).sum(-1).mean()
    ratio = torch.exp(2.0 * (old_log_std - log_std))
    c_sigma = 0.5 * (ratio.sum() - log_std.numel() + 2.0 * (log_std - old_log_std).sum())
    return c_mu, c_sigma


def _gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag(exp(log_std))^2), summed over action dims; actions [B, K, n], mean [B, n]."""
    z = (actions - mean[:, None]) / log_std.exp()
    return -0.5 * (z ** 2).sum(-1) - log_std.sum() - 0.5 * log_std.numel() * math.log(2 * math.pi)


def weighted_log_likelihood(mean: torch.Tensor, log_std: torch.Tensor, old_mean: torch.Tensor,
                            old_log_std: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k q*_bk [log N(a_bk; mu, Sigma_old) + log N(a_bk; mu_old, Sigma)] (App. B.1's decoupling)."""
    both = _gaussian_log_prob(actions, mean, old_log_std) + _gaussian_log_prob(actions, old_mean, log_std)
    return (weights * both).sum(-1).mean()


@dataclass
class MStepResult:
    log_likelihood: tuple[float, float]   # weighted log-likelihood before and after
    kl_mean: float                        # C_mu after the step
    kl_cov: float                         # C_Sigma after the step


def mstep(policy: "GaussianMLPPolicy", optimizer: torch.optim.Optimizer, obs: torch.Tensor, actions: torch.Tensor,
          weights: torch.Tensor, old_mean: torch.Tensor, old_log_std: torch.Tensor, duals: np.ndarray,
          settings: "CVPOSettings") -> MStepResult:
    """`settings.mstep_iters` primal-dual iterations on the Lagrangian (54), in place on `policy`
    and `duals` = [beta_mu, beta_Sigma]: eqs. (56)-(57) then one optimizer step on theta (58)."""
    bounds = np.array([settings.kl_mean, settings.kl_cov])
    rates = np.array([settings.dual_lr_mean, settings.dual_lr_cov])
    first = None
    for _ in range(settings.mstep_iters):
        mean, log_std = policy.mean(obs), policy.log_std
        c_mu, c_sigma = decoupled_kl(mean, log_std, old_mean, old_log_std)
        loglik = weighted_log_likelihood(mean, log_std, old_mean, old_log_std, actions, weights)
        first = float(loglik.detach()) if first is None else first
        kls = np.array([float(c_mu.detach()), float(c_sigma.detach())])
        duals[:] = np.maximum(0.0, duals - rates * (bounds - kls))                          # eqs. (56)-(57)
        lagrangian = loglik + duals[0] * (bounds[0] - c_mu) + duals[1] * (bounds[1] - c_sigma)   # eq. (54)
        optimizer.zero_grad(set_to_none=True)
        (-lagrangian).backward()
        optimizer.step()                                                                   # eq. (58)
    with torch.no_grad():
        mean, log_std = policy.mean(obs), policy.log_std
        c_mu, c_sigma = decoupled_kl(mean, log_std, old_mean, old_log_std)
        last = float(weighted_log_likelihood(mean, log_std, old_mean, old_log_std, actions, weights))
    return MStepResult((first, last), float(c_mu), float(c_sigma))


# --------------------------------------------------------------------------- critics and replay buffer
class QEnsemble(torch.nn.Module):
    """E independent ReLU MLPs Q_e(s, a) evaluated as one batched module: [N, in] -> [E, N]."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], members: int, generator: torch.Generator) -> None:
        super().__init__()
        sizes = [in_dim, *hidden, 1]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)   # torch.nn.Linear's default initialisation
            self.weights.append(torch.nn.Parameter((torch.rand(members, fan_in, fan_out, generator=generator) * 2 - 1) * bound))
            self.biases.append(torch.nn.Parameter((torch.rand(members, 1, fan_out, generator=generator) * 2 - 1) * bound))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_e(s_n, a_n): obs [N, o], actions [N, a] -> [E, N]."""
        return self._head(self._first(obs) + self._first(actions, obs.shape[-1]))

    @torch.no_grad()
    def particles(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_e(s_b, a_bk) for K actions per state: obs [B, o], actions [B, K, a] -> [E, B, K] (no gradients).

        The first layer's state part is computed once per state, not once per particle; the
        activations are applied in place (the same values as `forward`'s, without a copy of
        each [E, B K, hidden] layer)."""
        B, K, _ = actions.shape
        h = self._first(actions.reshape(B * K, -1), obs.shape[-1])
        h.view(-1, B, K, h.shape[-1]).add_(self._first(obs)[:, :, None])
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.baddbmm(b, h.relu_(), w)
        return h.squeeze(-1).reshape(-1, B, K)

    def _first(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x @ W1[rows offset.. offset + dim]: the first layer's part for these inputs, [E, N, h1] (bias with the states)."""
        w = self.weights[0][:, offset:offset + x.shape[-1]]
        out = torch.matmul(x.unsqueeze(0), w)
        return out + self.biases[0] if offset == 0 else out

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.baddbmm(b, torch.relu(h), w)
        return h.squeeze(-1)


class ReplayBuffer:
    """A ring buffer of transitions (s, a, r, c, s', m) with m = 0 after a termination."""

    FIELDS = ("obs", "actions", "reward", "cost", "next_obs", "mask")

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size, self.position = int(capacity), 0, 0
        self.data: dict[str, torch.Tensor] = {}

    def add(self, transitions: dict[str, torch.Tensor]) -> None:
        n = len(transitions["obs"])
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
                         for k, v in transitions.items()}
        for start in range(0, n, self.capacity):   # more than capacity at once: the last ones win
            chunk = {k: v[start:start + self.capacity] for k, v in transitions.items()}
            m = len(chunk["obs"])
            index = (self.position + torch.arange(m, device=chunk["obs"].device)) % self.capacity
            for k, v in chunk.items():
                self.data[k][index] = v
            self.position = (self.position + m) % self.capacity
            self.size = min(self.size + m, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        index = torch.randint(self.size, (batch_size,), generator=generator)
        return {k: v[index.to(v.device)] for k, v in self.data.items()}


def transitions(batch: "Batch", horizon: int) -> dict[str, torch.Tensor]:
    """The batch's transitions with a next state: step t of a copy alive at t, s' = obs[t + 1].

    The last row has no next state unless every copy terminated there (collect stops early
    only then), so the last step of a time-limited episode is left out.
    """
    T = batch.obs.shape[0]
    alive = batch.alive
    keep = alive.clone()
    mask = torch.zeros_like(alive, dtype=batch.obs.dtype)
    mask[:-1] = alive[1:].to(batch.obs.dtype)
    if T == horizon:
        keep[-1] = False
    next_obs = torch.cat([batch.obs[1:], batch.obs[-1:]], dim=0)
    return {"obs": batch.obs[keep], "actions": batch.actions[keep], "reward": batch.reward[keep],
            "cost": batch.cost[keep], "next_obs": next_obs[keep], "mask": mask[keep]}


# --------------------------------------------------------------------------- the operator
@dataclass(frozen=True)
class CVPOSettings:
    """Options of CVPO (schema block `operator_cvpo`; reference A4 for the released values).

    particles K, batch_size B, replay_ratio (updates per step = ceil(replay_ratio * new
    transitions / B)), estep_kl eps2, kl_mean eps_mu, kl_cov eps_Sigma, mstep_iters M (primal-dual
    iterations per update), dual_lr_mean / dual_lr_cov alpha_mu / alpha_Sigma (eqs. 56-57),
    actor_lr / critic_lr (Adam), critic_hidden, polyak rho (eq. 59), buffer_size, critic_init:
    "fresh" (random critics on a new task) or "monte_carlo" (first fitted to the first batch's
    discounted returns-to-go by `updates` regression steps, then the TD updates).
    """

    block: ClassVar[str] = "operator_cvpo"

    particles: int
    batch_size: int
    replay_ratio: float
    estep_kl: float
    kl_mean: float
    kl_cov: float
    mstep_iters: int
    dual_lr_mean: float
    dual_lr_cov: float
    actor_lr: float
    critic_lr: float
    critic_hidden: list[int]
    polyak: float
    buffer_size: int
    critic_init: str
    gamma: float | None


def _mean_of(values: list) -> Any:
    return np.mean(np.asarray(values, dtype=np.float64), axis=0) if values else np.nan


class CVPO(AdaptationOperator):
    """One CVPO step (E/M with replay) per adaptation step; state: buffer, critics, multipliers."""

    name = "cvpo"
    kinds = ("sampled",)
    Settings = CVPOSettings
    step_vars = {
        "eta": Var((), "E-step temperature eta* (mean over the step's updates)", "Q units"),
        "estep_kl": Var((), "E-step mean_s KL(q* || pi_k) over particles (eps2 when eta* is interior)", "nats"),
        "estep_cost": Var(("constraint",), "E-step mean_s E_q*[Q_c] in episode-cost units, x (1-gamma)T/(1-gamma^T) "
                                           "(<= d when the E-step is feasible)", "cost"),
        "estep_infeasible": Var((), "fraction of the step's E-steps with lam at its bound (Slater violated)", "1"),
        "mstep_kl_mean": Var((), "M-step C_mu: mean part of E_s KL(pi_k || pi_k+1) on the step's states", "nats"),
        "mstep_kl_cov": Var((), "M-step C_Sigma: covariance part of E_s KL(pi_k || pi_k+1)", "nats"),
        "updates": Var((), "gradient updates (critics, E-step, M-step) in the step", "1", 0.0),
    }

    @classmethod
    def check_options(cls, settings: CVPOSettings, given: frozenset[str] = frozenset()) -> None:
        from ..plugins import OptionError

        if settings.batch_size > settings.buffer_size:
            raise OptionError("batch_size", f"batch_size {settings.batch_size} exceeds buffer_size {settings.buffer_size}")

    def _gamma(self) -> float:
        """Discount of the critics and of eps1: the option, or the scenario's."""
        return self.scenario.sampling.gamma if self.settings.gamma is None else self.settings.gamma

    def return_kind(self) -> str:
        return super().return_kind() + " (the stochastic exploration policy whose rollouts fill the replay buffer)"

    def start(self, task, policy, seed: int):
        from ..policies import GaussianMLPPolicy
        from ..rollout import derived_seed

        if not isinstance(policy, GaussianMLPPolicy):
            raise TypeError(f"CVPO adapts Gaussian policies (continuous actions); got {type(policy).__name__}")
        state = super().start(task, policy, seed)
        s = self.settings
        env = self.scenario.distribution.make_env(task, 1, derived_seed(seed, 0), "cpu")
        obs_dim, act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
        gamma = self._gamma()
        p = len(state.limits)
        state.horizon = int(env.horizon)
        state.eps1 = cost_threshold(state.limits, gamma, state.horizon)
        state.generator = torch.Generator().manual_seed(derived_seed(seed, 1))
        device = self.scenario.device
        state.critics = QEnsemble(obs_dim + act_dim, tuple(s.critic_hidden), REWARD_MEMBERS + p, state.generator).to(device)
        state.targets = QEnsemble(obs_dim + act_dim, tuple(s.critic_hidden), REWARD_MEMBERS + p, state.generator).to(device)
        state.targets.load_state_dict(state.critics.state_dict())   # (its own draws are overwritten)
        state.targets.requires_grad_(False)
        state.critic_optimizer = torch.optim.Adam(state.critics.parameters(), lr=s.critic_lr)
        state.actor_optimizer = None       # Adam moments of the policy (state_dict), carried between steps
        state.buffer = ReplayBuffer(s.buffer_size)
        state.dual = None                  # E-step (eta, lam) warm start
        state.mstep_duals = np.zeros(2)    # beta_mu, beta_Sigma
        return state

    def observe(self, state, policy, seed: int) -> Observation:
        batch = self.scenario.rollout(state.task, policy, seed)
        return Observation(float(batch.episode_reward.mean()), batch.constraint_value.double().cpu().numpy(),
                           batch.constraint_value_se.double().cpu().numpy(), batch.sampling_time,
                           int(batch.alive.sum()), batch)

    # ---- one adaptation step
    def step(self, state, policy, observation: Observation) -> Step:
        s = self.settings
        batch: Batch = observation.data
        new = transitions(batch, state.horizon)
        first = state.buffer.size == 0
        state.buffer.add(new)
        updates = max(1, math.ceil(s.replay_ratio * len(new["obs"]) / s.batch_size))
        if first and s.critic_init == "monte_carlo":
            self._fit_monte_carlo(state, batch, updates)

        adapted = type(policy).from_checkpoint(policy.to_checkpoint())
        optimizer = torch.optim.Adam(adapted.parameters(), lr=s.actor_lr)
        if state.actor_optimizer is not None:
            optimizer.load_state_dict(state.actor_optimizer)
        old_log_std = policy.log_std.detach().clone()
        log: dict[str, list] = {k: [] for k in ("eta", "lam", "kl", "cost", "slater")}
        for _ in range(updates):
            sample = state.buffer.sample(s.batch_size, state.generator)
            self._critic_update(state, adapted, sample)
            obs = sample["obs"]
            with torch.no_grad():
                old_mean = policy.mean(obs)
                noise = torch.randn((len(obs), s.particles, old_mean.shape[-1]), generator=state.generator)
                particles = old_mean[:, None] + old_log_std.exp() * noise.to(old_mean.device)
                q_r, q_c = self._particle_values(state, obs, particles)
            sol = solve_estep_dual(q_r, q_c, state.eps1, s.estep_kl, init=state.dual)
            state.dual = (sol.eta, sol.lam.copy())
            for key, value in (("eta", sol.eta), ("lam", sol.lam), ("kl", sol.kl), ("cost", sol.expected_cost),
                               ("slater", sol.slater)):
                log[key].append(value)
            weights = torch.as_tensor(sol.weights, dtype=old_mean.dtype, device=old_mean.device)
            mstep(adapted, optimizer, obs, particles, weights, old_mean, old_log_std, state.mstep_duals, s)
            self._polyak(state)
        state.actor_optimizer = optimizer.state_dict()

        alive = batch.alive
        states, nu = batch.obs[alive], batch.visitation()[alive]
        with torch.no_grad():
            c_mu, c_sigma = decoupled_kl(adapted.mean(states), adapted.log_std, policy.mean(states), old_log_std)
            kl = float((nu * policy.kl(states, adapted.distribution(states))).sum())   # E_nu KL(new || old)
        gamma = self._gamma()
        to_episode = 1.0 if gamma == 1.0 else (1.0 - gamma) * state.horizon / (1.0 - gamma ** state.horizon)
        record = {"eta": _mean_of(log["eta"]), "estep_kl": _mean_of(log["kl"]),
                  "estep_cost": _mean_of(log["cost"]) * to_episode,
                  "estep_infeasible": 1.0 - _mean_of(log["slater"]),
                  "mstep_kl_mean": float(c_mu), "mstep_kl_cov": float(c_sigma), "updates": float(updates)}
        return Step(adapted, _mean_of(log["lam"]), kl, record)

    def _critic_update(self, state, policy, sample: dict[str, torch.Tensor]) -> None:
        """One Adam step on the summed mean-squared Bellman errors (eqs. 49-52)."""
        gamma = self._gamma()
        with torch.no_grad():
            dist = policy.distribution(sample["next_obs"])
            mean, std = dist.base_dist.loc, dist.base_dist.scale
            next_actions = mean + std * torch.randn(mean.shape, generator=state.generator).to(mean.device)
            q_next = state.targets(sample["next_obs"], next_actions)                      # [E, B]
            bootstrap = torch.cat([q_next[:REWARD_MEMBERS].min(0, keepdim=True).values, q_next[REWARD_MEMBERS:]])
            signal = torch.cat([sample["reward"][None], sample["cost"].T])                  # [1 + p, B]
            target = signal + gamma * sample["mask"][None] * bootstrap
            target = torch.cat([target[:1].expand(REWARD_MEMBERS, -1), target[1:]])
        q = state.critics(sample["obs"], sample["actions"])
        loss = ((q - target) ** 2).mean(1).sum()
        state.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.critic_optimizer.step()

    def _fit_monte_carlo(self, state, batch: "Batch", steps: int) -> None:
        """Regress the critics on the first batch's discounted returns-to-go, then copy to the targets."""
        from ..rollout import returns_to_go

        alive, gamma = batch.alive, self._gamma()
        obs, actions = batch.obs[alive], batch.actions[alive]
        q_reward, q_cost = returns_to_go(batch.reward, alive, gamma)[alive], returns_to_go(batch.cost, alive, gamma)[alive]
        y = torch.cat([q_reward[None].expand(REWARD_MEMBERS, -1), q_cost.T]).to(obs.dtype)
        for _ in range(steps):
            index = torch.randint(len(obs), (self.settings.batch_size,), generator=state.generator).to(obs.device)
            loss = ((state.critics(obs[index], actions[index]) - y[:, index]) ** 2).mean(1).sum()
            state.critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.critic_optimizer.step()
        state.targets.load_state_dict(state.critics.state_dict())

    @staticmethod
    def _particle_values(state, obs: torch.Tensor, particles: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Target-critic values at the particles: Q_r as the ensemble min [B, K], Q_c [p, B, K]."""
        q = state.targets.particles(obs, particles).double().cpu().numpy()
        return q[:REWARD_MEMBERS].min(0), q[REWARD_MEMBERS:]

    def _polyak(self, state) -> None:
        rho = self.settings.polyak
        with torch.no_grad():
            for target, online in zip(state.targets.parameters(), state.critics.parameters()):
                target.mul_(rho).add_(online, alpha=1.0 - rho)
