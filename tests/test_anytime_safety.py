"""Prop. 4 / Cor. 1: with lam, lam_c at the bound and delta = 0, every adapted policy is safe and
the reward never decreases; with small lam the guarantee (and safety) can be lost.

At the bound the steps are tiny (KL ~ 1e-12 per step here), so safety there says little about the
surrogate's cost model; the moderate-lam tests check realised cost <= d where the constraint binds
and the step's KL is 1e-4 to 2e-2, and that without the lam_c KL term of (1) it can fail.

The bound's constants for a tabular CMDP: with S^v = S (so alpha = 1) and rho of full support,
every policy has nu(s) >= (1 - gamma) rho(s), so Assumption 2 holds with
eta = (1 - gamma) min_s rho(s). Rewards in [0, r_max] bound |A| by A^max = r_max / (1 - gamma),
likewise A_c^max = c_max / (1 - gamma). Then (Prop. 4)
    lam >= 4 gamma A^max / (eta alpha (1 - gamma)),   lam_c >= 4 gamma A_c^max / (eta alpha (1 - gamma)^2).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import exact_sequence, random_cmdp, softmax, with_limits_near
from safemeta.adaptation.dual_pgd import ExactAdaptationSettings
from safemeta.config import settings
from safemeta.tasks.tabular import TabularCMDP, evaluate


def prop4_bound(m: TabularCMDP) -> tuple[float, np.ndarray]:
    g = m.gamma
    eta = (1 - g) * m.rho.min()
    a_max = m.r.max() / (1 - g)
    ac_max = m.c.reshape(m.num_constraints, -1).max(1) / (1 - g)
    return 4 * g * a_max / (eta * (1 - g)), 4 * g * ac_max / (eta * (1 - g) ** 2)


def _cases(margin: float = 0.002):
    for seed in range(6):
        m0 = random_cmdp(seed, S=4, A=3, p=1 + seed % 2, gamma=0.9, correlation=0.8)
        logits = np.random.default_rng(seed).normal(size=(4, 3))
        yield seed, with_limits_near(m0, logits, margin), logits  # a safe start at or near the limit


@pytest.mark.parametrize("margin", [0.0, 0.002])
def test_anytime_safety_and_monotone_improvement_at_the_bound(margin):
    for seed, m, logits in _cases(margin):
        lam, lam_c = prop4_bound(m)
        seq = exact_sequence(m, logits, 20, lam=lam, lam_c=lam_c, delta=0.0)
        assert (seq.cost <= m.d + 1e-12).all(), f"case {seed}: a policy of the sequence is unsafe"
        assert (np.diff(seq.reward) >= -1e-12).all(), f"case {seed}: the reward decreased"
        assert seq.feasible.all()
        assert seq.reward[-1] > seq.reward[0], f"case {seed}: 20 steps made no progress at all"
        if margin == 0.0:  # starting on the boundary, the constraint binds at every step
            assert (seq.u[1:] > 0).any(axis=1).all(), f"case {seed}: the constraint never became active"


def test_small_lam_loses_safety():
    """The same starts with lam = lam_c = 0.02: the surrogate of (1) is too optimistic somewhere."""
    violations = []
    for seed, m, logits in _cases():
        seq = exact_sequence(m, logits, 20, lam=0.02, lam_c=0.02, delta=0.0)
        violations.append(float((seq.cost - m.d).max()))
    assert max(violations) > 1e-3, violations


def test_one_step_guarantee_with_allowed_violation():
    """Prop. 4 with delta > 0: a start within d + delta stays within d + delta after one step."""
    for seed, m, logits in _cases():
        lam, lam_c = prop4_bound(m)
        delta = 0.05
        m_tight = with_limits_near(m, logits, -0.03)        # J_c(pi_phi) = d + 0.03 <= d + delta
        seq = exact_sequence(m_tight, logits, 1, lam=lam, lam_c=lam_c, delta=delta)
        assert (seq.cost[1] <= m_tight.d + delta + 1e-12).all()
        assert seq.reward[1] >= seq.reward[0] - 1e-12
        assert evaluate(m_tight, softmax(logits)).Jc.max() > m_tight.d.max()  # the start was above d


# lam = lam_c four to five orders of magnitude below the bound (lam ~ 2e4, lam_c ~ 2e5 on these CMDPs,
# where a step's KL is ~1e-12). Measured on the boundary starts of `_cases`: u* 0.5-1.6 on every
# constraint, one-step KL 1.8e-3 to 1.7e-2 (lam 0.3) and 1.6e-4 to 1.5e-3 (lam 1), and every adapted
# policy's realised cost at least 1.6e-4 below d.
MODERATE_LAM = (0.3, 1.0)


@pytest.mark.parametrize("lam", MODERATE_LAM)
def test_one_step_is_safe_at_moderate_lam_where_the_constraint_binds(lam, record_property):
    """Prop. 4's conclusion well below its bound: from a start on the boundary (J_c = d), the exact
    A^s step with lam = lam_c moves the policy by a non-negligible KL against an active constraint,
    and the adapted policy's realised cost J_c(pi^tau) is still <= d (the lam_c KL term of (1)
    covers the error of the first-order cost surrogate)."""
    kls = []
    for seed, m, logits in _cases(0.0):
        res = settings(ExactAdaptationSettings, lam=lam, lam_c=lam, delta=0.0).adapt(m, logits)
        realised = evaluate(m, np.exp(res.logits))
        assert (res.u > 0).all(), f"case {seed}: every constraint should bind (u* = {res.u})"
        assert (realised.Jc <= m.d + 1e-12).all(), f"case {seed}: realised cost {realised.Jc} above d = {m.d}"
        assert realised.J > evaluate(m, softmax(logits)).J, f"case {seed}: the step did not improve the reward"
        kls.append(res.kl)
    record_property("kl", kls)
    print(f"lam = lam_c = {lam}: one-step KL {np.round(kls, 5)}")
    assert min(kls) > 1e-4


def test_without_the_kl_term_of_the_constraint_one_step_can_be_unsafe():
    """The same starts at lam = 0.3 with lam_c = 0: the first-order cost surrogate alone lets the
    realised cost exceed d on some case (measured: by 8e-4 and 9e-5 on two of the three
    two-constraint cases)."""
    excess = []
    for seed, m, logits in _cases(0.0):
        res = settings(ExactAdaptationSettings, lam=0.3, lam_c=0.0, delta=0.0).adapt(m, logits)
        excess.append(float((evaluate(m, np.exp(res.logits)).Jc - m.d).max()))
    assert max(excess) > 1e-5, excess
