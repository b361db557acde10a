"""Adaptation operators by name (`adaptation.<name>` blocks of the config, operators of learners).

Each name maps to its implementation classes ("module:Class", modules relative to this package),
one per scenario kind; see `base.py` for the protocol and README "Adding a method".
"""
from ..registry import Registry

OPERATORS = Registry(__name__, "adaptation operator", {
    "dual_pgd": ("dual_pgd:ExactDualPGD", "dual_pgd:SampledDualPGD"),   # the paper's A^s (Alg. 1 / Alg. 3)
    "cpo": ("cpo:ExactCPO", "cpo:SampledCPO"),                          # CPO (Achiam et al. 2017), Meta-CPO's inner step
})
