"""Meta-learners by name (the `algorithm` of a `methods.NAME` block of the config).

Each name maps to its implementation classes ("module:Class", modules relative to this package),
one per scenario kind; see `base.py` for the protocol and README "Adding a method".
"""
from ..registry import Registry

META_LEARNERS = Registry(__name__, "meta-learning algorithm", {
    "safemeta": ("safe_meta_exact:ExactSafeMeta", "safe_meta:SampledSafeMeta"),   # the paper (Alg. 2 / Alg. 4)
    "meta_cpo": ("meta_cpo:ExactMetaCPO", "meta_cpo:SampledMetaCPO"),            # Meta-CPO (Cho & Sun 2024)
})
