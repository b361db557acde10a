"""Trust-region step shared by meta-training and the baselines (TRPO, Schulman et al. 2015).

Given the gradient g of an objective to maximise, a Fisher-vector product v -> F v and the
mean-KL function of a candidate, `trpo_step` solves F x = g by conjugate gradient, scales the
step to the KL radius (step = sqrt(2 max_kl / x^T F x) x), and backtracks until the candidate
satisfies both the KL bound and an improvement check. All vectors are flat float tensors.
The Fisher-vector product and mean KL of a tabular softmax (exact scenarios) live here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .policies import NeuralPolicy

Vector = torch.Tensor


def flat_grad(output: torch.Tensor, params: list[torch.Tensor], **kwargs) -> Vector:
    """d output / d params as one flat vector (zeros for parameters it does not depend on)."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def fisher_vector_product(policy: NeuralPolicy, obs: torch.Tensor, weights: torch.Tensor) -> Callable[[Vector], Vector]:
    """v -> F v with F the Hessian, at the current parameters, of sum_s w(s) KL(pi_current(.|s) || pi_theta(.|s)).

    That Hessian is the Fisher information of the policy under the state weights w (for TRPO
    the normalised visitation), computed by double back-propagation.
    """
    params = list(policy.parameters())
    with torch.no_grad():
        reference = policy.distribution(obs)
    kl = (weights * policy.kl(obs, reference)).sum()
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v: Vector) -> Vector:
        return flat_grad(grad_kl @ v, params, retain_graph=True)

    return fvp


def softmax_fisher_vector_product(probs: np.ndarray, weights: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> F v for a tabular softmax: F = sum_s w(s) (diag pi_s - pi_s pi_s^T), v flat [S*A]."""
    pi = torch.from_numpy(probs)
    w = torch.from_numpy(weights)[:, None]

    def fvp(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(pi.shape)
        return (w * pi * (v - (pi * v).sum(-1, keepdim=True))).reshape(-1)

    return fvp


def mean_kl(old_probs: np.ndarray, weights: np.ndarray, new_logits: np.ndarray) -> float:
    """sum_s w(s) KL(pi_old(.|s) || pi_new(.|s)) (w sums to 1 for a visitation distribution)."""
    log_new = new_logits - np.logaddexp.reduce(new_logits, axis=-1, keepdims=True)
    log_old = np.log(np.clip(old_probs, 1e-300, None))
    return float((weights * (old_probs * (log_old - log_new)).sum(-1)).sum())


def conjugate_gradient(fvp: Callable[[Vector], Vector], b: Vector, iters: int = 10,
                       residual_tol: float = 1e-10) -> Vector:
    """Approximately solve F x = b for symmetric positive (semi-)definite F, from x = 0.

    Stops after `iters` iterations or when ||r||^2 <= residual_tol * ||b||^2 (relative, so
    small gradients are solved as well as large ones).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    direction = b.clone()
    rr = r @ r
    stop = residual_tol * rr
    for _ in range(iters):
        if rr <= stop:
            break
        Fd = fvp(direction)
        alpha = rr / (direction @ Fd)
        x = x + alpha * direction
        r = r - alpha * Fd
        rr_new = r @ r
        direction = r + (rr_new / rr) * direction
        rr = rr_new
    return x


@dataclass
class TRPOStep:
    params: Vector            # accepted parameters (the old ones if nothing was accepted)
    accepted: bool
    kl: float                 # mean KL of the accepted step (0 if none)
    improvement: float        # objective(new) - objective(old)
    expected_improvement: float  # g . step of the accepted fraction (first-order prediction)
    step_fraction: float      # backtracking fraction that was accepted (0 if none)


def trpo_step(params: Vector, grad: Vector, fvp: Callable[[Vector], Vector],
              objective: Callable[[Vector], float], kl: Callable[[Vector], float], max_kl: float, *,
              cg_iters: int = 10, damping: float = 1e-2, backtrack_steps: int = 10,
              backtrack_ratio: float = 0.5, min_improvement_ratio: float = 0.0) -> TRPOStep:
    """One TRPO step that maximises `objective` within mean KL <= max_kl.

    A candidate is accepted when kl(candidate) <= max_kl and
    objective(candidate) - objective(params) > min_improvement_ratio * expected improvement
    (and > 0). `damping` adds damping * v to the Fisher-vector product (Tikhonov).
    """
    if not torch.isfinite(grad).all():
        raise FloatingPointError("TRPO: the gradient has non-finite entries")
    if float(grad.norm()) == 0.0:
        return TRPOStep(params, False, 0.0, 0.0, 0.0, 0.0)

    def damped(v: Vector) -> Vector:
        return fvp(v) + damping * v

    x = conjugate_gradient(damped, grad, iters=cg_iters)
    quad = float(x @ damped(x))
    if not quad > 0:
        raise FloatingPointError(f"TRPO: non-positive curvature x^T F x = {quad:.3g}")
    full_step = (2.0 * max_kl / quad) ** 0.5 * x
    expected_full = float(grad @ full_step)
    base = objective(params)
    fraction = 1.0
    for _ in range(backtrack_steps):
        candidate = params + fraction * full_step
        step_kl = kl(candidate)
        improvement = objective(candidate) - base
        expected = fraction * expected_full
        if step_kl <= max_kl and improvement > 0 and improvement > min_improvement_ratio * expected:
            return TRPOStep(candidate, True, step_kl, improvement, expected, fraction)
        fraction *= backtrack_ratio
    return TRPOStep(params, False, 0.0, 0.0, 0.0, 0.0)
