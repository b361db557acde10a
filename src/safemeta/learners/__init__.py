"""Single-task learners by name (the `algorithm` of a `learners.NAME` block of the config).

Each name maps to its implementation classes ("module:Class", modules relative to this package);
see `base.py` for the protocol.
"""
from ..registry import Registry

LEARNERS = Registry(__name__, "single-task learner", {
    "dual_pgd": ("dual_pgd:DualPGDFromScratch",),   # the paper's A^s iterated from a fresh policy
    "cgpo": ("cgpo:CGPOLearner",),                  # CGPO (Dai et al. 2024) from a fresh policy
    "mb_cgpo": ("mb_cgpo:MBCGPOLearner",),          # MB-CGPO (CGPO App. F.4, Alg. 3) from a fresh policy
    "shac_lag": ("shac_lag:ShacLagLearner",),       # SHAC-Lag (CGPO's Table 1 baseline) from a fresh policy
    "cvpo": ("cvpo:CVPOFromScratch",),               # CVPO (Liu et al. 2022) from a fresh policy
    "trpo_lagrangian": ("trpo_lagrangian:TRPOLagrangianFromScratch",),   # the primal-dual baseline
})
