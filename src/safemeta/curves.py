"""Learning-curve metrics of CGPO's Table 1 (Dai et al. 2024, App. F.2), as intended.

- Conv. Steps (F.2.1): the environment step of the first update i from which the return stays
  within `threshold` of returns[i] for a whole window of `window` updates (i..i+window-1, all
  present), and whose constraint value is feasible (<= limit). The printed
  `find_convergence_point` returns inside its inner loop at the first j that does not break, so it
  compares returns[i+1] with returns[i] only (a `for ... else` was intended); and a window that
  runs past the end of the curve counts as converged there. `convergence_step` checks the whole
  window and needs it complete. -1: no such point.
- Vio. Ratio (F.2.2): among the updates in the safety-critical area (constraint > limit -
  critic_area_radius), the fraction that violate (constraint > limit + soft_margin); -1 when no
  update enters the area. As printed, except that `soft_margin` may be an array (one margin per
  update, e.g. a multiple of the estimate's standard error).
The paper gives no values for window, threshold, critic_area_radius or soft_margin; the Table 1
benchmark states the ones it uses.
"""
from __future__ import annotations

import numpy as np


def convergence_step(env_steps: np.ndarray, returns: np.ndarray, constraints: np.ndarray, limit: float,
                     window: int, threshold: float) -> float:
    """Conv. Steps with the whole window checked (see the module docstring); -1 if none."""
    returns, constraints = np.asarray(returns, float), np.asarray(constraints, float)
    for i in range(len(returns) - window + 1):
        if constraints[i] <= limit and np.all(np.abs(returns[i:i + window] - returns[i]) <= threshold):
            return float(env_steps[i])
    return -1.0


def printed_convergence_step(env_steps, returns, constraints, constraint_threshold, window_size, threshold):
    """`find_convergence_point` exactly as App. F.2.1 prints it (for comparison)."""
    for i in range(len(returns)):
        for j in range(i + 1, min(i + window_size, len(returns))):
            if (np.abs(returns[j] - returns[i]) > threshold) or (constraints[i] > constraint_threshold):
                break
            else:
                return env_steps[i]
    return -1


def violation_ratio(constraints: np.ndarray, limit: float, critic_area_radius: float,
                    soft_margin: float | np.ndarray) -> float:
    """Vio. Ratio of App. F.2.2: violations over updates in the safety-critical area (-1: none)."""
    constraints = np.asarray(constraints, float)
    in_area = np.sum(constraints > limit - critic_area_radius)
    violations = np.sum(constraints > limit + np.asarray(soft_margin, float))
    return float(violations / in_area) if in_area > 0 else -1.0
