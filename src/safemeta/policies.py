"""Policies and their checkpoint form (what `policy.pt` holds).

Every policy is a softmax policy in the paper's sense (section 2) with f = log pi.
- `TabularSoftmaxPolicy`: pi(.|s) = softmax(logits[s]), for the exact algorithms.
- `GaussianMLPPolicy` (continuous actions, App. D.2: 2 hidden layers of 64, tanh) and
  `CategoricalMLPPolicy` (discrete actions) for sampled environments: batch-evaluable torch
  modules, also usable functionally with explicit parameters (TRPO, meta-gradients).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

POLICY_FORMAT = "safemeta.policy/1"


class TabularSoftmaxPolicy:
    """pi(.|s) = softmax(logits[s]) for the exact algorithms.

    `logits` are unnormalised scores, or log-probabilities already (`normalized=True`: an
    adapted policy's closed form, or a policy read from policy.pt), whose probabilities are
    exp(logits) as given.
    """

    kind = "tabular_softmax"

    def __init__(self, logits: np.ndarray, normalized: bool = False) -> None:
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2:
            raise ValueError(f"tabular logits must be [S, A]; got shape {logits.shape}")
        self.logits, self.normalized = logits, bool(normalized)

    def probs(self) -> np.ndarray:
        """pi as an [S, A] array (log-softmax of the scores, or exp of the log-probabilities)."""
        if self.normalized:
            return np.exp(self.logits)
        return torch.log_softmax(torch.from_numpy(self.logits), dim=-1).exp().numpy()

    def to_checkpoint(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "kind": self.kind, "logits": torch.from_numpy(self.logits.copy())}

    @classmethod
    def from_checkpoint(cls, obj: dict[str, Any]) -> "TabularSoftmaxPolicy":
        """The stored scores, as normalised log-probabilities."""
        logits = obj["logits"].numpy()
        return cls(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True), normalized=True)


# --------------------------------------------------------------------------- neural policies
def _mlp(sizes: list[int], activation: type[torch.nn.Module] = torch.nn.Tanh, bias: bool = True) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(activation())
    return torch.nn.Sequential(*layers)


def _forward(mlp: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) with its Linear layers called as torch.nn.functional.linear (the same kernels,
    without the per-module call overhead that dominates at a task's few rows)."""
    for layer in mlp:
        x = torch.nn.functional.linear(x, layer.weight, layer.bias) if isinstance(layer, torch.nn.Linear) else layer(x)
    return x


LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def normal_log_prob(actions: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, diag(scale)^2) summed over the last dim: torch.distributions'
    Independent(Normal(mean, scale), 1).log_prob, operation for operation (the same bits)."""
    return (-((actions - mean) ** 2) / (2 * scale ** 2) - scale.log() - LOG_SQRT_2PI).sum(-1)


class NeuralPolicy(torch.nn.Module):
    """A softmax policy (f = log pi) given by a torch module; usable functionally.

    `params` arguments are dicts name -> tensor (torch.func.functional_call); `flat()` and
    `unflatten()` convert to and from one flat vector (TRPO works on flat vectors).
    """

    kind = ""

    def distribution(self, obs: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        raise NotImplementedError

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        """log pi(a|s) = f(s, a), summed over action dimensions."""
        raise NotImplementedError

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions a ~ pi(.|s) for the rows of obs and their log-probabilities (no gradients)."""
        return self.sample_blocks(obs, [generator])

    def sample_blocks(self, obs: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample` of each of len(generators) equal consecutive blocks of rows with its own
        generator: block k's actions and log-probabilities are those its rows alone give.

        One forward pass per block, on a fresh copy of its rows: the CPU's matrix products
        (MKL) round differently with the number of rows (and the data's alignment), so one
        pass over all blocks would not reproduce a block's own actions bit for bit."""
        with torch.no_grad():
            parts = [self._sample_rows(rows.clone(), g) for rows, g in zip(obs.chunk(len(generators)), generators)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([a for a, _ in parts]), torch.cat([lp for _, lp in parts])

    def _sample_rows(self, obs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions for the rows of obs drawn from `generator`, and their log-probabilities."""
        raise NotImplementedError

    def kl(self, obs: torch.Tensor, reference, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """KL(reference(.|s) || pi_params(.|s)) per state; `reference` is a detached distribution."""
        return torch.distributions.kl_divergence(reference, self.distribution(obs, params))

    def to_checkpoint(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "kind": self.kind, "config": dict(self.config),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, obj: dict[str, Any]) -> "NeuralPolicy":
        cfg = {k: tuple(v) if k == "hidden" else v for k, v in obj["config"].items()}
        policy = cls(**cfg)
        policy.load_state_dict(obj["state_dict"])
        return policy

    def named_params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, p in self.named_parameters():
            out[name] = flat[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return out

    def load_flat(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for (_, p), v in zip(self.named_parameters(), self.unflatten(flat).values()):
                p.copy_(v)

    def _call(self, module: torch.nn.Module, prefix: str, obs: torch.Tensor, params: dict[str, torch.Tensor] | None):
        if params is None:
            return module(obs)
        sub = {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + ".")}
        return torch.func.functional_call(module, sub, (obs,))


class GaussianMLPPolicy(NeuralPolicy):
    """pi(a|s) = N(mu(s), diag(exp(log_std))^2): mu an MLP (tanh hidden layers), log_std state-free.

    f_phi(s, a) = log pi(a|s) (the paper's softmax form with normalised f). Actions are sampled
    unbounded; environments clip them to their control range.
    """

    kind = "gaussian_mlp"

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (64, 64), init_log_std: float = -0.5) -> None:
        super().__init__()
        self.config = {"obs_dim": int(obs_dim), "act_dim": int(act_dim), "hidden": list(hidden),
                       "init_log_std": float(init_log_std)}
        self.mean = _mlp([obs_dim, *hidden, act_dim])
        self.log_std = torch.nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def distribution(self, obs, params=None):
        mean = self._call(self.mean, "mean", obs, params)
        log_std = self.log_std if params is None else params["log_std"]
        normal = torch.distributions.Normal(mean, log_std.exp().expand_as(mean), validate_args=False)
        return torch.distributions.Independent(normal, 1, validate_args=False)

    def log_prob(self, obs, actions, params=None):
        return self.distribution(obs, params).log_prob(actions)

    def sample_blocks(self, obs, generators):
        """The base class's contract, with one forward pass per block (the matrix products) and
        the draws' arithmetic (mean + std noise, the log-density) once over all rows: elementwise
        operations, and a row sum over act_dim, round the same for any number of rows."""
        with torch.no_grad():
            means = [_forward(self.mean, rows.clone()) for rows in obs.chunk(len(generators))]
            noise = [torch.randn(m.shape, generator=g, dtype=m.dtype) for m, g in zip(means, generators)]
            mean = means[0] if len(means) == 1 else torch.cat(means)
            noise = (noise[0] if len(noise) == 1 else torch.cat(noise)).to(mean.device)
            scale = self.log_std.exp().expand_as(mean)
            actions = mean + scale * noise
            return actions, normal_log_prob(actions, mean, scale)

    def rsample(self, obs: torch.Tensor, noise: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Reparameterised actions mean(s) + std * noise, differentiable in the parameters and in obs
        (`noise`: standard normal, shape [..., act_dim], drawn by the caller)."""
        dist = self.distribution(obs, params)
        return dist.base_dist.loc + dist.base_dist.scale * noise.to(obs.device, obs.dtype)


class CategoricalMLPPolicy(NeuralPolicy):
    """pi(.|s) = softmax(logits(s)); with no hidden layers and one-hot states it is a tabular softmax."""

    kind = "categorical_mlp"

    def __init__(self, obs_dim: int, num_actions: int, hidden: tuple[int, ...] = (64, 64)) -> None:
        super().__init__()
        self.config = {"obs_dim": int(obs_dim), "num_actions": int(num_actions), "hidden": list(hidden)}
        self.logits = _mlp([obs_dim, *hidden, num_actions], bias=bool(hidden))

    def distribution(self, obs, params=None):
        return torch.distributions.Categorical(logits=self._call(self.logits, "logits", obs, params), validate_args=False)

    def log_prob(self, obs, actions, params=None):
        return self.distribution(obs, params).log_prob(actions)

    def _sample_rows(self, obs, generator):
        dist = self.distribution(obs)
        actions = torch.multinomial(dist.probs.cpu(), 1, generator=generator).squeeze(-1).to(obs.device)
        return actions, dist.log_prob(actions)


def policy_for(observation_space: Any, action_space: Any, hidden: tuple[int, ...] = (64, 64),
               init_log_std: float = -0.5) -> NeuralPolicy:
    """The policy class for an environment's spaces: Box actions -> Gaussian, Discrete -> categorical."""
    obs_dim = int(np.prod(observation_space.shape))
    if hasattr(action_space, "n"):
        return CategoricalMLPPolicy(obs_dim, int(action_space.n), tuple(hidden))
    return GaussianMLPPolicy(obs_dim, int(np.prod(action_space.shape)), tuple(hidden), init_log_std)


_KINDS = {cls.kind: cls for cls in (TabularSoftmaxPolicy, GaussianMLPPolicy, CategoricalMLPPolicy)}


def policy_from_checkpoint(obj: dict[str, Any]):
    """Rebuild a policy from what `to_checkpoint()` returned (the content of policy.pt)."""
    if not isinstance(obj, dict) or obj.get("format") != POLICY_FORMAT:
        raise ValueError(f"not a safemeta policy checkpoint (expected format {POLICY_FORMAT!r})")
    if obj.get("kind") not in _KINDS:
        raise ValueError(f"unknown policy kind {obj.get('kind')!r}; known: {sorted(_KINDS)}")
    return _KINDS[obj["kind"]].from_checkpoint(obj)
