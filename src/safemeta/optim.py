"""Trust-region step shared by meta-training and the baselines (TRPO, Schulman et al. 2015).

Given the gradient g of an objective to maximise, a Fisher-vector product v -> F v and the
mean-KL function of a candidate, `trpo_step` solves F x = g by conjugate gradient, scales the
step to the KL radius (step = sqrt(2 max_kl / x^T F x) x), and backtracks until the candidate
satisfies both the KL bound and an improvement check. All vectors are flat float tensors.

Fisher-vector products. F = sum_s w(s) d^2/dtheta^2 KL(pi_current(.|s) || pi_theta(.|s)) at the
current parameters, the Fisher information under the state weights w. For a policy whose
distribution at s is given by network outputs z(s) (a Gaussian's mean with a state-free
log-std, a categorical's logits), F = sum_s w(s) J_s^T M_s J_s exactly (Gauss-Newton form,
Martens 2014): J_s = dz(s)/dtheta and M_s the Fisher of the distribution in z (1/sigma^2 for a
Gaussian mean, 2 per log-std, diag(p) - p p^T for logits). `fisher_vector_product` computes
J v forward through the network (tangents), then J^T (w M J v) backward, with the activations
of one forward pass kept: about one forward and one backward pass per product, against the
double back-propagation of the KL (`autograd_fisher_vector_product`, the reference for any
other policy). `subsample` < 1 estimates F on a random fraction of the states (as common TRPO
implementations do), their weights rescaled to the full batch's total.
The Fisher-vector product and mean KL of a tabular softmax (exact scenarios) live here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .policies import CategoricalMLPPolicy, GaussianMLPPolicy, NeuralPolicy

Vector = torch.Tensor


def flat_grad(output: torch.Tensor, params: list[torch.Tensor], **kwargs) -> Vector:
    """d output / d params as one flat vector (zeros for parameters it does not depend on)."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def autograd_fisher_vector_product(policy: NeuralPolicy, obs: torch.Tensor, weights: torch.Tensor
                                   ) -> Callable[[Vector], Vector]:
    """v -> F v (module docstring) by double back-propagation of sum_s w(s) KL(pi_current || pi_theta)."""
    params = list(policy.parameters())
    with torch.no_grad():
        reference = policy.distribution(obs)
    kl = (weights * policy.kl(obs, reference)).sum()
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v: Vector) -> Vector:
        return flat_grad(grad_kl @ v, params, retain_graph=True)

    return fvp


def fisher_vector_product(policy: NeuralPolicy, obs: torch.Tensor, weights: torch.Tensor, *,
                          subsample: float = 1.0, seed: int | None = None) -> Callable[[Vector], Vector]:
    """v -> F v with F the Fisher of `policy` under the state weights (module docstring): the
    Gauss-Newton product for the MLP policies, double back-propagation for any other.

    `subsample` in (0, 1]: F estimated on ceil(subsample * M) of the M states, drawn without
    replacement by a generator seeded with `seed` (required then), weights rescaled so that
    they sum to the full batch's total.
    """
    obs, weights = subsample_states(obs, weights, subsample, seed)
    network = _tanh_mlp(policy)
    if network is None:
        return autograd_fisher_vector_product(policy, obs, weights)
    return _gauss_newton_product(policy, network, obs, weights)


def subsample_states(obs: torch.Tensor, weights: torch.Tensor, fraction: float, seed: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `fraction` of the rows of obs [M, ...] and their weights [M], rescaled to the same sum."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"Fisher subsample must lie in (0, 1], got {fraction!r}")
    total = obs.shape[0]
    keep = math.ceil(fraction * total)
    if keep >= total:
        return obs, weights
    if seed is None:
        raise ValueError("a Fisher subsample needs a seed")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    rows = torch.randperm(total, generator=generator)[:keep].sort().values.to(obs.device)
    part = weights[rows]
    return obs[rows], part * (weights.sum() / part.sum())


def _tanh_mlp(policy: NeuralPolicy) -> list[torch.nn.Linear] | None:
    """The linear layers of the policy's output network when it is Linear (Tanh Linear)*, the
    family the Gauss-Newton product handles; None otherwise."""
    if isinstance(policy, GaussianMLPPolicy):
        layers = list(policy.mean)
    elif isinstance(policy, CategoricalMLPPolicy):
        layers = list(policy.logits)
    else:
        return None
    if len(layers) % 2 == 0 or not all(isinstance(m, torch.nn.Linear) for m in layers[0::2]) \
            or not all(isinstance(m, torch.nn.Tanh) for m in layers[1::2]):
        return None
    return layers[0::2]


def _gauss_newton_product(policy: NeuralPolicy, linear: list[torch.nn.Linear], obs: torch.Tensor,
                          weights: torch.Tensor) -> Callable[[Vector], Vector]:
    """F v = sum_s w(s) J_s^T M_s J_s v for a Linear-Tanh network z(s) (module docstring)."""
    with torch.no_grad():
        inputs, slopes = [obs], []              # each layer's input; tanh'(pre-activation) = 1 - h^2
        h = obs
        for i, layer in enumerate(linear):
            z = torch.nn.functional.linear(h, layer.weight, layer.bias)
            if i < len(linear) - 1:
                h = torch.tanh(z)
                inputs.append(h)
                slopes.append(1.0 - h * h)
        if isinstance(policy, GaussianMLPPolicy):
            inv_var = torch.exp(-2.0 * policy.log_std)
            metric = lambda t: t * (weights[:, None] * inv_var)      # noqa: E731  w M t, M = diag(1/sigma^2)
        else:
            probs = torch.softmax(z, dim=-1)
            metric = lambda t: weights[:, None] * probs * (t - (probs * t).sum(-1, keepdim=True))  # noqa: E731
        total_weight = weights.sum()
    named = list(policy.named_parameters())
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    owner = {id(p): (i, kind) for i, layer in enumerate(linear)
             for kind, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None}
    slot = {n: owner[id(p)] for n, p in named if id(p) in owner}    # parameter name -> (layer, "weight" | "bias")

    def fvp(v: Vector) -> Vector:
        with torch.no_grad():
            parts = {n: piece.reshape(shape) for n, piece, shape in zip(names, torch.split(v, sizes), shapes)}
            tangent = {slot[n]: parts[n] for n in slot}
            t = None                             # J v, forward through the layers
            for i, layer in enumerate(linear):
                dz = torch.nn.functional.linear(inputs[i], tangent[(i, "weight")], tangent.get((i, "bias")))
                if t is not None:
                    dz = dz + t @ layer.weight.T
                t = dz * slopes[i] if i < len(linear) - 1 else dz
            u = metric(t)                        # w M J v, then J^T of it backward
            grads = {}
            for i in range(len(linear) - 1, -1, -1):
                grads[(i, "weight")] = u.T @ inputs[i]
                if linear[i].bias is not None:
                    grads[(i, "bias")] = u.sum(0)
                if i > 0:
                    u = (u @ linear[i].weight) * slopes[i - 1]
            out = []
            for n in names:
                if n in slot:
                    out.append(grads[slot[n]].reshape(-1))
                elif n == "log_std":             # state-free: M = 2 per dimension
                    out.append(2.0 * total_weight * parts[n].reshape(-1))
                else:
                    raise AssertionError(f"parameter {n} outside the Gauss-Newton product")
            return torch.cat(out)

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
