"""Adaptation operators by name (`adaptation.<name>` blocks of the config, operators of learners).

Each name maps to its implementation classes ("module:Class", modules relative to this package),
one per scenario kind; see `base.py` for the protocol and README "Adding a method".
"""
from ..registry import Registry

OPERATORS = Registry(__name__, "adaptation operator", {
    "dual_pgd": ("dual_pgd:ExactDualPGD", "dual_pgd_sampled:SampledDualPGD"),   # the paper's A^s (Alg. 1 / Alg. 3)
    "cgpo": ("cgpo:CGPO",),                    # CGPO (Dai et al. 2024, Alg. 1): GBE + three-case trust-region step
    "mb_cgpo": ("mb_cgpo:MBCGPO",),            # MB-CGPO (App. F.4, Alg. 3): CGPO's gradients from a learned world model
    "shac_lag": ("shac_lag:ShacLag",),         # SHAC-Lag (App. F.1): primal-dual on the same gradients, no trust region
    "cvpo": ("cvpo:CVPO",),                                              # CVPO's E/M step with replay (Liu et al. 2022)
    "trpo_lagrangian": ("trpo_lagrangian:TRPOLagrangian",),              # TRPO on the Lagrangian, dual ascent on nu
    "pg_penalty": ("pg_penalty:ExactPGPenalty", "pg_penalty:SampledPGPenalty"),   # MAML's inner step + penalty
    "crpo": ("crpo:ExactCRPO", "crpo:SampledCRPO"),   # CRPO (Xu et al. 2021), Meta-CRPO's step
    "cpo": ("cpo:ExactCPO", "cpo:SampledCPO"),         # CPO (Achiam et al. 2017), Meta-CPO's inner step
})
